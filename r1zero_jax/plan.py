"""Per-chip memory plan of a run, from abstract shapes and the mesh: nothing compiles or allocates.

Counts, per device, what lives in HBM during the two phases of an RL step and takes the larger:
  resident  params (param_dtype), AdamW mu + nu (optax keeps them in the params' dtype, so
            float32 with float32 master weights), a frozen reference copy when kl_beta > 0
  learn     gradients + the accumulation buffer, one layer's all-gathered weights (FSDP), and
            activations of one microbatch over prompt + max_new_tokens positions (naive
            attention keeps float32 scores [N, T, T]); with remat only each layer's input stays
            and one layer is recomputed at a time
            plus the LM head gathered over fsdp in the compute dtype and its float32 gradient,
            which XLA materialises whole (vocab-sharded over tensor only)
  sample    the sampler's copy of the weights in the compute dtype, the KV cache [L, B, S, K, H]
            of one sampler call (prompts_per_call x group_size sequences, S = prompt +
            max_new_tokens) in the compute dtype, the decode logits, and one layer's
            all-gathered weights (prefill); with continuous batching (sampling.decode_slots)
            the cache of the decode slots plus the prompt caches of the whole rollout, and
            `decode_slots_max`, the most slots that fit; with a paged cache
            (sampling.page_size) the slots' cache is the page pool, and `cache_pages_max` the
            most pages that fit beside the slots' logits
Estimates, not XLA's numbers: a plan "fits" when the peak stays under FIT_FRACTION of HBM, leaving
room for XLA's scratch buffers and fragmentation. `plan --compile` (compiled.py) replaces them
with XLA's own figures for the real programs; on the paper's recipes the learn phase estimate is
within about 10% of the compiled peak (BENCHMARKS.md).

Accelerator names: v4-N and v5p-N count TensorCores (2 per chip), so v4-64 is 32 chips and
v5p-128 is 64 chips; v5litepod-N (alias v5e-N) and v6e-N count chips (one TensorCore each), so
v5e-256 is 256 chips. Multi-host slices have 4 chips per worker VM (v5e/v6e slices of up to 8
chips are one VM).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any

from r1zero_jax import dtypes
from r1zero_jax.mesh_spec import parse_mesh_spec

GiB = 2**30
FIT_FRACTION = 0.9

# generation -> (HBM bytes per chip, TensorCores per chip in the accelerator name, default runtime)
_GENERATIONS = {
    "v4": (32 * GiB, 2, "tpu-ubuntu2204-base"),
    "v5p": (95 * GiB, 2, "v2-alpha-tpuv5"),
    "v5litepod": (16 * GiB, 1, "v2-alpha-tpuv5-lite"),
    "v6e": (32 * GiB, 1, "v2-alpha-tpuv6e"),
}
_ALIASES = {"v5e": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given to gcloud (--accelerator-type), or cpu-N
    generation: str
    chips: int  # JAX devices
    hosts: int  # worker VMs (processes)
    hbm_bytes: int  # per chip
    runtime_version: str = ""


def parse_topology(name: str) -> Topology:
    """'v4-64' -> 32 chips on 8 hosts, 32 GiB each; 'cpu-8' -> 8 host devices sharing RAM."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e|cpu)-(\d+)", name.strip().lower())
    if not m:
        raise ValueError(f"unknown TPU topology {name!r}: use v4-N, v5p-N, v5litepod-N (v5e-N), "
                         f"v6e-N or cpu-N, e.g. v4-64")
    gen, n = _ALIASES.get(m[1], m[1]), int(m[2])
    if gen == "cpu":
        if n < 1:
            raise ValueError(f"{name}: need at least one device")
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Topology(name, "cpu", n, 1, ram // n)
    hbm, cores, runtime = _GENERATIONS[gen]
    if cores == 2 and (n < 8 or n % 8):
        raise ValueError(f"{name}: {gen}-N counts TensorCores (2 per chip, 4 chips per host); "
                         f"N must be a multiple of 8, e.g. {gen}-8, {gen}-32, {gen}-64")
    if cores == 1 and n not in (1, 4, 8) and (n < 16 or n % 16):
        raise ValueError(f"{name}: {gen}-N counts chips; N is 1, 4, 8 or a multiple of 16")
    chips = n // cores
    hosts = 1 if chips <= (4 if cores == 2 else 8) else chips // 4
    return Topology(f"{gen}-{n}", gen, chips, hosts, hbm, runtime)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one RL step holds on the devices; batch sizes are global (all devices)."""

    train_batch: int  # sequences per forward/backward (train.microbatch_size)
    train_len: int  # prompt + response positions in the learner
    accumulation_steps: int  # microbatches per optimizer step (1: no accumulation buffer)
    sample_batch: int  # sequences per sampler call (prompts_per_call x group_size), or slots
    sample_len: int  # KV cache slots: prompt + max_new_tokens
    response_len: int  # positions whose logits the learner computes (max_new_tokens)
    logits_chunk: int = 0  # LM head over this many positions at once (0: all)
    remat: bool = False
    param_dtype: str = "float32"
    dtype: str = "bfloat16"  # compute dtype (activations, KV cache)
    reference_model: bool = False  # kl_beta > 0 keeps a frozen copy of the params
    rollout_sequences: int = 0  # sequences per RL step (for the token budget)
    prompt_cache_batch: int = 0  # continuous batching: prompts whose prefilled cache is kept
    prompt_len: int = 0  # their cache slots
    page_size: int = 0  # paged cache: tokens per page
    cache_pages: int = 0  # pages in the pool (all batch shards)


def _shards(logical: str | None, mesh: dict[str, int]) -> int:
    from r1zero_jax.sharding import axis_size

    return 1 if logical is None else axis_size(mesh, logical)


@functools.lru_cache(maxsize=16)
def param_leaves(config) -> tuple[tuple[str, tuple[int, ...], tuple[str | None, ...]], ...]:
    """(path, shape, logical axes) of every parameter, from the abstract model (no memory)."""
    import jax
    from flax import nnx

    from r1zero_jax.models.decoder import abstract_model

    state = nnx.state(abstract_model(config), nnx.Param)
    out = []
    for path, v in jax.tree_util.tree_leaves_with_path(
            state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        shape = tuple(v.get_value().shape)
        out.append((jax.tree_util.keystr(path), shape,
                    tuple(v.get_metadata().get("logical", (None,) * len(shape)))))
    return tuple(out)


def mesh_problems(config, mesh: dict[str, int], w: Workload | None = None) -> list[str]:
    """Dimensions the mesh cannot shard evenly (JAX would refuse them): the model's, by the
    same check the run makes (`decoder.mesh_problems`), and the workload's batches."""
    from r1zero_jax.models.decoder import mesh_problems as model_problems
    from r1zero_jax.sharding import axis_size

    if w is not None and not w.prompt_cache_batch:  # decode slots are rounded up instead
        dims_batch = {"train batch (train.microbatch_size)": w.train_batch,
                      "sampler batch (prompts_per_call x group_size)": w.sample_batch}
    else:
        dims_batch = {}
    shards = axis_size(mesh, "batch")
    return model_problems(config, mesh) + [
        f"{k}={v} is not divisible by data x fsdp = {shards}"
        for k, v in dims_batch.items() if v % shards]


def plan_memory(config, mesh: dict[str, int], w: Workload, hbm_bytes: int) -> dict[str, Any]:
    """The memory plan: per-device bytes by kind, the peak, and whether it fits `hbm_bytes`."""
    pb, cb = dtypes.BYTES[w.param_dtype], dtypes.BYTES[w.dtype]
    leaves = param_leaves(config)
    num_params = sum(math.prod(s) for _, s, _ in leaves)
    elems = sum(math.prod(s) // math.prod(_shards(a, mesh) for a in ax) for _, s, ax in leaves)
    layer_elems = sum(math.prod(s) for p, s, _ in leaves if p.startswith("['layers'][0]"))
    tensor = mesh.get("tensor", 1)
    batch_shards = _shards("batch", mesh)

    L, D, F = config.num_layers, config.hidden_size, config.intermediate_size
    N, K, H, V = config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size
    nt, kt, ft, vt = N / tensor, K / tensor, F / tensor, V / tensor

    params = elems * pb
    optimizer = 2 * elems * pb  # AdamW mu and nu, in the params' dtype
    reference = params if w.reference_model else 0
    gradients = elems * pb * (2 if w.accumulation_steps > 1 else 1)
    # FSDP all-gathers one layer at a time (tensor-sharded), cast to the compute dtype; XLA
    # prefetches the next, hence two. Without fsdp, weights stored in the compute dtype are used
    # where they lie: no copies (nor for the LM head, nor the sampler's serving weights).
    copies = mesh.get("fsdp", 1) > 1 or pb != cb
    gathered = 2 * layer_elems / tensor * cb if copies else 0

    b, t = w.train_batch / batch_shards, w.train_len
    # Saved for the backward pass per layer and token: norm outputs and residuals (4 D), q k v
    # and attention output ((N + 2K) H + N H), MLP gate, up and product (3 F); plus the float32
    # scores and compute-dtype probabilities [N, T, T] of the naive attention.
    per_token = cb * (4 * D + (nt + 2 * kt) * H + nt * H + 3 * ft)
    layer_act = b * t * per_token + b * nt * t * t * (4 + cb)
    chunk = min(w.logits_chunk or w.response_len, w.response_len)
    logits = 3 * b * chunk * vt * 4  # float32 logits, softmax and their gradient
    if not w.logits_chunk or w.logits_chunk >= w.response_len:
        logits += b * w.response_len * vt * 4  # unchunked: logits stay alive for the backward
    hidden = b * t * D * cb * 2  # final hidden states and their gradient
    head = V / tensor * D * ((cb if copies else 0) + 4)  # gathered LM head, its float32 gradient
    act_full = L * layer_act + logits + hidden + head
    act_remat = L * b * t * D * cb + layer_act + logits + hidden + head
    activations = act_remat if w.remat else act_full

    bs = w.sample_batch / batch_shards
    kv_token = 2 * L * kt * H * cb  # one cache slot of one row, k and v, every layer
    prompt_cache = w.prompt_cache_batch / batch_shards * w.prompt_len * kv_token
    page = w.page_size * kv_token  # one page, every layer, this device's kv heads
    slots_cache = (w.cache_pages / batch_shards * page if w.page_size
                   else bs * w.sample_len * kv_token)
    kv_cache = slots_cache + prompt_cache
    sample_logits = 2 * bs * vt * 4  # decode logits and the filtered distribution, float32

    # The optimizer update runs after the last microbatch: gradients plus an `updates` tree.
    learn = max(gradients + gathered + activations, gradients + elems * pb)
    serving = elems * cb if copies else 0  # sampler.serving_state: weights in the compute dtype
    sample = serving + kv_cache + sample_logits + gathered
    resident = params + optimizer + reference
    peak = resident + max(learn, sample)
    per_device = {
        "params": params, "optimizer": optimizer, "reference_params": reference,
        "gradients": gradients, "gathered_weights": gathered, "activations": activations,
        "activations_no_remat": act_full, "activations_remat": act_remat,
        "logits": logits, "kv_cache": kv_cache, "sample_logits": sample_logits,
        "serving_weights": serving,
        "learn_phase": resident + learn, "sample_phase": resident + sample, "peak": peak,
    }
    # Continuous batching: the most decode slots (a multiple of the batch shards) whose cache
    # and logits fit beside everything else of the sample phase; with pages, the most pages
    # that fit beside the configured slots' logits.
    room = FIT_FRACTION * hbm_bytes - resident - serving - gathered - prompt_cache
    per_slot = (w.sample_len * kv_token + 2 * vt * 4) / batch_shards
    slots_max = int(max(0, room) // per_slot) // batch_shards * batch_shards
    pages_max = (int(max(0, room - sample_logits) // page) * batch_shards if w.page_size
                 else 0)
    per_device = {k: int(round(v)) for k, v in per_device.items()}
    problems = mesh_problems(config, mesh, w)
    fits = not problems and peak <= FIT_FRACTION * hbm_bytes
    tokens = {
        "train_tokens_per_device_microbatch": int(b * t),
        "sample_tokens_per_device_call": int(slots_cache / kv_token),  # KV slots or pages
        "rollout_max_tokens": w.rollout_sequences * w.sample_len,
    }
    out = {"num_params": num_params, "mesh": dict(mesh), "per_device_bytes": per_device,
           "hbm_bytes": int(hbm_bytes), "fits": bool(fits), "mesh_problems": problems,
           "token_budget": tokens, "decode_slots_max": slots_max}
    if w.page_size:
        row = -(-w.sample_len // w.page_size)
        out["paged"] = {"page_size": w.page_size, "cache_pages": w.cache_pages,
                        "cache_pages_max": pages_max, "pages_per_row": row,
                        "full_rows_max": pages_max // row}
    out["advice"] = advice(out, w, hbm_bytes)
    return out


def advice(plan: dict, w: Workload, hbm_bytes: int) -> list[str]:
    """What to change, largest saving first, when the plan does not fit."""
    if plan["fits"]:
        return []
    d, tips = plan["per_device_bytes"], [f"mesh: {p}" for p in plan["mesh_problems"]]
    shards = _shards("batch", plan["mesh"])
    if w.train_batch % shards:
        tips.append(f"set train.microbatch_size={shards * -(-w.train_batch // shards)} (a multiple "
                    f"of data x fsdp = {shards}), or move chips from fsdp to tensor in mesh.spec")
    if w.sample_batch % shards:
        tips.append(f"make sampling.prompts_per_call x rl.group_size a multiple of {shards}")
    budget = FIT_FRACTION * hbm_bytes
    over = d["peak"] - budget
    if over <= 0:
        return tips
    if d["params"] + d["optimizer"] + d["reference_params"] > 0.6 * budget:
        tips.append("params + optimizer take most of HBM: raise fsdp (or tensor) in mesh.spec, "
                    "or use a larger slice")
    if d["learn_phase"] >= d["sample_phase"]:
        if not w.remat and d["activations_no_remat"] - d["activations_remat"] > 0:
            tips.append(f"set model.remat=True (saves "
                        f"{_gib(d['activations_no_remat'] - d['activations_remat'])})")
        if (not w.logits_chunk or w.logits_chunk > 512) and w.response_len > 512:
            tips.append("set train.logits_chunk=512 (the LM head over 512 positions at a time)")
        b = w.train_batch // max(1, _shards("batch", plan["mesh"]))
        if b > 1:
            tips.append(f"lower train.microbatch_size (now {w.train_batch}, {b} per device); "
                        "gradients accumulate over more microbatches")
    else:
        tips.append(f"lower sampling.prompts_per_call or sampling.decode_slots (KV cache "
                    f"{_gib(d['kv_cache'])} per device)")
    return tips


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


# -- RunConfig glue ----------------------------------------------------------------------------
def workload_from_config(cfg) -> Workload:
    s, rl = cfg.sampling, cfg.rl
    prompts = s.prompts_per_call or cfg.prompts_per_rollout
    length = cfg.data.max_prompt_tokens + s.max_new_tokens
    continuous = {}
    if s.decode_slots:
        continuous = dict(prompt_cache_batch=cfg.prompts_per_rollout,
                          prompt_len=cfg.data.max_prompt_tokens)
    if s.page_size:  # cache_pages 0: every slot at full length
        continuous.update(page_size=s.page_size,
                          cache_pages=s.cache_pages or s.decode_slots * -(-length // s.page_size))
    return Workload(
        train_batch=cfg.microbatch, train_len=length,
        accumulation_steps=cfg.train.minibatch_size // cfg.microbatch,
        sample_batch=s.decode_slots or prompts * rl.group_size, sample_len=length,
        response_len=s.max_new_tokens, **continuous,
        logits_chunk=cfg.train.logits_chunk, remat=cfg.model.remat,
        param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype,
        reference_model=rl.kl_beta > 0, rollout_sequences=rl.rollout_batch_size)


def model_config_of(cfg):
    """The architecture of a RunConfig: read from model.path (an HF config.json or our
    checkpoint, local or gs://) when that exists, else the preset or custom shape it names. A
    custom model without a vocab_size takes the tokenizer the run would load: the synthetic
    task's, or Qwen2.5's."""
    from r1zero_jax import paths
    from r1zero_jax.models import config_from_run

    if cfg.model.path and paths.exists(cfg.model.path):
        from r1zero_jax.convert.hf import read_config

        return read_config(cfg.model.path)
    if cfg.data.source == "synthetic":
        from r1zero_jax.data.synthetic import SyntheticTokenizer

        return config_from_run(cfg.model, len(SyntheticTokenizer()))
    from r1zero_jax.data.qwen_tokenizer import QWEN25_ADDED_TOKENS, FIRST_ADDED_ID

    return config_from_run(cfg.model, FIRST_ADDED_ID + len(QWEN25_ADDED_TOKENS))


def mesh_for_topology(spec: str, chips: int) -> tuple[dict[str, int], str]:
    """The config's mesh on `chips` devices. A mesh written for another slice keeps its data and
    tensor sizes and fsdp takes the rest (sharding params further is what a bigger slice is for);
    failing that, data takes the rest. The returned note says what changed."""
    try:
        return parse_mesh_spec(spec, chips), ""
    except ValueError:
        pass
    sizes = {k: max(v, 1) for k, v in parse_mesh_spec(spec).items()}
    for free in ("fsdp", "data"):
        fixed = math.prod(v for k, v in sizes.items() if k != free)
        if chips % fixed == 0:
            new = dict(sizes, **{free: chips // fixed})
            text = ",".join(f"{k}={v}" for k, v in new.items())
            return new, f"mesh {spec!r} adapted to {chips} chips as {text!r}"
    raise ValueError(f"mesh {spec!r} does not fit {chips} chips; pass --set mesh.spec=...")


def plan_config(cfg, topology: str | None = None) -> dict[str, Any]:
    """The plan of a RunConfig on a topology (default: the chips its mesh names, v4 assumed;
    cpu-N for configs with mesh.num_cpu_devices)."""
    if topology is None:
        if cfg.mesh.num_cpu_devices:
            topology = f"cpu-{cfg.mesh.num_cpu_devices}"
        else:
            sizes = parse_mesh_spec(cfg.mesh.spec)
            if -1 in sizes.values():
                raise ValueError(f"mesh.spec {cfg.mesh.spec!r} does not say how many chips; "
                                 "give --topology, e.g. v4-64")
            topology = f"v4-{2 * math.prod(sizes.values())}"
    topo = parse_topology(topology)
    mesh, note = mesh_for_topology(cfg.mesh.spec, topo.chips)
    w = workload_from_config(cfg)
    out = plan_memory(model_config_of(cfg), mesh, w, topo.hbm_bytes)
    out.update(config=cfg.name, topology=topo.name, chips=topo.chips, hosts=topo.hosts)
    from r1zero_jax import paths

    path = cfg.model.path
    out["model_source"] = (path if path and paths.exists(path) else f"preset {cfg.model.preset}"
                           + (f"; model.path {path} not found" if path else ""))
    if note:
        out["note"] = note
    if topo.generation == "cpu":
        out["host"] = host_memory(out, topo.chips)
    return out


# Host RAM of a CPU process besides the devices' arrays: Python, JAX and XLA's runtime, the
# tokenizer, and XLA:CPU compiling the run's programs (BENCHMARKS.md, "Host memory").
HOST_BASE_BYTES = int(1.5 * GiB)


def machine_ram() -> tuple[int, int]:
    """(total, available) bytes of this machine's RAM."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}
        return total, info.get("MemAvailable", total)
    except OSError:
        return total, total


def host_memory(plan: dict, devices: int) -> dict:
    """A CPU run's host RAM: its virtual devices all live in it, so every per-device figure
    (replicas, gathered weights) counts once per device, plus the process's own base."""
    total, available = machine_ram()
    peak = devices * plan["per_device_bytes"]["peak"] + HOST_BASE_BYTES
    return {"peak_bytes": int(peak), "ram_bytes": int(total), "available_bytes": int(available),
            "fits": bool(peak <= FIT_FRACTION * total)}


def host_warning(cfg) -> str | None:
    """A line to print before loading when a CPU run's plan needs more RAM than the machine has
    (None when it fits, or when the run is not on CPU)."""
    if not cfg.mesh.num_cpu_devices:
        return None
    try:
        h = plan_config(cfg).get("host")
    except (ValueError, FileNotFoundError):
        return None  # the trainer reports a bad config or path itself
    if h is None or h["peak_bytes"] <= h["available_bytes"]:
        return None
    return (f"warning: this run needs about {_gib(h['peak_bytes'])} of host RAM (r1zero-jax plan); "
            f"this machine has {_gib(h['ram_bytes'])}, {_gib(h['available_bytes'])} available: "
            "expect the OOM killer. Lower rl.rollout_batch_size, train.microbatch_size or "
            "sampling.max_new_tokens")


def format_plan(p: dict) -> str:
    d = p["per_device_bytes"]
    mesh = ", ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [f"{p.get('config', 'plan')} on {p.get('topology', '?')} ({p.get('chips', '?')} chips, "
             f"{p.get('hosts', '?')} host(s)), mesh {mesh}; {p['num_params']:,} params"
             + (f" ({p['model_source']})" if p.get("model_source") else "")]
    if p.get("note"):
        lines.append(f"  note: {p['note']}")
    lines.append("  per device:")
    for k in ("params", "optimizer", "reference_params", "gradients", "gathered_weights",
              "activations", "activations_no_remat", "activations_remat", "logits",
              "serving_weights", "kv_cache", "sample_logits", "learn_phase", "sample_phase",
              "peak"):
        lines.append(f"    {k:<22}{_gib(d[k]):>12}")
    tb = p["token_budget"]
    lines.append(f"  tokens: {tb['train_tokens_per_device_microbatch']:,} per device per "
                 f"microbatch, {tb['sample_tokens_per_device_call']:,} KV slots per device per "
                 f"sampler call, up to {tb['rollout_max_tokens']:,} per rollout")
    lines.append(f"  continuous batching: up to sampling.decode_slots={p['decode_slots_max']:,} "
                 "fit")
    if p.get("paged"):
        g = p["paged"]
        lines.append(f"  paged cache: {g['cache_pages']:,} pages of {g['page_size']} tokens; up "
                     f"to sampling.cache_pages={g['cache_pages_max']:,} fit ({g['full_rows_max']:,}"
                     f" rows at full length, {g['pages_per_row']} pages each; shorter rows share "
                     "the rest)")
    verdict = ("fits" if p["fits"] else "cannot run on this mesh" if p["mesh_problems"]
               else "does NOT fit")
    lines.append(f"  HBM {_gib(p['hbm_bytes'])} per chip: peak {_gib(d['peak'])} "
                 f"({d['peak'] / p['hbm_bytes']:.0%}) {verdict} (limit {FIT_FRACTION:.0%})")
    if p.get("host"):
        h = p["host"]
        lines.append(f"  host RAM (all {p['chips']} CPU devices + {_gib(HOST_BASE_BYTES)} for the "
                     f"process): about {_gib(h['peak_bytes'])} of {_gib(h['ram_bytes'])} "
                     f"({_gib(h['available_bytes'])} available) "
                     + ("fits" if h["peak_bytes"] <= h["available_bytes"] else "does NOT fit"))
    lines += [f"  - {t}" for t in p["advice"]]
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("jax", "libtpu"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def compile_plan(cfg, topology: str | None = None, printer=print) -> dict[str, Any]:
    """The run's programs compiled for `topology` (compiled.py): XLA's per-chip figures beside
    the analytic plan's. Fits when every program's peak (plus the resident training state it
    does not take as an argument) stays under FIT_FRACTION of HBM."""
    from r1zero_jax import compiled as comp
    from r1zero_jax.models.decoder import num_params
    from r1zero_jax.sharding import make_mesh

    analytic = plan_config(cfg, topology)
    topo = parse_topology(analytic["topology"])
    if analytic["mesh_problems"]:
        return {"topology": topo.name, "num_devices": topo.chips, "hbm_bytes": topo.hbm_bytes,
                "fits": False, "compiled": {}, "analytic": analytic,
                "advice": [f"mesh: {p}" for p in analytic["mesh_problems"]]}
    devices = comp.topology_devices(topo)
    spec = ",".join(f"{k}={v}" for k, v in analytic["mesh"].items())
    qc = model_config_of(cfg)
    programs = comp.compile_programs(cfg, qc, make_mesh(spec, devices), printer=printer)
    learn = programs["learn"]
    # Weight-gathering FSDP moves, per microbatch, the compute-dtype weights three times
    # (forward, remat forward, backward) and reduce-scatters the float32 gradients once; each
    # chip holds 1/tensor of every gathered weight.
    a = cfg.train.minibatch_size // cfg.microbatch
    moved = 3 * dtypes.BYTES[cfg.model.dtype] + dtypes.BYTES[cfg.model.param_dtype]
    ideal = a * num_params(qc) * moved / analytic["mesh"]["tensor"]
    learn["fsdp_ideal_bytes_per_step"] = int(ideal)
    learn["collective_ratio_to_ideal"] = round(learn["collective_bytes_per_step"] / ideal, 3)
    budget = FIT_FRACTION * topo.hbm_bytes
    over = {k: v["peak_bytes"] for k, v in programs.items() if v["peak_bytes"] > budget}
    tips = [f"{k}: peak {_gib(v)} is over {FIT_FRACTION:.0%} of HBM ({_gib(budget)})"
            for k, v in over.items()]
    if "learn" in over:
        tips.append("lower train.microbatch_size, set model.remat=True / train.logits_chunk=512, "
                    "or raise fsdp in mesh.spec")
    if over.keys() & {"prefill", "decode"}:
        tips.append("lower sampling.prompts_per_call or sampling.decode_slots (the KV cache of "
                    "the sampler)")
    if over and programs["learn"]["argument_bytes"] > 0.5 * budget:
        tips.append("params and optimizer state take most of HBM: raise fsdp or use a larger slice")
    return {"config": cfg.name, "topology": topo.name, "num_devices": topo.chips,
            "hbm_bytes": topo.hbm_bytes, "mesh": analytic["mesh"], "fits": not over,
            "compiled": programs, "analytic": analytic, "advice": tips, "versions": _versions()}


def format_compiled(p: dict) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items())
    v = p["versions"]
    a = p["analytic"]["per_device_bytes"]
    analytic = {"learn": a["learn_phase"], "prefill": a["sample_phase"],
                "decode": a["sample_phase"]}
    lines = [f"{p['config']} compiled for {p['topology']} ({p['num_devices']} chips), mesh {mesh}; "
             f"jax {v['jax']}, libtpu {v['libtpu']}",
             f"  {'program':<9}{'peak':>11}{'analytic':>11}{'args':>11}{'temp':>11}"
             f"{'collectives':>13}{'coll. bytes':>13}{'compile':>9}   (per chip, per step)"]
    for name, c in p["compiled"].items():
        lines.append(f"  {name:<9}{_gib(c['peak_bytes']):>11}{_gib(analytic[name]):>11}"
                     f"{_gib(c['argument_bytes']):>11}{_gib(c['temp_bytes']):>11}"
                     f"{c['collectives_per_step']:>13,}{_gib(c['collective_bytes_per_step']):>13}"
                     f"{c['compile_s']:>8.0f}s")
    learn = p["compiled"].get("learn")
    if learn:
        lines.append(f"  learner collectives: {learn['collective_ratio_to_ideal']:.2f}x the FSDP "
                     f"ideal ({_gib(learn['fsdp_ideal_bytes_per_step'])} per optimizer step)")
    for name, c in p["compiled"].items():
        top = ", ".join(f"{x['op']} {x['shape']} x{x['count']}"
                        for x in c["largest_collectives"][:3])
        lines.append(f"  largest in {name}: {top}")
    lines.append(f"  HBM {_gib(p['hbm_bytes'])} per chip: "
                 + ("fits" if p["fits"] else "does NOT fit") + f" (limit {FIT_FRACTION:.0%})")
    lines += [f"  - {t}" for t in p["advice"]]
    return "\n".join(lines)


def plan_cli(config_path: str, overrides=(), topology: str | None = None,
             as_json: bool = False, compile: bool = False) -> int:
    import sys

    from r1zero_jax.config import load_config

    cfg = load_config(config_path, list(overrides))
    if not compile:
        p = plan_config(cfg, topology)
        print(json.dumps(p, indent=2) if as_json else format_plan(p))
        return 0 if p["fits"] else 1
    # Compiling for a topology needs no TPU backend (and on a CPU host probing one is slow).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    progress = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if as_json else print
    try:
        p = compile_plan(cfg, topology, printer=progress)
    except RuntimeError as e:  # libtpu missing
        print(f"plan --compile: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=2) if as_json else format_compiled(p))
    return 0 if p["fits"] else 1
