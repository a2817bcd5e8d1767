"""Paths that are either local directories or `gs://bucket/path`, for small files.

Arrays go through Orbax/tensorstore (see checkpoint.py); configs, JSONL and markers go through
fsspec here (gcsfs for gs://). One variable, the standard `STORAGE_EMULATOR_HOST`, points all of
the project's GCS access at an emulator: `configure_gcs_emulator()` (run at import) derives what
tensorstore and gcsfs need from it.
"""

from __future__ import annotations

import os
import posixpath
import queue
import socket
import threading
import urllib.parse
from typing import IO, Any

GCS_PREFIX = "gs://"
PROBE_TIMEOUT_S = 20.0


def configure_gcs_emulator() -> None:
    """Derives the tensorstore/gcsfs/etils settings from `STORAGE_EMULATOR_HOST`.

    Always (setdefault, so an explicit user choice wins): gcsfs's experimental zonal/HNS
    support off (it probes buckets over gRPC and hangs 60 s per call against an emulator; plain
    JSON-API access works on every bucket kind), and etils.epath routed through fsspec/gcsfs
    rather than tf.io.gfile (which cannot reach an emulator). With an emulator: tensorstore's
    GCS endpoint and a fake token. gcsfs reads STORAGE_EMULATOR_HOST itself.
    """
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("EPATH_USE_TF", "false")
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return
    url = host if host.startswith(("http://", "https://")) else f"http://{host}"
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake")


configure_gcs_emulator()


def is_gcs(path: str) -> bool:
    return str(path).startswith(GCS_PREFIX)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_gcs(base) else os.path.join(base, *parts)


def emulator_url() -> str | None:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def _filesystem(path: str) -> Any:
    import fsspec

    if not is_gcs(path):
        return fsspec.filesystem("file")
    import gcsfs

    # Against an emulator, skip the credential search (it may wait on a metadata server).
    url = emulator_url()
    return gcsfs.GCSFileSystem(endpoint_url=url, token="anon" if url else None)


def _strip(path: str) -> str:
    return path[len(GCS_PREFIX):] if is_gcs(path) else path


def exists(path: str) -> bool:
    return _filesystem(path).exists(_strip(path))


def isdir(path: str) -> bool:
    return _filesystem(path).isdir(_strip(path))


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries directly under `path`, sorted; [] if it is missing."""
    # refresh: gcsfs caches listings, and checkpoints appear from other processes.
    kwargs = {"refresh": True} if is_gcs(path) else {}
    try:
        entries = _filesystem(path).ls(_strip(path), detail=False, **kwargs)
    except FileNotFoundError:
        return []
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})


def makedirs(path: str) -> None:
    """Creates a local directory tree; a no-op on GCS, which has no directories."""
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "r") -> IO:
    """Opens a local or gs:// file; parents of a local file opened for writing are created."""
    if is_gcs(path) and "a" in mode:
        # gcsfs would silently overwrite: GCS objects are immutable.
        raise ValueError(f"append mode is not supported on GCS ({path}); use append_text")
    if not is_gcs(path) and any(c in mode for c in "wa"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _filesystem(path).open(_strip(path), mode)


def read_text(path: str) -> str:
    with open_file(path, "r") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    with open_file(path, "w") as f:
        f.write(text)


def append_text(path: str, text: str) -> None:
    """Appends to a local file; on GCS rewrites the object (O(size): fine for small logs)."""
    if not is_gcs(path):
        with open_file(path, "a") as f:
            f.write(text)
        return
    write_text(path, (read_text(path) if exists(path) else "") + text)


def remove(path: str, recursive: bool = False) -> None:
    _filesystem(path).rm(_strip(path), recursive=recursive)


def _endpoint() -> tuple[str, int]:
    url = urllib.parse.urlparse(emulator_url() or "https://storage.googleapis.com")
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def check_gcs_bucket(path: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fails fast with a clear error if the bucket of a gs:// path cannot be used.

    tensorstore retries a dead endpoint for minutes and gcsfs for about 30 s, so we first open
    a TCP connection with a short timeout, then ask for the bucket in a daemon thread bounded
    by `timeout_s`. Raises RuntimeError (endpoint unreachable or too slow) or ValueError
    (missing bucket, permission denied). Local paths pass.
    """
    if not is_gcs(path):
        return
    bucket = _strip(path).split("/", 1)[0]
    if not bucket:
        raise ValueError(f"no bucket in GCS path {path!r}; expected gs://BUCKET/...")
    host, port = _endpoint()
    where = emulator_url() or "storage.googleapis.com"
    try:
        socket.create_connection((host, port), timeout=min(5.0, timeout_s)).close()
    except OSError as e:
        raise RuntimeError(
            f"cannot reach the GCS endpoint {where} for {path!r}: {e}"
            + (" (STORAGE_EMULATOR_HOST is set: is the emulator up?)" if emulator_url() else "")
        ) from e
    result: queue.Queue = queue.Queue()

    def probe() -> None:
        try:
            result.put(_filesystem(path).ls(bucket, detail=False, refresh=True, max_results=1))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result.put(e)

    threading.Thread(target=probe, daemon=True, name="gcs-bucket-probe").start()
    try:
        outcome = result.get(timeout=timeout_s)
    except queue.Empty:
        raise RuntimeError(
            f"GCS endpoint {where} did not answer a listing of bucket {bucket!r} within "
            f"{timeout_s:.0f} s"
        ) from None
    if isinstance(outcome, FileNotFoundError):
        raise ValueError(f"GCS bucket {bucket!r} does not exist at {where} (path {path!r})")
    # gcsfs reports 403 as OSError("Forbidden: ...") and 401 as HttpError(code=401).
    forbidden = isinstance(outcome, OSError) and str(outcome).startswith("Forbidden")
    if forbidden or getattr(outcome, "code", None) in (401, 403):
        raise ValueError(f"permission denied on GCS bucket {bucket!r} at {where}: {outcome}")
    if isinstance(outcome, BaseException):
        raise RuntimeError(f"GCS bucket {bucket!r} at {where} is not usable: {outcome!r}")
