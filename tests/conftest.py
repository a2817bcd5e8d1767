"""Test session set-up: 8 virtual CPU devices before JAX loads, shared tiny configs."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    from r1zero_jax import distributed  # imports no JAX

    distributed.set_cpu_device_count(8)  # with the collective timeouts of a loaded machine
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EPATH_USE_TF", "false")

import pytest  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def shared_data_dir():
    """../shared/data when present (benchmark data is read there, never committed)."""
    path = os.environ.get("R1ZERO_SHARED_DATA", os.path.abspath(SHARED_DATA))
    if not os.path.isdir(path):
        pytest.skip(f"shared benchmark data not found at {path}")
    return path


# GCS emulator (fake-gcs-server) session fixture `gcs_emulator`, from tests/gcs_emulator.py.
# gcsfs reads this at import (whoever imports it first); its gRPC probe hangs on an emulator.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
from gcs_emulator import gcs_emulator  # noqa: E402,F401


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """A directory holding the real Qwen2.5 tokenizer, built offline once per session (~10 s)."""
    from r1zero_jax.data.qwen_tokenizer import build_qwen_tokenizer

    path = str(tmp_path_factory.mktemp("qwen_tokenizer"))
    build_qwen_tokenizer(path)
    return path
