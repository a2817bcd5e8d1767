"""Run configuration: typed frozen dataclasses, `configs/*.py` loading, `--set` overrides.

No JAX import here: the CLI reads the config (including how many virtual CPU devices it wants)
before JAX starts.

A run config is a Python file defining `def config() -> RunConfig`. Overrides are `a.b=value`
strings, parsed and type-checked against the dataclass field they name.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from r1zero_jax import dtypes, models
from r1zero_jax.mesh_spec import parse_mesh_spec
from r1zero_jax.rewards.templates import TEMPLATES

# Vocabulary of the RL room; rl/losses.py registers one implementation per name (a test checks).
LOSS_NAMES = ("dr_grpo", "grpo")
# "" keeps the loss's own aggregation; "token_mean" is DAPO's mean over all tokens of the batch.
AGGREGATIONS = ("", "token_mean")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and initial weights. `preset` names a published shape of any family
    (`models.preset_names()`), or "custom" for the fields below in `family` (an HF model_type of
    `models.FAMILIES`); `path` (HF dir or r1zero-jax checkpoint) loads weights (and its
    architecture), "" initialises randomly."""

    preset: str = "qwen2.5-math-1.5b"
    family: str = "qwen2"  # a custom model's family
    path: str = ""  # a local directory on every host (e.g. an HF snapshot of the base model)
    vocab_size: int = 0  # 0: the tokenizer's size (custom models)
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights
    remat: bool = False  # recompute each layer's activations in the backward pass
    init_seed: int = 0


@dataclass(frozen=True)
class MeshConfig:
    """`spec` as for `sharding.make_mesh` ("data=4,tensor=2"; -1 takes the remaining devices)."""

    spec: str = "data=-1"
    num_cpu_devices: int = 0  # >0: ask XLA for this many virtual CPU devices (before JAX starts)


@dataclass(frozen=True)
class DataConfig:
    """`source`: "synthetic" (built-in addition task), "jsonl:PATH" (rows with problem/answer),
    or a dataset name of `r1zero_jax.data`."""

    source: str = "math_lvl3to5_8k"
    template: str = "qwen_math"
    # "math", or the import spec of a tasks.Task subclass ("my_tasks.py:Countdown")
    task: str = "math"
    max_prompt_tokens: int = 512
    data_dir: str = ""
    seed: int = 0


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 3000
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    prompts_per_call: int = 0  # prompts per sampler call (0: the whole rollout at once)
    # > 0: continuous batching, this many decode slots over the whole rollout (a slot takes the
    # next row as soon as its row ends); prompts_per_call is then unused. 0: static calls.
    decode_slots: int = 0
    # > 0 (with decode_slots): the slots' KV cache is a pool of pages of this many tokens, and
    # attention reads only the filled pages (models/paged.py). 0: a dense [Tp + M] cache per slot.
    page_size: int = 0
    # pages in the pool, over all batch shards (0: every slot at full length, never preempting);
    # fewer pages hold more slots in the same memory: when they run out, the youngest rows are
    # preempted and decoded again later, with the same tokens. `plan` sizes it.
    cache_pages: int = 0


@dataclass(frozen=True)
class RLConfig:
    loss: str = "dr_grpo"
    aggregation: str = ""
    group_size: int = 8  # G responses per prompt
    rollout_batch_size: int = 1024  # sequences per rollout (prompts = rollout_batch_size / G)
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_beta: float = 0.0  # > 0 keeps a frozen reference model for a k3 KL penalty
    mask_truncated: bool = False  # leave responses cut at max_new_tokens out of the loss
    epochs_per_rollout: int = 1  # passes over the rollout's minibatches


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # global-norm clip; 0 disables
    warmup_steps: int = 0  # linear warm-up (optimizer steps), then constant


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # RL steps (one rollout each)
    minibatch_size: int = 128  # sequences per optimizer step
    microbatch_size: int = 0  # sequences per forward/backward (0: the minibatch); accumulates
    logits_chunk: int = 0  # LM head over T in chunks of this many positions (0: all at once)
    seed: int = 0
    # Supervised warm-up making a weak base model (synthetic task only): skill steps on worked
    # answers, then habit steps on the task's style mix, where guessing dominates.
    warmup_sft_steps: int = 0
    warmup_sft_habit_steps: int = 100
    warmup_sft_lr: float = 3e-3
    warmup_sft_batch: int = 32


@dataclass(frozen=True)
class EvalConfig:
    """Greedy evaluation every `every` steps (0: only before and after training)."""

    source: str = ""  # like DataConfig.source; "" disables evaluation
    size: int = 0  # problems (0: all)
    every: int = 0
    max_new_tokens: int = 0  # 0: sampling.max_new_tokens
    batch_size: int = 64


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # RL steps between saves (0: only at the end)
    keep_last: int = 2
    keep_every: int = 0  # also keep every k-th step forever (0: none)
    async_save: bool = True
    directory: str = ""  # "": WORKDIR/checkpoints; may be gs://


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = True
    plot: bool = True


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def prompts_per_rollout(self) -> int:
        return self.rl.rollout_batch_size // self.rl.group_size

    @property
    def microbatch(self) -> int:
        return self.train.microbatch_size or self.train.minibatch_size


# ---------------------------------------------------------------------------------------------
# Fields, overrides, dict round trip


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def leaf_keys(cfg=None, prefix: str = "") -> list[str]:
    """Every overridable dotted key of a RunConfig ("rl.loss", "optim.learning_rate", ...)."""
    cfg = RunConfig() if cfg is None else cfg
    cls = type(cfg)
    keys = []
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys += leaf_keys(getattr(cfg, f.name), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _coerce(value, t, key: str):
    """`value` (a --set string or a JSON value) as type `t`, or a ValueError naming the field."""
    bad = ValueError(f"--set {key}={value!r}: expected {_type_name(t)}")
    origin = typing.get_origin(t)
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if t is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise bad from None
    if t is float:
        if isinstance(value, bool):
            raise bad
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad from None
        return out
    if t is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is tuple:
        if isinstance(value, str):
            try:
                value = ast.literal_eval(
                    value if value.strip().startswith(("(", "[")) else f"({value},)")
            except (ValueError, SyntaxError):
                raise bad from None
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(t)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise bad
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=False))
    raise ValueError(f"--set {key}: fields of type {_type_name(t)} cannot be overridden")


def _replace_path(cfg, path: list[str], value, full_key: str):
    cls = type(cfg)
    name = path[0]
    t = _hints(cls)[name]
    if len(path) == 1:
        if dataclasses.is_dataclass(t):
            raise ValueError(f"--set {full_key}: {full_key} is a section; set one of its fields")
        return dataclasses.replace(cfg, **{name: _coerce(value, t, full_key)})
    inner = _replace_path(getattr(cfg, name), path[1:], value, full_key)
    return dataclasses.replace(cfg, **{name: inner})


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`cfg` with each "a.b=value" applied; unknown keys and wrong types raise ValueError."""
    valid = leaf_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip()
        fields = [k for k in valid if k.startswith(key + ".")]
        if fields:
            raise ValueError(f"--set {key}: {key} is a section; set one of its fields: "
                             f"{', '.join(fields)}")
        if key not in valid:
            raise ValueError(f"--set: unknown key {key!r}; valid keys are: {', '.join(valid)}")
        cfg = _replace_path(cfg, key.split("."), value, key)
    return cfg


def to_dict(cfg) -> dict:
    """Plain JSON-able dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict, cls=RunConfig):
    """Inverse of `to_dict`; unknown keys raise (a stored config from another version shows)."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        kwargs[k] = from_dict(v, t) if dataclasses.is_dataclass(t) else _coerce(v, t, k)
    return cls(**kwargs)


def diff(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ, as "key: a -> b"."""

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield prefix + k, v

    fa, fb = dict(flat(to_dict(a))), dict(flat(to_dict(b)))
    return [f"{k}: {fa[k]!r} -> {fb.get(k)!r}" for k in fa if fa[k] != fb.get(k)]


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class Range:
    """An allowed interval of a numeric field; `str` writes it as [lo, hi) etc."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below

    def __str__(self) -> str:
        lo = "-inf" if self.lo == -math.inf else f"{self.lo:g}"
        hi = "inf" if self.hi == math.inf else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo == -math.inf else '['}{lo}, {hi}" \
               f"{')' if self.hi_open or self.hi == math.inf else ']'}"


_NONNEG, _POS_INT = Range(0), Range(1)
_POS = Range(0, lo_open=True)
_UNIT_OPEN = Range(0, 1, hi_open=True)

# Every int and float leaf of RunConfig (a test checks none is missing). Checked before any
# model, dataset or device work: a bad number found after loading a 7B model costs minutes.
RANGES: dict[str, Range] = {
    "model.vocab_size": _NONNEG, "model.hidden_size": _POS_INT,
    "model.intermediate_size": _POS_INT, "model.num_layers": _POS_INT,
    "model.num_heads": _POS_INT, "model.num_kv_heads": _POS_INT, "model.head_dim": _POS_INT,
    "model.rope_theta": _POS, "model.rms_norm_eps": _POS,
    "model.max_position_embeddings": _POS_INT, "model.init_seed": _NONNEG,
    "mesh.num_cpu_devices": _NONNEG,
    "data.max_prompt_tokens": _POS_INT, "data.seed": _NONNEG,
    "sampling.max_new_tokens": _POS_INT, "sampling.temperature": _NONNEG,
    "sampling.top_p": Range(0, 1, lo_open=True), "sampling.top_k": _NONNEG,
    "sampling.prompts_per_call": _NONNEG, "sampling.decode_slots": _NONNEG,
    "sampling.page_size": _NONNEG, "sampling.cache_pages": _NONNEG,
    "rl.group_size": Range(2), "rl.rollout_batch_size": _POS_INT, "rl.clip_low": _UNIT_OPEN,
    "rl.clip_high": _NONNEG, "rl.kl_beta": _NONNEG, "rl.epochs_per_rollout": _POS_INT,
    "optim.learning_rate": _NONNEG, "optim.b1": _UNIT_OPEN, "optim.b2": _UNIT_OPEN,
    "optim.eps": _NONNEG, "optim.weight_decay": _NONNEG, "optim.clip_norm": _NONNEG,
    "optim.warmup_steps": _NONNEG,
    "train.steps": _NONNEG, "train.minibatch_size": _POS_INT, "train.microbatch_size": _NONNEG,
    "train.logits_chunk": _NONNEG, "train.seed": _NONNEG, "train.warmup_sft_steps": _NONNEG,
    "train.warmup_sft_habit_steps": _NONNEG, "train.warmup_sft_lr": _POS,
    "train.warmup_sft_batch": _POS_INT,
    "eval.size": _NONNEG, "eval.every": _NONNEG, "eval.max_new_tokens": _NONNEG,
    "eval.batch_size": _POS_INT,
    "checkpoint.every": _NONNEG, "checkpoint.keep_last": _POS_INT, "checkpoint.keep_every": _NONNEG,
}


def _get_key(cfg, key: str):
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


def _check_ranges(cfg: RunConfig) -> None:
    for key, allowed in RANGES.items():
        v = _get_key(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{key}={v!r}: expected a number in {allowed}")
        if not math.isfinite(v):
            raise ValueError(f"{key}={v!r}: must be a finite number in {allowed}")
        if v not in allowed:
            raise ValueError(f"{key}={v!r} is out of range; allowed: {allowed}")


def validate(cfg: RunConfig, num_devices: int | None = None) -> RunConfig:
    """Raise ValueError naming the first problem (key, value, allowed values); `num_devices`
    enables the mesh checks."""
    _check_ranges(cfg)
    rl, tr = cfg.rl, cfg.train
    if rl.loss not in LOSS_NAMES:
        raise ValueError(f"rl.loss: unknown loss {rl.loss!r}; choose one of {list(LOSS_NAMES)}")
    if rl.aggregation not in AGGREGATIONS:
        raise ValueError(f"rl.aggregation: unknown {rl.aggregation!r}; "
                         f"choose one of {list(AGGREGATIONS)}")
    if cfg.data.template not in TEMPLATES:
        raise ValueError(f"data.template: unknown template {cfg.data.template!r}; "
                         f"choose one of {sorted(TEMPLATES)}")
    for key in ("model.dtype", "model.param_dtype"):
        dtypes.check(getattr(cfg.model, key.split(".")[1]), key)
    if rl.rollout_batch_size % rl.group_size:
        raise ValueError(f"rl.rollout_batch_size={rl.rollout_batch_size} is not divisible by "
                         f"rl.group_size={rl.group_size}")
    if rl.rollout_batch_size % tr.minibatch_size:
        raise ValueError(f"rl.rollout_batch_size={rl.rollout_batch_size} is not divisible by "
                         f"train.minibatch_size={tr.minibatch_size}")
    if tr.minibatch_size % cfg.microbatch:
        raise ValueError(f"train.minibatch_size={tr.minibatch_size} is not divisible by "
                         f"train.microbatch_size={cfg.microbatch}")
    if cfg.sampling.prompts_per_call and cfg.prompts_per_rollout % cfg.sampling.prompts_per_call:
        raise ValueError(f"rollout prompts ({cfg.prompts_per_rollout}) not divisible by "
                         f"sampling.prompts_per_call={cfg.sampling.prompts_per_call}")
    s = cfg.sampling
    if s.page_size and not s.decode_slots:
        raise ValueError(f"sampling.page_size={s.page_size} pages the cache of continuous "
                         "batching: set sampling.decode_slots too")
    if s.cache_pages and not s.page_size:
        raise ValueError(f"sampling.cache_pages={s.cache_pages} needs sampling.page_size > 0")
    if cfg.data.task != "math":
        from r1zero_jax.plugins import check_spec

        check_spec(cfg.data.task, "data.task")
    if tr.warmup_sft_steps and cfg.data.source != "synthetic" and cfg.data.task == "math":
        raise ValueError("train.warmup_sft_steps: the math task's warm-up is for "
                         "data.source='synthetic' only")
    key, check = (("model.family", models.family_for) if cfg.model.preset == "custom"
                  else ("model.preset", models.preset))
    try:
        check(getattr(cfg.model, key.split(".")[1]))
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    if cfg.model.preset == "custom":
        m = cfg.model
        if m.num_heads % m.num_kv_heads:
            raise ValueError(f"model.num_heads={m.num_heads} must be a multiple of "
                             f"model.num_kv_heads={m.num_kv_heads}")
        longest = cfg.data.max_prompt_tokens + max(cfg.sampling.max_new_tokens,
                                                   cfg.eval.max_new_tokens)
        if longest > m.max_position_embeddings:
            raise ValueError(f"data.max_prompt_tokens + max_new_tokens = {longest} exceeds "
                             f"model.max_position_embeddings={m.max_position_embeddings}")
        if m.vocab_size and cfg.sampling.top_k > m.vocab_size:
            raise ValueError(f"sampling.top_k={cfg.sampling.top_k} exceeds "
                             f"model.vocab_size={m.vocab_size}")
    if cfg.checkpoint.keep_every and cfg.checkpoint.every \
            and cfg.checkpoint.keep_every % cfg.checkpoint.every:
        raise ValueError(f"checkpoint.keep_every={cfg.checkpoint.keep_every} is not a multiple of "
                         f"checkpoint.every={cfg.checkpoint.every}: those steps are never saved")
    if num_devices is None and cfg.mesh.num_cpu_devices:
        num_devices = cfg.mesh.num_cpu_devices
    sizes = parse_mesh_spec(cfg.mesh.spec, num_devices)
    batch_shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
    if batch_shards > 0:  # -1 when still unknown
        sizes_to_check = [("rl.rollout_batch_size", rl.rollout_batch_size),
                          ("train.microbatch_size", cfg.microbatch)]
        if cfg.eval.source:
            sizes_to_check.append(("eval.batch_size", cfg.eval.batch_size))
        for key, n in sizes_to_check:
            if n % batch_shards:
                raise ValueError(f"{key}={n} is not divisible by the data axis "
                                 f"(data x fsdp = {batch_shards} in mesh {cfg.mesh.spec!r})")
        if s.cache_pages:  # each batch shard's pool must hold one longest row
            row = -(-(cfg.data.max_prompt_tokens + s.max_new_tokens) // s.page_size)
            if s.cache_pages // batch_shards < row:
                raise ValueError(
                    f"sampling.cache_pages={s.cache_pages} leaves {s.cache_pages // batch_shards} "
                    f"pages per batch shard (data x fsdp = {batch_shards}); a row of "
                    f"data.max_prompt_tokens + sampling.max_new_tokens needs {row} pages of "
                    f"{s.page_size}: set at least {row * batch_shards}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading configs/*.py


def configs_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(path_or_name: str) -> Path:
    """A file path, or a name looked up in ./configs and the project's configs/."""
    candidates = [Path(path_or_name)]
    if not path_or_name.endswith(".py"):
        candidates += [Path("configs") / f"{path_or_name}.py", configs_dir() / f"{path_or_name}.py"]
    for c in candidates:
        if c.is_file():
            return c
    names = sorted(p.stem for p in configs_dir().glob("*.py") if not p.stem.startswith("_"))
    raise FileNotFoundError(f"config {path_or_name!r} not found; known configs: {names}")


def load_config(path_or_name: str, overrides: list[str] = (),
                num_devices: int | None = None) -> RunConfig:
    """Run `config()` of a configs/*.py file, apply `--set` overrides, validate."""
    path = resolve_config_path(path_or_name)
    spec = importlib.util.spec_from_file_location(f"r1zero_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "config", None)):
        raise ValueError(f"{path}: a config file must define `def config() -> RunConfig`")
    cfg = module.config()
    if not isinstance(cfg, RunConfig):
        raise ValueError(f"{path}: config() returned {type(cfg).__name__}, expected RunConfig")
    if cfg.name == RunConfig.name:
        cfg = dataclasses.replace(cfg, name=path.stem)
    return validate(apply_overrides(cfg, list(overrides)), num_devices)


def config_name(path_or_name: str) -> str:
    return os.path.splitext(os.path.basename(path_or_name))[0]
