"""A full disk during an (asynchronous) checkpoint save: one clear error naming the directory,
the previous checkpoint intact. Needs a small tmpfs, so it runs only where mounting is allowed
(root in a container)."""

import os
import subprocess

import jax
import pytest

from r1zero_jax import paths
from r1zero_jax.checkpoint import Checkpointer


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs",
                                            str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_clear_error_and_keeps_the_last_checkpoint(small_disk):
    small = {"x": jax.numpy.arange(100.0)}
    # Random floats do not compress: 4 MB on a 512 kB disk.
    big = {"x": jax.random.normal(jax.random.key(0), (1000, 1000))}
    with Checkpointer(os.path.join(small_disk, "ck"), save_every=1) as ckpt:
        ckpt.save(1, small, {"step": 1})
        ckpt.wait()
        ckpt.save(2, big, {"step": 2})
        with pytest.raises(paths.StorageError, match=r"checkpoint save \(background\) in .*/ck "
                                                     r"failed: no space left on the device; .*"
                                                     r"complete steps: \[1\]"):
            ckpt.wait()
    with Checkpointer(os.path.join(small_disk, "ck"), save_every=1) as ckpt:
        restored, meta = ckpt.restore(
            abstract_state={"x": jax.ShapeDtypeStruct((100,), jax.numpy.float32)})
    assert meta == {"step": 1} and float(restored["x"][99]) == 99.0
