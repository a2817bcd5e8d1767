"""Meshes, the one logical-axis -> mesh-axis table, and placing pytrees on a mesh.

Every array in the project names its dimensions with logical axes (`vocab`, `embed`, `heads`, ...);
this module alone decides which mesh axis (`data`, `fsdp`, `tensor`) shards each of them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import math
from typing import Any
from collections.abc import Iterable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r1zero_jax.mesh_spec import MESH_AXES, parse_mesh_spec


# The ONE table. Weights are sharded over fsdp on their embed dimension and over tensor on
# heads/mlp (Megatron-style); the embedding table and LM head over (tensor, fsdp) on vocab and
# not on embed, so the decode step's logits come out vocab-sharded with no partial sums to add
# (an embed-sharded head makes every decode step all-reduce float32 [rows, V]). Activations and
# caches are sharded over (data, fsdp) on batch: with weights sharded over fsdp too, XLA must
# all-gather the weights (FSDP) instead of all-reducing activation-sized partial sums.
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "cache_length": None,
    "vocab": ("tensor", "fsdp"),
    "vocab_embed": None,  # the embedding table's D: its vocab dimension takes fsdp already
    "embed": "fsdp",
    "mlp_embed": "fsdp",  # the MLP weights' embed dimension (see SERVING_RULES)
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    # activations with many tokens (learner, prefill): batch takes (data, fsdp), so their
    # features shard over tensor only and the weights come to them
    "act_embed": None,
    "act_vocab": "tensor",
    # a decode step's residual stream and logits: a few rows against whole weights, so the
    # weights stay put and the rows' features shard like them (embed, vocab over fsdp)
    "decode_batch": "data",
    "decode_mlp": ("tensor", "fsdp"),
}

# The sampler's copy of the weights (sampler.serving_state): the MLP weights shard their hidden
# dimension over (tensor, fsdp) and keep their embed dimension whole, so a decode step multiplies
# them where they lie and adds one [rows, D] partial sum per MLP. Sharded over fsdp on embed (the
# learner's layout) they make every decode step add, then regather, [rows, F] per layer: with
# Qwen2.5-Math-1.5B on a v4-32, two thirds of the step's collective bytes.
SERVING_RULES: dict[str, Any] = {**LOGICAL_RULES, "mlp": ("tensor", "fsdp"), "mlp_embed": None}

_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "activation_mesh", default=None)


def make_mesh(spec: str = "data=-1", devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes (or `devices`)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        # Topology-aware placement on TPU (tensor axis on the fastest interconnect).
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU and odd device counts: plain order is as good as any
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return {name: int(size) for name, size in mesh.shape.items()}


def logical_to_spec(logical_axes: Iterable[str | None], rules: dict | None = None) -> P:
    """PartitionSpec for an array whose dimensions carry these logical names."""
    rules = LOGICAL_RULES if rules is None else rules
    out = []
    for name in logical_axes:
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} is not in LOGICAL_RULES")
        out.append(None if name is None else rules[name])
    return P(*out)


def logical_sharding(mesh: Mesh, logical_axes: Iterable[str | None],
                     rules: dict | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
    """Within this block (around tracing), `constrain` pins activations to `mesh`."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_mesh` block, if any."""
    return _ACTIVATION_MESH.get()


def constrain(x, logical_axes: Iterable[str | None]):
    """x with the sharding its logical axes name on the activation mesh (no-op without one)."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.devices.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, logical_axes))


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (a matching tree): inputs to
    lower and compile a program without allocating anything."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def axis_size(mesh: Mesh | dict[str, int], logical_name: str, rules: dict | None = None) -> int:
    """How many shards the mesh (or its axis sizes, for a plan) makes of a dimension with this
    logical name."""
    shape = mesh if isinstance(mesh, dict) else mesh.shape
    rule = (LOGICAL_RULES if rules is None else rules)[logical_name]
    if rule is None:
        return 1
    axes = (rule,) if isinstance(rule, str) else rule
    return math.prod(shape.get(a, 1) for a in axes)


def divisibility_problems(mesh: Mesh | dict[str, int], dims: dict[str, int],
                          rules: dict | None = None) -> list[str]:
    """The named dimensions the mesh cannot shard evenly, each with its numbers."""
    rules = LOGICAL_RULES if rules is None else rules
    return [f"{name}={size} is not divisible by {axis_size(mesh, name, rules)} "
            f"({rules[name]} axis)" for name, size in dims.items()
            if size % axis_size(mesh, name, rules)]


def check_divisible(mesh: Mesh, dims: dict[str, int], what: str,
                    rules: dict | None = None) -> None:
    """Refuse a mesh that cannot evenly shard the named dimensions, naming the numbers."""
    problems = divisibility_problems(mesh, dims, rules)
    if problems:
        raise ValueError(f"mesh {mesh_shape(mesh)} does not fit {what}: " + "; ".join(problems))


def shard_batch(mesh: Mesh, x, logical_axes: tuple[str | None, ...] | None = None):
    """Place a host array [B, ...] on the mesh with B over (data, fsdp), the rest replicated."""
    x = np.asarray(x)
    axes = logical_axes or ("batch",) + (None,) * (x.ndim - 1)
    sharding = logical_sharding(mesh, axes)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Multi-host: every process holds the full host batch; each device takes its own slice.
    return from_host(x, sharding)



def to_host(tree):
    """Numpy copies of (possibly multi-host) global arrays, the full value on every process."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------------------------
# Data slices: each process feeds and reads back only the rows its devices hold


@functools.lru_cache(maxsize=16)
def batch_slices(mesh: Mesh) -> tuple[int, ...]:
    """The data slice of each process (indexed by process). A batch sharded over `batch` splits
    into equal blocks of consecutive rows, slice i the i-th; a process holds the block its devices
    hold, and processes whose devices hold the same rows share a slice (`slices_of`)."""
    shards = axis_size(mesh, "batch")
    held: dict[int, set[int]] = {}
    for device, index in logical_sharding(mesh, ("batch",)).devices_indices_map(
            (shards,)).items():
        held.setdefault(device.process_index, set()).add(index[0].start or 0)
    return slices_of(held, shards, jax.process_count())


def slices_of(held: dict[int, set[int]], shards: int, processes: int) -> tuple[int, ...]:
    """Each process's slice from the batch shards its devices hold (`held`, by process): the
    rank of its block of shards. All zeros (one slice: every process the whole batch) when the
    blocks are not contiguous, equal and disjoint, or a process holds none."""
    blocks = sorted({(min(h), max(h) + 1) for h in held.values()})
    size = blocks[0][1] - blocks[0][0]
    regular = (sorted(held) == list(range(processes))
               and all(len(h) == max(h) + 1 - min(h) for h in held.values())
               and blocks == [(i * size, (i + 1) * size) for i in range(shards // size)])
    if not regular:
        return (0,) * processes
    return tuple(blocks.index((min(held[p]), max(held[p]) + 1)) for p in range(processes))


def data_slice(mesh: Mesh) -> tuple[int, int]:
    """(this process's slice, number of slices); see `batch_slices`."""
    slices = batch_slices(mesh)
    return slices[jax.process_index()], max(slices) + 1


def slice_peers(mesh: Mesh) -> list[int]:
    """The processes holding this process's slice (itself included), in order."""
    slices = batch_slices(mesh)
    return [p for p, s in enumerate(slices) if s == slices[jax.process_index()]]


def from_local_batch(mesh: Mesh, x, logical_axes: tuple[str | None, ...] | None = None):
    """The global array [count * B, ...] whose slice `data_slice(mesh)` is this process's
    host rows x [B, ...] (B over the batch shards, the rest as `logical_axes` say). With one
    slice x is the whole batch (`shard_batch`)."""
    index, count = data_slice(mesh)
    if count == 1:
        return shard_batch(mesh, x, logical_axes)
    x = np.asarray(x)
    axes = logical_axes or ("batch",) + (None,) * (x.ndim - 1)
    return jax.make_array_from_process_local_data(logical_sharding(mesh, axes), x,
                                                  (count * x.shape[0], *x.shape[1:]))


def local_rows(mesh: Mesh, x) -> np.ndarray:
    """This process's slice of the rows (dim 0) of a global array, read from its own devices;
    with one slice the whole array (`to_host`)."""
    index, count = data_slice(mesh)
    if count == 1:
        return to_host(x)
    if x.shape[0] % count:
        raise ValueError(f"{x.shape[0]} rows do not split into {count} data slices")
    n = x.shape[0] // count
    lo = index * n
    out = np.zeros((n, *x.shape[1:]), x.dtype)
    covered = np.zeros(out.shape, bool)
    for shard in x.addressable_shards:
        r0, r1, _ = shard.index[0].indices(x.shape[0])
        a, b = max(r0, lo), min(r1, lo + n)
        if a < b:
            at = (slice(a - lo, b - lo), *shard.index[1:])
            out[at] = np.asarray(shard.data)[a - r0:b - r0]
            covered[at] = True
    if not covered.all():
        raise ValueError(f"process {jax.process_index()}'s devices do not hold all rows of its "
                         f"data slice {index} (rows [{lo}, {lo + n}) of {x.shape}, sharding "
                         f"{x.sharding})")
    return out


def gather_slices(mesh: Mesh, tree):
    """Host arrays of this process's slice -> every slice's, concatenated along dim 0 in slice
    order, on every process (leading dims may differ between slices). Identity with one slice."""
    slices = batch_slices(mesh)
    if max(slices) == 0:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(x) for x in leaves])
    parts = _allgather_bytes(buf.getvalue())
    first = [slices.index(i) for i in range(max(slices) + 1)]  # one process per slice
    loaded = [np.load(io.BytesIO(parts[p])) for p in first]
    return jax.tree.unflatten(treedef, [np.concatenate([z[f"arr_{i}"] for z in loaded])
                                        for i in range(len(leaves))])


def _allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order, on every process. Buffers are padded to a power
    of two: a new length means a new compile of the gather."""
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    buf = np.zeros(1 << max(int(sizes.max()) - 1, 0).bit_length(), np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    parts = np.asarray(multihost_utils.process_allgather(buf))
    return [parts[i, :sizes[i]].tobytes() for i in range(len(sizes))]


def allgather_json(obj) -> list:
    """Every process's `obj` (JSON-able), in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    import json

    return [json.loads(part) for part in _allgather_bytes(json.dumps(obj).encode())]


@functools.partial(jax.jit, static_argnames=("mesh",))
def take_rows(tree, idx, *, mesh: Mesh):
    """Rows `idx` (int32 [..., M], replicated) of each global array [R, ...] of `tree`, as
    [..., M, ...] with M over the batch shards: minibatches gathered on the devices from rows
    that each process placed from its own slice."""
    def one(x):
        axes = (None,) * (idx.ndim - 1) + ("batch",) + (None,) * (x.ndim - 1)
        return jax.lax.with_sharding_constraint(x[idx], logical_sharding(mesh, axes))

    return jax.tree.map(one, tree)


def from_host(tree, shardings):
    """Host arrays (the same full value on every process) -> global arrays with `shardings`;
    each process places only its own shards, so no cross-host transfer is needed."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree, shardings)
