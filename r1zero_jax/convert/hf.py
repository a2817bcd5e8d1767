"""Hugging Face Qwen2 safetensors <-> r1zero-jax params, and loading a model from either.

Our checkpoint (written by `convert_from_hf`) is a directory holding `r1zero_model.json`
(format marker + HF-style config), `params/` (Orbax), and the tokenizer / generation-config files
copied from the source.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from r1zero_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from r1zero_jax.models.qwen2 import (QwenConfig, Qwen2, abstract_model, check_mesh_fits,
                                     model_from_params, param_shardings)

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


def weight_table(cfg: QwenConfig) -> list[tuple[tuple, str, Callable, Callable]]:
    """(our state path, HF tensor name, hf->ours, ours->hf) for every parameter."""
    ident = (lambda w, shape: w.reshape(shape), lambda w: w)
    rows = [(("embed",), "model.embed_tokens.weight", *ident),
            (("final_norm", "weight"), "model.norm.weight", *ident)]
    if not cfg.tie_word_embeddings:
        rows.append((("lm_head",), "lm_head.weight", *_linear(1)))
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        lay = ("layers", i)
        rows += [
            (lay + ("input_norm", "weight"), pre + "input_layernorm.weight", *ident),
            (lay + ("post_attn_norm", "weight"), pre + "post_attention_layernorm.weight", *ident),
            (lay + ("attn", "o_kernel"), pre + "self_attn.o_proj.weight", *_linear(2)),
            (lay + ("mlp", "gate_kernel"), pre + "mlp.gate_proj.weight", *_linear(1)),
            (lay + ("mlp", "up_kernel"), pre + "mlp.up_proj.weight", *_linear(1)),
            (lay + ("mlp", "down_kernel"), pre + "mlp.down_proj.weight", *_linear(1)),
        ]
        for p in "qkv":
            rows += [
                (lay + ("attn", f"{p}_kernel"), pre + f"self_attn.{p}_proj.weight", *_linear(1)),
                (lay + ("attn", f"{p}_bias"), pre + f"self_attn.{p}_proj.bias", *_bias()),
            ]
    return rows


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# -- reading HF directories -------------------------------------------------------------------
def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not is_our_checkpoint(path)


def is_our_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


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


def read_hf_params(hf_dir: str, config: QwenConfig, mesh: Mesh | None = None,
                   dtype=None) -> dict:
    """HF tensors -> our params as a nested dict, tensor by tensor.

    With a mesh, each tensor goes straight into its shards (the host holds one tensor at a time);
    without, numpy arrays. `dtype` casts (None keeps the stored dtype).
    """
    files = _hf_tensor_files(hf_dir)
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
        w = f.get(name)
        w = np.asarray(to_ours(w, shape))
        if dtype is not None:
            w = w.astype(dtype)
        if shardings is not None:
            s = _get(shardings, path)
            w = jax.make_array_from_callback(w.shape, s, lambda idx, w=w: w[idx])
        _set(out, path, w)
    return out


def _hf_shape(path, ours_shape):
    if path[-1] == "o_kernel":
        return (ours_shape[2], ours_shape[0] * ours_shape[1])
    if path[-1].endswith("kernel") or path[-1] == "lm_head":
        return (math.prod(ours_shape[1:]), ours_shape[0])
    if path[-1].endswith("bias"):
        return (math.prod(ours_shape),)
    return tuple(ours_shape)


# -- writing ----------------------------------------------------------------------------------
def params_to_hf_tensors(params: dict, config: QwenConfig, dtype=None) -> dict[str, np.ndarray]:
    """Our params (nested dict, arrays anywhere) -> {HF name: numpy array}."""
    out = {}
    for path, name, _, to_hf in weight_table(config):
        w = np.asarray(jax.device_get(_get(params, path)))
        w = np.ascontiguousarray(to_hf(w))
        out[name] = w.astype(dtype) if dtype is not None else w
    return out


def write_hf_dir(out_dir: str, params: dict, config: QwenConfig, *, dtype: str = "bfloat16",
                 side_files_from: str | None = None, base_hf_config: dict | None = None) -> None:
    """A directory that transformers' AutoModelForCausalLM.from_pretrained loads offline.

    `base_hf_config` (the source's config.json) keeps fields we do not model, e.g. token ids.
    """
    np_dtype = {"bfloat16": jnp.bfloat16, "float32": np.float32}[dtype]
    os.makedirs(out_dir, exist_ok=True)
    tensors = params_to_hf_tensors(params, config, np.dtype(np_dtype))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**(base_hf_config or {}), **config.to_hf_dict(torch_dtype=dtype)}, f, indent=2)
    shards, current, size = [], {}, 0
    for name, w in tensors.items():
        if current and size + w.nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = w
        size += w.nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(out_dir, fn), shard)
            weight_map.update({name: fn for name in shard})
        index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
                 "weight_map": weight_map}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    if side_files_from:
        copy_side_files(side_files_from, out_dir)


def copy_side_files(src: str, dst: str) -> list[str]:
    copied = []
    for fn in SIDE_FILES:
        if os.path.isfile(os.path.join(src, fn)):
            shutil.copyfile(os.path.join(src, fn), os.path.join(dst, fn))
            copied.append(fn)
    return copied


# -- our checkpoint ---------------------------------------------------------------------------
def save_params(out_dir: str, params: dict, config: QwenConfig,
                hf_config: dict | None = None) -> None:
    """Write our params checkpoint (Orbax) with its config marker (HF config.json fields)."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, "params"), params, force=True)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        json.dump({"format": FORMAT, "version": 1,
                   "config": {**(hf_config or {}), **config.to_hf_dict()}}, f, indent=2)


def restore_params(ckpt_dir: str, config: QwenConfig, mesh: Mesh | None = None) -> dict:
    """Our params checkpoint -> nested dict of arrays (sharded on `mesh` when given)."""
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.abspath(ckpt_dir)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(os.path.join(ckpt_dir, "params"))
        tree = getattr(meta, "item_metadata", meta)
        if mesh is None:
            return _int_keys(ckptr.restore(os.path.join(ckpt_dir, "params")))
        shardings = param_shardings(abstract_model(config), mesh).to_pure_dict()
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                              _int_keys(tree), shardings)
        return _int_keys(ckptr.restore(os.path.join(ckpt_dir, "params"), target))


def _int_keys(tree):
    """Orbax metadata names list items by string; our params use int layer keys."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
                for k, v in tree.items()}
    return tree


def read_hf_config_dict(path: str) -> dict:
    """The HF-style config dict of an HF directory or of our checkpoint."""
    fn = os.path.join(path, MARKER if is_our_checkpoint(path) else "config.json")
    try:
        with open(fn) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} holds no config.json (not an HF model directory "
                                "nor an r1zero-jax checkpoint)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{fn} is not valid JSON: {e}") from None
    if is_our_checkpoint(path):
        d = d.get("config") if isinstance(d, dict) else None
    if not isinstance(d, dict):
        raise ValueError(f"{fn} does not hold a JSON object with the model config")
    return d


def read_config(path: str) -> QwenConfig:
    return QwenConfig.from_hf_dict(read_hf_config_dict(path))


# -- the two conversions and loading ----------------------------------------------------------
def convert_from_hf(hf_dir: str, out: str) -> None:
    hf_config = read_hf_config_dict(hf_dir)
    config = QwenConfig.from_hf_dict(hf_config)
    params = read_hf_params(hf_dir, config)
    save_params(out, params, config, hf_config)
    copy_side_files(hf_dir, out)
    print(f"wrote {out} ({sum(np.size(x) for x in jax.tree.leaves(params)):,} params)")


def convert_to_hf(ckpt: str, out: str, dtype: str = "bfloat16") -> None:
    if not is_our_checkpoint(ckpt):
        raise ValueError(f"{ckpt} is not an r1zero-jax checkpoint (no {MARKER})")
    hf_config = read_hf_config_dict(ckpt)
    config = QwenConfig.from_hf_dict(hf_config)
    write_hf_dir(out, restore_params(ckpt, config), config, dtype=dtype, side_files_from=ckpt,
                 base_hf_config=hf_config)
    print(f"wrote {out} ({dtype})")


def load_params(path: str, mesh: Mesh | None = None, dtype=None) -> tuple[dict, QwenConfig]:
    """Params (nested dict) and config from an HF directory or our checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path} does not exist")
    config = read_config(path)
    if is_our_checkpoint(path):
        params = restore_params(path, config, mesh)
        if dtype is not None:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        return params, config
    return read_hf_params(path, config, mesh, dtype=dtype), config


def load_model(path: str, mesh: Mesh, *, dtype=jnp.float32, param_dtype=None, remat=False):
    """(model, config, tokenizer or None) from an HF directory or our checkpoint."""
    params, config = load_params(path, mesh, dtype=param_dtype)
    state = nnx.state(abstract_model(config), nnx.Param)
    state.replace_by_pure_dict(params)
    model = model_from_params(config, state, dtype=dtype, remat=remat)
    return model, config, load_tokenizer(path)


def load_tokenizer(path: str):
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def model_params(model: Qwen2) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()
