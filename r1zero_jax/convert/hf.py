"""Hugging Face safetensors <-> r1zero-jax params for every model family, and loading a model
from either.

Our checkpoint (written by `convert_from_hf`) is a directory holding `r1zero_model.json`
(format marker + HF-style config), `params/` (Orbax), and the tokenizer / generation-config files
copied from the source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from r1zero_jax import dtypes, models, paths
from r1zero_jax import sharding as shd
from r1zero_jax.convert.safetensors_io import (FLOAT_DTYPES, SafetensorsFile,
                                               write_safetensors_streamed)
from r1zero_jax.models import DecoderConfig, eos_ids
from r1zero_jax.models.decoder import (abstract_model, check_mesh_fits, model_from_params,
                                       param_shardings, params_of)

MARKER = "r1zero_model.json"
FORMAT = "r1zero-jax-params"
# Files copied verbatim between HF directories and our checkpoints.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "generation_config.json",
              "chat_template.jinja")
MAX_SHARD_BYTES = 5 * 1024**3


# -- name and layout table -------------------------------------------------------------------
def _linear(n_in: int):
    """HF Linear weight [out, in] <-> ours [*in_dims, *out_dims] with n_in leading input dims."""
    to_ours = lambda w, shape: w.T.reshape(shape)  # noqa: E731
    to_hf = lambda w: w.reshape(math.prod(w.shape[:n_in]), -1).T  # noqa: E731
    return to_ours, to_hf


def _bias():
    return (lambda w, shape: w.reshape(shape), lambda w: w.reshape(-1))


def _ident():
    return (lambda w, shape: w.reshape(shape), lambda w: w)


_LAYOUTS = {"same": _ident, "linear": lambda: _linear(1), "linear2": lambda: _linear(2),
            "bias": _bias}

# HF names of the decoder's params, per family: (our path, HF name, layout, the config flag
# that must be on for the row to exist). Layer rows are under `layers.{i}` / `model.layers.{i}.`.
_LLAMA_STYLE_TOP = (
    (("embed",), "model.embed_tokens.weight", "same", None),
    (("final_norm", "weight"), "model.norm.weight", "same", None),
    (("lm_head",), "lm_head.weight", "linear", "untied"),
)
_LLAMA_STYLE_LAYER = (
    (("input_norm", "weight"), "input_layernorm.weight", "same", None),
    (("post_attn_norm", "weight"), "post_attention_layernorm.weight", "same", None),
    (("attn", "o_kernel"), "self_attn.o_proj.weight", "linear2", None),
    (("mlp", "gate_kernel"), "mlp.gate_proj.weight", "linear", None),
    (("mlp", "up_kernel"), "mlp.up_proj.weight", "linear", None),
    (("mlp", "down_kernel"), "mlp.down_proj.weight", "linear", None),
) + tuple(row for p in "qkv" for row in (
    (("attn", f"{p}_kernel"), f"self_attn.{p}_proj.weight", "linear", None),
    (("attn", f"{p}_bias"), f"self_attn.{p}_proj.bias", "bias", "qkv_bias"))) + (
    (("attn", "q_norm", "weight"), "self_attn.q_norm.weight", "same", "qk_norm"),
    (("attn", "k_norm", "weight"), "self_attn.k_norm.weight", "same", "qk_norm"),
)
# Qwen2, Qwen3 and Llama name their tensors alike; a family with other names adds its own.
WEIGHT_NAMES = {family: (_LLAMA_STYLE_TOP, _LLAMA_STYLE_LAYER)
                for family in ("qwen2", "qwen3", "llama")}


def weight_table(cfg: DecoderConfig) -> list[tuple[tuple, str, Callable, Callable]]:
    """(our state path, HF tensor name, hf->ours, ours->hf) for every parameter."""
    flags = {None: True, "untied": not cfg.tie_word_embeddings, "qkv_bias": cfg.qkv_bias,
             "qk_norm": cfg.qk_norm}
    top, layer = WEIGHT_NAMES[cfg.model_type]
    rows = [(path, name, *_LAYOUTS[layout]()) for path, name, layout, flag in top if flags[flag]]
    for i in range(cfg.num_layers):
        rows += [(("layers", i) + path, f"model.layers.{i}.{name}", *_LAYOUTS[layout]())
                 for path, name, layout, flag in layer if flags[flag]]
    return rows


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# -- paths: local or gs:// ---------------------------------------------------------------------
def is_our_checkpoint(path: str) -> bool:
    """Our params checkpoint or a training run's checkpoint directory (both carry MARKER)."""
    return paths.exists(paths.join(_ckpt_root(path), MARKER))


def _ckpt_root(path: str) -> str:
    """A step directory (`.../checkpoints/120`) belongs to the checkpoint directory above it."""
    path = str(path).rstrip("/")
    head, _, name = path.rpartition("/")
    if name.isdigit() and head and paths.exists(paths.join(head, MARKER)):
        return head
    return path


@contextlib.contextmanager
def _local_dir(path: str):
    """`path` itself when local; a temporary local copy of a gs:// directory's files."""
    if not paths.is_gcs(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="r1zero-") as tmp:
        for name in paths.listdir(path):
            if not paths.isdir(paths.join(path, name)):
                with paths.open_file(paths.join(path, name), "rb") as src, \
                        open(os.path.join(tmp, name), "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
        yield tmp


def _upload_dir(local: str, remote: str) -> None:
    for name in os.listdir(local):
        with open(os.path.join(local, name), "rb") as src, \
                paths.open_file(paths.join(remote, name), "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)


def _hf_tensor_files(hf_dir: str) -> dict[str, SafetensorsFile]:
    """tensor name -> the open file holding it (single file or sharded with an index)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is malformed ({e})") from None
        files = {fn: SafetensorsFile(os.path.join(hf_dir, fn)) for fn in set(weight_map.values())}
        return {name: files[fn] for name, fn in weight_map.items()}
    single = os.path.join(hf_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor "
                                "model.safetensors.index.json")
    f = SafetensorsFile(single)
    return {name: f for name in f.names()}


def read_hf_params(hf_dir: str, config: DecoderConfig, mesh: Mesh | None = None,
                   dtype=None) -> dict:
    """HF tensors -> our params as a nested dict, tensor by tensor.

    With a mesh, each tensor goes straight into its shards (the host holds one tensor at a time);
    without, numpy arrays. `dtype` casts (None keeps the stored dtype).
    """
    files = _hf_tensor_files(hf_dir)
    _check_no_unread_layer_tensors(hf_dir, files, config)
    abstract = nnx.state(abstract_model(config), nnx.Param).to_pure_dict()
    shardings = None
    if mesh is not None:
        check_mesh_fits(config, mesh)
        shardings = param_shardings(abstract_model(config), mesh).to_pure_dict()
    out: dict = {}
    for path, name, to_ours, _ in weight_table(config):
        shape = _get(abstract, path).shape
        if name not in files:
            raise ValueError(f"{hf_dir}: tensor {name!r} is missing from the safetensors files")
        f = files[name]
        if f.shape(name) != _hf_shape(path, shape):
            raise ValueError(f"{hf_dir}: tensor {name!r} has shape {f.shape(name)}, expected "
                             f"{_hf_shape(path, shape)}")
        # Integer bytes would load as "weights" and generate garbage; a float file mislabelled
        # I32 has exactly the right size, so only the label can tell.
        if f.dtype(name) not in FLOAT_DTYPES:
            raise ValueError(f"{hf_dir}: tensor {name!r} has dtype {f.dtype(name)}; model weights "
                             f"must be floating point ({', '.join(FLOAT_DTYPES)})")
        w = f.get(name)
        w = np.asarray(to_ours(w, shape))
        if dtype is not None:
            w = w.astype(dtype)
        if shardings is not None:
            s = _get(shardings, path)
            w = jax.make_array_from_callback(w.shape, s, lambda idx, w=w: w[idx])
        _set(out, path, w)
    return out


def _check_no_unread_layer_tensors(hf_dir: str, names, config: DecoderConfig) -> None:
    """A layer tensor the table does not read (a bias, a norm) means the config names another
    family or variant than the weights are: loading without it would give a wrong model."""
    read = {name for _, name, _, _ in weight_table(config)}
    unread = sorted(n for n in names if n.startswith("model.layers.") and n not in read
                    and not n.endswith("rotary_emb.inv_freq"))  # old checkpoints' RoPE cache
    if unread:
        raise ValueError(f"{hf_dir}: tensors {unread[:3]} ({len(unread)} in all) are not used by "
                         f"the {config.model_type!r} family's {type(config).__name__}; "
                         "does config.json name the right model_type?")


def _hf_shape(path, ours_shape):
    if path[-1] == "o_kernel":
        return (ours_shape[2], ours_shape[0] * ours_shape[1])
    if path[-1].endswith("kernel") or path[-1] == "lm_head":
        return (math.prod(ours_shape[1:]), ours_shape[0])
    if path[-1].endswith("bias"):
        return (math.prod(ours_shape),)
    return tuple(ours_shape)


# -- writing ----------------------------------------------------------------------------------
def _hf_tensor(params: dict, path, to_hf, dtype) -> np.ndarray:
    w = np.asarray(jax.device_get(_get(params, path)))
    w = to_hf(w)
    return np.ascontiguousarray(w.astype(dtype) if dtype is not None else w)


def params_dtype(params: dict) -> str:
    """'float32' or 'bfloat16': the params' floating dtype (the widest when they mix)."""
    kinds = {np.dtype(x.dtype) for x in jax.tree.leaves(params)}
    return "float32" if np.dtype(np.float32) in kinds or not kinds else "bfloat16"


def write_hf_dir(out_dir: str, params: dict, config: DecoderConfig, *, dtype: str | None = None,
                 base_hf_config: dict | None = None) -> None:
    """A directory that transformers' AutoModelForCausalLM.from_pretrained loads offline.

    `dtype` None keeps the params' own (see `params_dtype`). Tensors are converted and written
    one at a time, so the host holds the params plus one tensor. `base_hf_config` (the source's
    config.json) keeps fields we do not model, e.g. token ids.
    """
    dtype = dtypes.check(dtype or params_dtype(params), "dtype")
    np_dtype = dtypes.numpy_dtype(dtype)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**(base_hf_config or {}), **config.to_hf_dict(torch_dtype=dtype)}, f, indent=2)
    rows = {name: (path, to_hf) for path, name, _, to_hf in weight_table(config)}
    specs = {}
    for name, (path, _) in rows.items():
        ours = _get(params, path)
        specs[name] = (_hf_shape(path, ours.shape), np_dtype)
    shards, current, size = [], {}, 0
    for name, (shape, dt) in specs.items():
        nbytes = math.prod(shape) * dt.itemsize
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = (shape, dt)
        size += nbytes
    shards.append(current)
    produce = lambda name: _hf_tensor(params, *rows[name], np_dtype)  # noqa: E731
    if len(shards) == 1:
        write_safetensors_streamed(os.path.join(out_dir, "model.safetensors"), shards[0], produce)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streamed(os.path.join(out_dir, fn), shard, produce)
        weight_map.update({name: fn for name in shard})
    total = sum(math.prod(shape) * dt.itemsize for shape, dt in specs.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer / generation-config files that exist in `src` (local or gs://)."""
    copied = []
    for fn in SIDE_FILES:
        if paths.exists(paths.join(src, fn)):
            with paths.open_file(paths.join(src, fn), "rb") as f_in, \
                    paths.open_file(paths.join(dst, fn), "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
            copied.append(fn)
    return copied


# -- our checkpoint ---------------------------------------------------------------------------
def write_marker(directory: str, config: DecoderConfig, hf_config: dict | None = None) -> None:
    """Mark an Orbax checkpoint directory as holding this model's params (under `params`).

    The trainer writes it into its checkpoint directory too, so a run's checkpoints load with
    `load_model` and convert with `convert to-hf` directly.
    """
    paths.makedirs(directory)
    paths.write_text(paths.join(directory, MARKER), json.dumps(
        {"format": FORMAT, "version": 1, "config": {**(hf_config or {}), **config.to_hf_dict()}},
        indent=2))


def save_params(out_dir: str, params: dict, config: DecoderConfig,
                hf_config: dict | None = None) -> None:
    """Write our params checkpoint: one Orbax step (0) holding {"params"} plus the marker."""
    from r1zero_jax.checkpoint import Checkpointer

    # Orbax copies what it writes: one largest tensor's worth at a time (its limit must hold it)
    largest = max(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    with Checkpointer(out_dir, save_every=1, keep_last=1, async_save=False,
                      save_concurrent_gb=1.01 * largest / 1e9) as ckpt:
        if ckpt.latest_step() is not None:
            raise ValueError(f"{out_dir} already holds a checkpoint; choose an empty directory")
        ckpt.save(0, {"params": params}, {"format": FORMAT}, force=True)
        ckpt.wait()
    write_marker(out_dir, config, hf_config)


def read_hf_config_dict(path: str) -> dict:
    """The HF-style config dict of an HF directory or of our checkpoint."""
    ours = is_our_checkpoint(path)
    fn = paths.join(_ckpt_root(path), MARKER) if ours else paths.join(path, "config.json")
    try:
        d = json.loads(paths.read_text(fn))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} holds no config.json (not an HF model directory "
                                "nor an r1zero-jax checkpoint)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{fn} is not valid JSON: {e}") from None
    if ours:
        d = d.get("config") if isinstance(d, dict) else None
    if not isinstance(d, dict):
        raise ValueError(f"{fn} does not hold a JSON object with the model config")
    return d


def read_config(path: str) -> DecoderConfig:
    """The family config of an HF directory or our checkpoint. Its eos ids are those of
    config.json and of generation_config.json beside it (the ids generation stops on)."""
    config = models.config_from_hf(read_hf_config_dict(path))
    fn = paths.join(_ckpt_root(path) if is_our_checkpoint(path) else path,
                    "generation_config.json")
    if not paths.exists(fn):
        return config
    try:
        generation = json.loads(paths.read_text(fn))
    except json.JSONDecodeError as e:
        raise ValueError(f"{fn} is not valid JSON: {e}") from None
    ids = config.eos_token_ids + eos_ids(generation.get("eos_token_id"))
    return dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys(ids)))


# -- the two conversions and loading ----------------------------------------------------------
def convert_from_hf(hf_dir: str, out: str) -> None:
    with _local_dir(hf_dir) as local:
        hf_config = read_hf_config_dict(local)
        config = read_config(local)
        # Tensor by tensor into arrays of one CPU device, each memory-mapped tensor let go
        # after; with save_params' bounded writes the peak is about 1.2x the checkpoint.
        one_device = Mesh(np.asarray(jax.devices("cpu")[:1]).reshape(1, 1, 1),
                          ("data", "fsdp", "tensor"))
        params = read_hf_params(local, config, one_device)
        save_params(out, params, config, hf_config)
        copy_side_files(local, out)
    print(f"wrote {out} ({sum(np.size(x) for x in jax.tree.leaves(params)):,} params, "
          f"{params_dtype(params)})")


def convert_to_hf(ckpt: str, out: str, dtype: str | None = None) -> None:
    """Our checkpoint -> an HF directory, in `dtype` (None: the checkpoint's own, lossless)."""
    if not is_our_checkpoint(ckpt):
        raise ValueError(f"{ckpt} is not an r1zero-jax checkpoint (no {MARKER})")
    from r1zero_jax.checkpoint import restore_params

    hf_config = read_hf_config_dict(ckpt)
    config = read_config(ckpt)
    params = restore_params(ckpt)
    dtype = dtype or params_dtype(params)
    with tempfile.TemporaryDirectory(prefix="r1zero-") as tmp:
        local = tmp if paths.is_gcs(out) else out
        write_hf_dir(local, params, config, dtype=dtype, base_hf_config=hf_config)
        if paths.is_gcs(out):
            _upload_dir(local, out)
    copy_side_files(_ckpt_root(ckpt), out)
    print(f"wrote {out} ({dtype})")


def write_model_files(directory: str, config: DecoderConfig, source: str | None = None) -> None:
    """Makes `directory` (a run's checkpoints, its final model) a model path that loads like
    `source` (the HF directory or checkpoint it was trained from): the marker with the source's
    HF config, and the source's tokenizer files."""
    write_marker(directory, config, read_hf_config_dict(source) if source else None)
    if source:
        copy_side_files(_ckpt_root(source) if is_our_checkpoint(source) else source, directory)


def load_params(path: str, mesh: Mesh | None = None, dtype=None) -> tuple[dict, DecoderConfig]:
    """Params (nested dict) and config from an HF directory or our checkpoint (local or gs://)."""
    if not paths.isdir(path):
        raise FileNotFoundError(f"model path {path} does not exist")
    if is_our_checkpoint(path):
        from r1zero_jax.checkpoint import restore_params

        config = read_config(path)
        abstract = None  # numpy arrays as saved
        if mesh is not None:  # straight into their shards, in `dtype` (float32 by default)
            check_mesh_fits(config, mesh)
            model = abstract_model(config, param_dtype=dtype or jnp.float32)
            abstract = shd.abstract(params_of(model), param_shardings(model, mesh).to_pure_dict())
        params = restore_params(path, abstract)
        if dtype is not None and mesh is None:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        return params, config
    with _local_dir(path) as local:
        config = read_config(local)
        return read_hf_params(local, config, mesh, dtype=dtype), config


def load_model(path: str, mesh: Mesh, *, dtype=jnp.float32, param_dtype=None, remat=False):
    """(model, config, tokenizer or None) from an HF directory or our checkpoint."""
    params, config = load_params(path, mesh, dtype=param_dtype)
    state = nnx.state(abstract_model(config), nnx.Param)
    state.replace_by_pure_dict(params)
    model = model_from_params(config, state, dtype=dtype, remat=remat)
    return model, config, load_tokenizer(path)


def load_tokenizer(path: str):
    """The tokenizer saved beside a model (HF dir or our checkpoint, local or gs://), or None.

    transformers picks the tokenizer class from config.json's model type (Qwen2 ->
    Qwen2Tokenizer), and without one falls back to a generic class that may split text
    differently; our checkpoint carries the source's HF config in its marker instead, which is
    handed over here so both load the same tokenizer with the same settings.
    """
    ours = is_our_checkpoint(path)
    root = _ckpt_root(path) if ours else path
    if not any(paths.exists(paths.join(root, f)) for f in ("tokenizer.json", "vocab.json")):
        return None
    from transformers import AutoConfig, AutoTokenizer

    with _local_dir(root) as local:
        if not ours:
            return AutoTokenizer.from_pretrained(local)
        hf_config = read_hf_config_dict(path)
        return AutoTokenizer.from_pretrained(local, config=AutoConfig.for_model(**hf_config))

