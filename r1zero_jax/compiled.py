"""The run's programs compiled ahead of time for a TPU topology, and what XLA says about them.

With libtpu installed (the `tpu` or `test` extra), any host can compile for a TPU slice it does not
have: `jax.experimental.topologies` describes the slice's devices, the mesh is built over them,
and every program is lowered from ShapeDtypeStructs carrying NamedShardings, so nothing is
allocated. The programs are the trainer's own: the learner's train step for one minibatch (with
its accumulation, remat and logits chunking), the sampler's prefill and its decode loop (with
`sampling.decode_slots`, continuous batching's: the prefill of the whole rollout's prompts with
the first fill of the slots, and the loop that refills them; with `sampling.page_size`, on a
paged cache).

Figures are per chip and come from XLA: `memory_analysis` (argument, output, alias, temporary
bytes), `cost_analysis` (which counts each loop body once: the decode program's figures are one
decode step) and the optimised HLO, whose collectives are counted with the trip counts of the
loops around them (the learner's accumulation scan and logits-chunk loops; the decode loop's
trip count is dynamic, so its figures are per decode step).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

from r1zero_jax.plan import Topology

_LIBTPU_HINT = ('compiling for a TPU topology needs libtpu: pip install "jax[tpu]==<your jax '
                'version>" (or this project\'s "tpu" extra)')
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all",
               "ragged-all-to-all", "collective-broadcast")


# -- topologies ----------------------------------------------------------------------------------
def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The slice's chip grid: from one host's 2x2 chips, double the last of the smallest
    dimensions until it holds `chips` (v4: 4 -> 2x2x1, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4;
    v5e: 8 -> 2x4, 16 -> 4x4)."""
    shape = [2, 2] + [1] * (dims - 2) if chips >= 4 else [1] * dims
    while math.prod(shape) < chips:
        i = max(j for j in range(dims) if shape[j] == min(shape))
        shape[i] *= 2
    if math.prod(shape) != chips:
        raise ValueError(f"{chips} chips do not form a TPU slice")
    return tuple(shape)


def topology_devices(topo: Topology) -> list:
    """The devices of the slice `topo` (plan.parse_topology), described by libtpu."""
    import importlib.util

    if topo.generation == "cpu":
        raise ValueError(f"{topo.name} is not a TPU topology; give e.g. --topology v4-32")
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(_LIBTPU_HINT)
    from jax.experimental import topologies

    libtpu_name, three_d = {"v4": ("v4", True), "v5p": ("v5p", True),
                            "v5litepod": ("v5e", False), "v6e": ("v6e", False)}[topo.generation]
    grid = _grid(topo.chips, 3 if three_d else 2)
    per_host = (2, 2, 1) if topo.hosts > 1 or topo.chips == 4 else (*grid, 1)[:3]
    kwargs = dict(platform="tpu", topology_name=f"{libtpu_name}:{'x'.join(map(str, grid))}",
                  chips_per_host_bounds=per_host, num_slices=1)
    if three_d:
        kwargs["chip_config_name"] = "megacore"
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.name)  # quiets libtpu's host probing
    # Only compiling: several processes (test workers, a second plan) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(**kwargs).devices)
    except Exception as e:
        raise ValueError(f"libtpu cannot describe topology {topo.name} "
                         f"({kwargs['topology_name']}): {str(e).splitlines()[0][:300]}") from e


# -- optimised HLO: collectives with loop trip counts -------------------------------------------
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_ASSIGN = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations)"
                     r"=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass
class _Instr:
    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str


def _split_type(rest: str) -> tuple[str, str]:
    """'(a, b) op(...)' or 'f32[2]{0} op(...)' -> (type, the rest after it)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _parse(hlo: str) -> tuple[dict[str, list[_Instr]], str]:
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header and not _ASSIGN.match(line):
            current = header.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        m = _ASSIGN.match(line)
        if not m or current is None:
            continue
        type_, rest = _split_type(line[m.end():])
        opcode, _, args = rest.partition("(")
        depth, end = 1, len(args)
        for i, ch in enumerate(args):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                end = i
                break
        comps[current].append(_Instr(m.group(1), type_, opcode.strip(),
                                     re.findall(r"%([\w.\-]+)", args[:end]), args[end + 1:]))
    return comps, entry


def _bytes(type_: str) -> int:
    return sum(_DTYPE_BYTES.get(dt, 1) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _ARRAY.findall(type_))


def _trip_count(cond: list[_Instr], consts: dict[str, int]) -> int | None:
    """A counted loop's trip count (its condition is `i < N`, N a constant), else None."""
    for ins in cond:
        if (ins.opcode == "compare" and "direction=LT" in ins.attrs and len(ins.operands) == 2
                and ins.operands[1] in consts):
            return consts[ins.operands[1]]
    return None


def _constant_values(hlo: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(
        r"%([\w.\-]+)\s*=\s*[su]\d+\[\]\S*\s+constant\((-?\d+)\)", hlo)}


def collectives(hlo: str, top: int = 5) -> dict[str, Any]:
    """Collectives of an optimised HLO module, each counted as often as it runs (the trip counts
    of counted loops around it; once per iteration of a dynamic loop). Bytes of one collective:
    the larger of its operands and its result (a reduce-scatter's input, an all-gather's
    output)."""
    comps, entry = _parse(hlo)
    consts = _constant_values(hlo)
    sizes = {ins.name: _bytes(ins.type) for body in comps.values() for ins in body}
    mult: dict[str, int] = {}

    def visit(name: str, m: int) -> None:
        mult[name] = mult.get(name, 0) + m
        for ins in comps.get(name, []):
            for kind, targets in _CALLEE.findall(ins.attrs):
                for target in re.findall(r"[\w.\-]+", targets):
                    if target not in comps:
                        continue
                    k = m
                    if kind in ("body", "condition") and ins.opcode == "while":
                        cond = re.search(r"condition=%?([\w.\-]+)", ins.attrs).group(1)
                        k = m * (_trip_count(comps.get(cond, []), consts) or 1)
                    visit(target, k)

    visit(entry, 1)
    found = []
    for comp, body in comps.items():
        for ins in body:
            base = ins.opcode.removesuffix("-start")
            if base not in COLLECTIVES or comp not in mult:
                continue
            operands = sum(sizes.get(o, 0) for o in ins.operands)
            result = _bytes(ins.type) - (operands if ins.opcode.endswith("-start")
                                         and ins.type.startswith("(") else 0)
            shape = _ARRAY.search(ins.type)
            found.append({"op": base, "bytes": max(operands, result), "count": mult[comp],
                          "shape": f"{shape.group(1)}[{shape.group(2)}]" if shape else ins.type})
    by_op: dict[str, dict[str, int]] = {}
    for f in found:
        d = by_op.setdefault(f["op"], {"count": 0, "bytes": 0})
        d["count"] += f["count"]
        d["bytes"] += f["count"] * f["bytes"]
    largest = sorted(found, key=lambda f: -f["bytes"])[:top]
    return {"count": sum(f["count"] for f in found),
            "bytes": sum(f["count"] * f["bytes"] for f in found),
            "by_op": by_op, "largest": largest}


def analyse(compiled, resident_bytes: int = 0) -> dict[str, Any]:
    """Per-chip figures of a compiled program. `resident_bytes`: device memory the program does
    not take as an argument but that stays allocated while it runs (the training state while
    the sampler runs on its serving copy of the weights)."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    program = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes)
    coll = collectives(compiled.as_text())
    return {
        "peak_bytes": int(program + resident_bytes), "program_peak_bytes": int(program),
        "resident_bytes": int(resident_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "collectives_per_step": coll["count"], "collective_bytes_per_step": coll["bytes"],
        "collectives_by_op": coll["by_op"], "largest_collectives": coll["largest"],
    }


# -- the run's programs --------------------------------------------------------------------------
def _tree_bytes_per_chip(tree) -> int:
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def compile_programs(cfg, qconfig, mesh, *, programs=("learn", "prefill", "decode"),
                     printer=print, keep: dict | None = None) -> dict[str, Any]:
    """Compile the run's programs for `mesh` (over any devices, e.g. a topology's) from
    abstract inputs and analyse each. Returns {program: analyse(...) + compile_s}; `keep`, if
    given, receives the compiled executables by program name."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from r1zero_jax import sharding as shd
    from r1zero_jax.models.decoder import abstract_model, check_mesh_fits, param_shardings
    from r1zero_jax.rewards.templates import STOP_STRINGS
    from r1zero_jax.rl.learner import Learner, LearnBatch, abstract_train_state, jit_learner
    from r1zero_jax.sampling import sampler

    check_mesh_fits(qconfig, mesh)
    m, s = cfg.model, cfg.sampling
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    model = abstract_model(qconfig, dtype=dtype, param_dtype=param_dtype, remat=m.remat)
    graphdef, abs_state = nnx.split(model)
    params = shd.abstract(nnx.state(model, nnx.Param).to_pure_dict(),
                       param_shardings(model, mesh).to_pure_dict())
    learner = Learner.from_config(cfg, qconfig)
    state = abstract_train_state(params, learner.tx, mesh)
    # While the sampler runs, the training state stays in HBM beside its serving copy.
    resident = _tree_bytes_per_chip((state.params, state.opt_state))
    out: dict[str, Any] = {}

    def run(name, lower, resident_bytes=0):
        t0 = time.perf_counter()
        printer(f"compiling {name} for {mesh.devices.size} x {mesh.devices.flat[0].device_kind} "
                f"...", flush=True)
        lowered = lower()
        compiled = lowered.compile()
        out[name] = dict(analyse(compiled, resident_bytes),
                         compile_s=round(time.perf_counter() - t0, 1))
        printer(f"compiled {name} in {out[name]['compile_s']:.0f}s", flush=True)
        if keep is not None:
            keep[name] = compiled
        return lowered, compiled

    tp = cfg.data.max_prompt_tokens
    if "learn" in programs:
        a, mb, tn = cfg.train.minibatch_size // cfg.microbatch, cfg.microbatch, s.max_new_tokens
        spec = lambda shape, dt: jax.ShapeDtypeStruct(  # noqa: E731
            shape, dt, sharding=shd.logical_sharding(mesh, (None, "batch", None)[:len(shape)]))
        batch = LearnBatch(
            tokens=spec((a, mb, tp + tn), jnp.int32), input_mask=spec((a, mb, tp + tn), bool),
            loss_mask=spec((a, mb, tn), bool), old_logp=spec((a, mb, tn), jnp.float32),
            advantages=spec((a, mb), jnp.float32),
            ref_logp=spec((a, mb, tn), jnp.float32) if cfg.rl.kl_beta > 0 else None)
        _, step = jit_learner(learner, state, mesh)
        run("learn", lambda: step.lower(state, batch))

    if "prefill" in programs or "decode" in programs:
        rep = shd.replicated(mesh)
        shards = shd.axis_size(mesh, "batch")
        prompts = cfg.prompts_per_rollout if s.decode_slots else (
            s.prompts_per_call or cfg.prompts_per_rollout)
        rows = lambda dt: jax.ShapeDtypeStruct(  # noqa: E731
            (-(-prompts // shards) * shards, sampler.prompt_width(tp)), dt,
            sharding=shd.logical_sharding(mesh, ("batch", None)))
        prompt_ids = jax.ShapeDtypeStruct((-(-prompts // shards) * shards,), jnp.int32,
                                          sharding=shd.logical_sharding(mesh, ("batch",)))
        # Without the tokenizer a stop string naming a special token (qwen_math's <|im_end|>)
        # is compiled as a table; the run makes it a stop id: one [V, len+1] int32 table more.
        stop_strings = STOP_STRINGS[cfg.data.template]
        plan = sampler.Plan(
            n=cfg.rl.group_size, max_new_tokens=s.max_new_tokens, greedy=s.temperature == 0,
            top_k=s.top_k, use_top_p=s.top_p < 1.0, stop_token_ids=(0,),
            num_stop_strings=len(stop_strings), mesh=mesh)
        abs_state.replace_by_pure_dict(params)
        abs_state = sampler.serving_state(abs_state, mesh, dtype)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        int_scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)  # the trainer's raw key
        tables = finals = None
        if stop_strings:
            longest = max(len(x.encode("utf-8")) for x in stop_strings)
            tables = jax.ShapeDtypeStruct((len(stop_strings), qconfig.vocab_size, longest + 1),
                                          jnp.int32, sharding=rep)
            finals = jax.ShapeDtypeStruct((len(stop_strings),), jnp.int32, sharding=rep)
        static = dict(graphdef=graphdef, plan=plan)
        if s.decode_slots:
            from r1zero_jax.sampling import continuous

            slots = -(-s.decode_slots // shards) * shards
            paging = {}
            if s.page_size:
                width = continuous.pages_per_slot(sampler.prompt_width(tp), s.max_new_tokens,
                                                  s.page_size)
                paging = dict(page_size=s.page_size, pages=continuous.pool_pages(
                    s.cache_pages, slots=slots, width=width, shards=shards))
            start = lambda: continuous.start.lower(  # noqa: E731
                abs_state, rows(jnp.int32), rows(bool), key, int_scalar, prompt_ids, slots=slots,
                **static, **paging)
            loop_fn = continuous.run
        else:
            start = lambda: sampler.prefill.lower(  # noqa: E731
                abs_state, rows(jnp.int32), rows(bool), key, prompt_ids, scalar, scalar, tables,
                finals, **static)
            loop_fn = sampler.decode
        lowered, compiled = run("prefill", start, resident_bytes=resident)
        if "decode" in programs:
            loop = shd.abstract(lowered.out_info, compiled.output_shardings)
            run("decode", lambda: loop_fn.lower(abs_state, loop, scalar, scalar, tables, finals,
                                                **static), resident_bytes=resident)
        if "prefill" not in programs:
            out.pop("prefill")
    return out
