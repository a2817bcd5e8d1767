"""Paths that are either local directories or `gs://bucket/path`, for small files.

Arrays go through Orbax/tensorstore (see checkpoint.py); configs, JSONL and markers go through
fsspec here (gcsfs for gs://). One variable, the standard `STORAGE_EMULATOR_HOST`, points all of
the project's GCS access at an emulator: `configure_gcs_emulator()` (run at import) derives what
tensorstore and gcsfs need from it.

Every GCS request, gcsfs and tensorstore alike, runs under one deadline policy (the constants
below): a connect timeout, a no-progress timeout per request, a few retries with backoff, and a
deadline per operation. A fault (endpoint down, a server that accepts and never answers, a
missing bucket) therefore surfaces as an error naming the bucket, the operation and what to
check, within a minute, instead of the clients' own minutes of retrying.
"""

from __future__ import annotations

import os
import posixpath
import socket
import threading
import time
import urllib.parse
from typing import IO, Any

GCS_PREFIX = "gs://"
PROBE_TIMEOUT_S = 20.0
GCS_CONNECT_TIMEOUT_S = 5
GCS_STALL_TIMEOUT_S = 10  # a request that receives nothing for this long is abandoned
GCS_ATTEMPTS = 3  # per request, backoff 1-2 s then 2-3 s in between
GCS_DEADLINE_S = 45.0  # one operation, all attempts together: errors come well within 60 s


class StorageError(RuntimeError):
    """Storage refused or failed an operation (disk full, GCS down); the message says what to
    check. The CLI prints it as one line."""


class GcsError(StorageError):
    """A GCS operation failed or ran past its deadline; the message names the bucket, the
    operation and what to check."""


def configure_gcs_emulator() -> None:
    """Sets the GCS environment: the deadline policy for tensorstore, and the emulator.

    Always (setdefault, so an explicit user choice wins): tensorstore's connect and stall
    timeouts; gcsfs's experimental zonal/HNS support off (it probes buckets over gRPC and hangs
    60 s per call against an emulator; plain JSON-API access works on every bucket kind); and
    etils.epath routed through fsspec/gcsfs rather than tf.io.gfile (which cannot reach an
    emulator). With an emulator: tensorstore's GCS endpoint and a fake token. gcsfs reads
    STORAGE_EMULATOR_HOST itself.
    """
    os.environ.setdefault("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", str(GCS_CONNECT_TIMEOUT_S))
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", str(GCS_STALL_TIMEOUT_S))
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("EPATH_USE_TF", "false")
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return
    url = host if host.startswith(("http://", "https://")) else f"http://{host}"
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake")


configure_gcs_emulator()

# tensorstore's GCS retries (the context resource Orbax's tensorstore contexts get, see
# checkpoint.py); its default, 32 retries up to 32 s apart, keeps a dead endpoint busy for minutes.
TENSORSTORE_GCS_RETRIES = {"max_retries": GCS_ATTEMPTS - 1, "initial_delay": "1s",
                           "max_delay": "4s"}


def is_gcs(path: str) -> bool:
    return str(path).startswith(GCS_PREFIX)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_gcs(base) else os.path.join(base, *parts)


def emulator_url() -> str | None:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


_BOUNDED_GCS = None


def _bounded_gcs_class() -> type:
    """gcsfs with the deadline policy; registered as fsspec's gs:// so that Orbax's own small
    files (through etils.epath) get it too."""
    global _BOUNDED_GCS
    if _BOUNDED_GCS is None:
        import aiohttp
        import fsspec
        import gcsfs
        from gcsfs.retry import retry_request

        class BoundedGCSFileSystem(gcsfs.GCSFileSystem):
            _request = retry_request(retries=GCS_ATTEMPTS)(gcsfs.GCSFileSystem._request.__wrapped__)

            def __init__(self, *args, **kwargs):
                kwargs.setdefault("requests_timeout", aiohttp.ClientTimeout(
                    total=None, sock_connect=GCS_CONNECT_TIMEOUT_S, sock_read=GCS_STALL_TIMEOUT_S))
                super().__init__(*args, **kwargs)

        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, BoundedGCSFileSystem, clobber=True)
        _BOUNDED_GCS = BoundedGCSFileSystem
    return _BOUNDED_GCS


def _filesystem(path: str) -> Any:
    import fsspec

    if not is_gcs(path):
        return fsspec.filesystem("file")
    # Against an emulator, skip the credential search (it may wait on a metadata server).
    url = emulator_url()
    return _bounded_gcs_class()(endpoint_url=url, token="anon" if url else None)


def bucket_of(path: str) -> str:
    return _strip(path).split("/", 1)[0]


def _where() -> str:
    return emulator_url() or "storage.googleapis.com"


def gcs_error(op: str, path: str, cause: BaseException | str, elapsed: float) -> GcsError:
    """The policy's one error: operation, bucket, endpoint, cause and what to check."""
    text = str(cause).strip()
    if isinstance(cause, BaseException):
        name = type(cause).__name__
        text = f"{name}: {text.splitlines()[0]}" if text else name
    low = text.lower()
    if any(w in low for w in ("timeout", "no answer", "did not complete", "deadline")):
        hint = (f"the endpoint {_where()} accepted the connection but did not answer: is it the "
                "GCS service, and is it overloaded or stalled?")
    elif any(w in low for w in ("refused", "connect", "unavailable", "reset", "name or service")):
        hint = f"is the endpoint {_where()} up and reachable (network, DNS, firewall)?"
    elif any(w in low for w in ("403", "401", "forbidden", "permission", "unauthorized")):
        hint = "the credentials' permissions on the bucket"
    else:
        hint = f"the bucket, the credentials and the endpoint {_where()}"
    if emulator_url():
        hint += " (STORAGE_EMULATOR_HOST is set: is the emulator running?)"
    return GcsError(f"GCS {op} of {path} (bucket {bucket_of(path)!r}) failed after "
                    f"{elapsed:.0f} s: {text}; check {hint}")


def _gcs_call(op: str, path: str, method: str, *args, timeout_s: float = GCS_DEADLINE_S, **kwargs):
    """`fs.<method>` (an async gcsfs method) on `path` under the operation deadline."""
    from fsspec.asyn import FSTimeoutError, sync

    fs = _filesystem(path)
    t0 = time.monotonic()
    try:
        return sync(fs.loop, getattr(fs, method), _strip(path), *args, timeout=timeout_s, **kwargs)
    except (FileNotFoundError, FileExistsError):
        raise
    except FSTimeoutError as e:
        # Either the deadline or every attempt stalling (fsspec reports both so).
        raise gcs_error(op, path, "no answer from the server", time.monotonic() - t0) from e
    except Exception as e:  # noqa: BLE001 - every other failure gets the policy's message
        raise gcs_error(op, path, e, time.monotonic() - t0) from e


def _strip(path: str) -> str:
    return path[len(GCS_PREFIX):] if is_gcs(path) else path


def exists(path: str) -> bool:
    """Whether a file or directory exists; on GCS an unreachable endpoint raises GcsError
    rather than reading as "missing" (fsspec's `exists` would swallow it)."""
    if not is_gcs(path):
        return os.path.exists(path)
    try:
        _gcs_call("stat", path, "_info")
    except FileNotFoundError:
        return False
    return True


def isdir(path: str) -> bool:
    if not is_gcs(path):
        return os.path.isdir(path)
    try:
        return _gcs_call("stat", path, "_info")["type"] == "directory"
    except FileNotFoundError:
        return False


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries directly under `path`, sorted; [] if it is missing."""
    try:
        if is_gcs(path):
            # refresh: gcsfs caches listings, and checkpoints appear from other processes.
            entries = _gcs_call("listing", path, "_ls", detail=False, refresh=True)
        else:
            entries = os.listdir(path)
    except FileNotFoundError:
        return []
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})


def makedirs(path: str) -> None:
    """Creates a local directory tree; a no-op on GCS, which has no directories."""
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "r") -> IO:
    """Opens a local or gs:// file; parents of a local file opened for writing are created.

    A gs:// file streams, each request under the policy's connect and stall timeouts and retries
    (not the per-operation deadline): use read_text/write_text for small files.
    """
    if is_gcs(path) and "a" in mode:
        # gcsfs would silently overwrite: GCS objects are immutable.
        raise ValueError(f"append mode is not supported on GCS ({path}); use append_text")
    if not is_gcs(path) and any(c in mode for c in "wa"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _filesystem(path).open(_strip(path), mode)


def read_bytes(path: str) -> bytes:
    if not is_gcs(path):
        with open(path, "rb") as f:
            return f.read()
    return _gcs_call("read", path, "_cat_file")


def write_bytes(path: str, data: bytes, *, create_only: bool = False) -> None:
    """Writes a whole file; `create_only` fails with FileExistsError if it already exists
    (atomic on GCS and locally)."""
    if not is_gcs(path):
        # Through a temporary file, so a concurrent reader never sees a torn file.
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        if not create_only:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails with FileExistsError, atomically
        finally:
            os.remove(tmp)
        return
    try:
        _gcs_call("write", path, "_pipe_file", data, mode="create" if create_only else "overwrite")
    except GcsError as e:
        if create_only and ("412" in str(e) or "precondition" in str(e).lower()):
            raise FileExistsError(path) from e
        raise


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def append_text(path: str, text: str) -> None:
    """Appends to a local file; on GCS rewrites the object (O(size): fine for small logs)."""
    if not is_gcs(path):
        with open_file(path, "a") as f:
            f.write(text)
        return
    write_text(path, (read_text(path) if exists(path) else "") + text)


def remove(path: str, recursive: bool = False) -> None:
    if not is_gcs(path):
        _filesystem(path).rm(path, recursive=recursive)
        return
    _gcs_call("delete", path, "_rm", recursive=recursive)


def _endpoint() -> tuple[str, int]:
    url = urllib.parse.urlparse(emulator_url() or "https://storage.googleapis.com")
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def check_gcs_bucket(path: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fails fast with a clear error if the bucket of a gs:// path cannot be used.

    First a TCP connection with a short timeout (a closed port fails at once), then a one-item
    listing of the bucket bounded by `timeout_s`. Raises GcsError (endpoint unreachable, too
    slow) or ValueError (missing bucket, permission denied). Local paths pass.
    """
    if not is_gcs(path):
        return
    bucket = bucket_of(path)
    if not bucket:
        raise ValueError(f"no bucket in GCS path {path!r}; expected gs://BUCKET/...")
    host, port = _endpoint()
    t0 = time.monotonic()
    try:
        socket.create_connection((host, port),
                                 timeout=min(GCS_CONNECT_TIMEOUT_S, timeout_s)).close()
    except OSError as e:
        raise gcs_error("bucket check (connect)", path, e, time.monotonic() - t0) from e
    try:
        _gcs_call("bucket check (listing)", f"{GCS_PREFIX}{bucket}", "_ls", detail=False,
                  refresh=True, max_results=1, timeout_s=timeout_s)
    except FileNotFoundError:
        raise ValueError(f"GCS bucket {bucket!r} does not exist at {_where()} "
                         f"(path {path!r})") from None
    except GcsError as e:
        # gcsfs reports 403 as OSError("Forbidden: ...") and 401 as HttpError(code=401).
        cause = e.__cause__
        if (isinstance(cause, OSError) and str(cause).startswith("Forbidden")) \
                or getattr(cause, "code", None) in (401, 403):
            raise ValueError(f"permission denied on GCS bucket {bucket!r} at {_where()}: "
                             f"{cause}") from None
        raise
