"""HF safetensors <-> r1zero-jax checkpoint conversion, both ways, and its errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1zero_jax import cli
from r1zero_jax.convert import hf as conv
from r1zero_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from r1zero_jax.models.decoder import params_of, positions_from_mask
from r1zero_jax.sharding import make_mesh
from hf_models import hf_logits, left_padded_batch, make_hf_model


def _tensors(path):
    files = conv._hf_tensor_files(str(path))
    return {name: np.array(f.get(name)) for name, f in files.items()}


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path, tie, qwen_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, ours, back = tmp_path / "src", tmp_path / "ours", tmp_path / "back"
    make_hf_model(src, tie=tie, heads=4, kv_heads=2)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(qwen_tokenizer_dir, fn), src / fn)

    assert cli.main(["convert", "from-hf", str(src), str(ours)]) == 0
    assert cli.main(["convert", "to-hf", str(ours), str(back)]) == 0  # keeps float32

    a, b = _tensors(src), _tensors(back)
    assert set(a) == set(b)
    assert ("lm_head.weight" in b) == (not tie)  # tied stays tied
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # source fields kept
    assert json.loads((back / "config.json").read_text())["eos_token_id"] == 2

    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    loaded = AutoModelForCausalLM.from_pretrained(back).eval()
    tokens, mask = left_padded_batch(96, [6, 3])
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    np.testing.assert_array_equal(hf_logits(ref, tokens, mask, pos),
                                  hf_logits(loaded, tokens, mask, pos))
    tok = AutoTokenizer.from_pretrained(back)
    assert tok.decode(tok("1 + 1 = \\boxed{2}")["input_ids"]) == "1 + 1 = \\boxed{2}"


def test_our_checkpoint_loads_sharded_with_same_logits(tmp_path):
    make_hf_model(tmp_path / "src", hidden=64, inter=96, vocab=128)
    conv.convert_from_hf(str(tmp_path / "src"), str(tmp_path / "ours"))
    tokens, mask = left_padded_batch(128, [5, 2, 5, 4])
    pos = positions_from_mask(jnp.asarray(mask))
    outs = []
    for path, spec in [(tmp_path / "src", "data=1"), (tmp_path / "ours", "fsdp=4,tensor=2")]:
        devices = jax.devices()[:1] if spec == "data=1" else None
        model, _, tok = conv.load_model(str(path), make_mesh(spec, devices))
        assert tok is None  # no tokenizer files in this source
        outs.append(np.asarray(model(jnp.asarray(tokens), pos, jnp.asarray(mask))[0]))
    np.testing.assert_allclose(outs[0][mask], outs[1][mask], atol=1e-5)


def test_bf16_export_and_sharded_safetensors(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    make_hf_model(tmp_path / "src")
    params, cfg = conv.load_params(str(tmp_path / "src"))
    monkeypatch.setattr(conv, "MAX_SHARD_BYTES", 20_000)  # force several shards
    conv.write_hf_dir(str(tmp_path / "out"), params, cfg, dtype="bfloat16")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back, _ = conv.load_params(str(tmp_path / "out"))
    for leaf_a, leaf_b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=False):
        assert leaf_b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(leaf_a).astype(jnp.bfloat16), leaf_b)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert str(model.dtype) == "torch.bfloat16"


def test_to_hf_keeps_the_checkpoints_dtype_unless_told(tmp_path, capsys):
    """A bfloat16 source comes back bfloat16 and bit-identical; --dtype float32 widens it."""
    make_hf_model(tmp_path / "f32")
    params, cfg = conv.load_params(str(tmp_path / "f32"))
    conv.write_hf_dir(str(tmp_path / "src"), params, cfg, dtype="bfloat16")
    assert cli.main(["convert", "from-hf", str(tmp_path / "src"), str(tmp_path / "ours")]) == 0
    assert cli.main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert "(bfloat16)" in capsys.readouterr().out
    a, b = _tensors(tmp_path / "src"), _tensors(tmp_path / "back")
    for name in a:
        assert a[name].dtype == b[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["torch_dtype"] == "bfloat16"
    assert cli.main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "wide"),
                     "--dtype", "float32"]) == 0
    assert all(x.dtype == np.float32 for x in _tensors(tmp_path / "wide").values())


def test_every_model_path_loads_the_sources_tokenizer(tmp_path):
    """A small BPE whose tokenizer_config.json names no class: transformers takes the class from
    config.json's model type (Qwen2Tokenizer). Our checkpoint, a run's checkpoint directory and
    a step directory in it must load that class and split prompts into the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    corpus = ["What is 12 + 7? 12 + 7 = 19", "1 + 1 = \\boxed{2}", "3456 * 78 = 269568"] * 30
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    src = tmp_path / "src"
    make_hf_model(src, vocab=320)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)  # as in many released models: the model type decides
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    conv.convert_from_hf(str(src), str(tmp_path / "ours"))
    run_ckpts = tmp_path / "run" / "checkpoints"  # what the trainer writes beside its steps
    _, cfg = conv.load_params(str(src))
    conv.write_model_files(str(run_ckpts), cfg, str(tmp_path / "ours"))
    (run_ckpts / "3").mkdir()

    reference = AutoTokenizer.from_pretrained(src)
    prompts = ["What is 12 + 7?", "3456 * 78", " 1 + 1 = \\boxed{2}\n", "12+7=19"]
    want = [reference(p)["input_ids"] for p in prompts]
    for path in (src, tmp_path / "ours", run_ckpts, run_ckpts / "3"):
        tok = conv.load_tokenizer(str(path))
        assert type(tok) is type(reference), path
        assert [tok(p)["input_ids"] for p in prompts] == want, path
    # without the source's config the generic class splits differently: the test can fail
    generic = AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert [generic(p)["input_ids"] for p in prompts] != want


def test_safetensors_writer_reader_round_trip(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
              "b": np.array([1.5, -2], dtype=jnp.bfloat16), "c": np.zeros((0, 4), np.float32)}
    write_safetensors(str(tmp_path / "x.safetensors"), arrays)
    from safetensors.numpy import load_file

    assert load_file(str(tmp_path / "x.safetensors"))["a"].tolist() == arrays["a"].tolist()
    f = SafetensorsFile(str(tmp_path / "x.safetensors"))
    for k, v in arrays.items():
        assert f.get(k).dtype == v.dtype and np.array_equal(f.get(k), v)


def test_clear_errors(tmp_path):
    src = tmp_path / "src"
    make_hf_model(src)
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        conv.load_params(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        conv.load_params(str(tmp_path / "nowhere"))

    bad = tmp_path / "malformed"
    shutil.copytree(src, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        conv.load_params(str(bad))
    cfg = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unknown model_type 'gpt2'; supported: llama, qwen2"):
        conv.load_params(str(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"tensors \['model.layers.0.self_attn.k_proj.bias', .*"
                                         r"\(6 in all\) are not used by the 'llama' family"):
        conv.load_params(str(bad))

    tensors = _tensors(src)
    (bad / "config.json").write_text(json.dumps(cfg))
    write_safetensors(str(bad / "model.safetensors"),
                      {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        conv.load_params(str(bad))
    wrong = dict(tensors)
    wrong["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    write_safetensors(str(bad / "model.safetensors"), wrong)
    with pytest.raises(ValueError,
                       match=r"k_proj.weight' has shape \(8, 32\), expected \(16, 32\)"):
        conv.load_params(str(bad))
    (bad / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        conv.load_params(str(bad))

    # The CLI turns these into one line on stderr and exit code 2, not a traceback.
    assert cli.main(["convert", "to-hf", str(src), str(tmp_path / "x")]) == 2


def test_gcs_paths_both_ways(tmp_path, gcs_emulator):
    """from-hf onto gs://, load from gs:// on a mesh, to-hf onto gs:// and back to local."""
    from r1zero_jax import paths

    src = tmp_path / "src"
    make_hf_model(src)
    hf_gs = gcs_emulator.gs("hf-src")
    for name in os.listdir(src):
        with open(src / name, "rb") as f, paths.open_file(paths.join(hf_gs, name), "wb") as g:
            g.write(f.read())
    ours = gcs_emulator.gs("ours")
    assert cli.main(["convert", "from-hf", hf_gs, ours]) == 0
    assert conv.is_our_checkpoint(ours)
    model, cfg, _ = conv.load_model(ours, make_mesh("fsdp=2,tensor=2", jax.devices()[:4]))
    assert cfg.num_kv_heads == 2
    exported = gcs_emulator.gs("export")
    assert cli.main(["convert", "to-hf", ours, exported, "--dtype", "float32"]) == 0
    assert "model.safetensors" in paths.listdir(exported)
    back, _ = conv.load_params(exported)  # an HF dir on gs:// reads too
    want, _ = conv.load_params(str(src))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(back), strict=False):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_saved_on_data8_restores_on_fsdp4_tensor2_with_equal_logits(tmp_path):
    from r1zero_jax.models import QwenConfig
    from r1zero_jax.models.decoder import init_model

    cfg = QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)
    saved_model = init_model(cfg, make_mesh("data=8"), seed=5)
    conv.save_params(str(tmp_path / "ckpt"), params_of(saved_model), cfg)
    restored, _, _ = conv.load_model(str(tmp_path / "ckpt"), make_mesh("fsdp=4,tensor=2"))
    assert restored.layers[0].attn.q_kernel[...].sharding.spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor", None)
    tokens, mask = left_padded_batch(64, [6, 4, 6, 2, 5, 6, 1, 3])
    pos = positions_from_mask(jnp.asarray(mask))
    a = saved_model(jnp.asarray(tokens), pos, jnp.asarray(mask))[0]
    b = restored(jnp.asarray(tokens), pos, jnp.asarray(mask))[0]
    np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(b)[mask], atol=1e-6)


def test_mislabelled_or_misshaped_weights_are_refused_naming_the_tensor(tmp_path, capsys):
    src = tmp_path / "src"
    make_hf_model(src)
    tensors = _tensors(src)
    name = "model.layers.1.mlp.down_proj.weight"
    # The float32 bytes unchanged, labelled I32: same size, so only the dtype can tell.
    write_safetensors(str(src / "model.safetensors"),
                      {**tensors, name: tensors[name].view(np.int32)})
    with pytest.raises(ValueError, match=rf"tensor '{name}' has dtype I32; model weights must be "
                                         "floating point"):
        conv.load_params(str(src))
    assert cli.main(["convert", "from-hf", str(src), str(tmp_path / "ours")]) == 2
    assert name in capsys.readouterr().err

    # Our own checkpoint: an integer array, or one of the wrong shape, is refused on load.
    write_safetensors(str(src / "model.safetensors"), tensors)
    config = conv.read_config(str(src))
    params = conv.read_hf_params(str(src), config)
    mesh = make_mesh("data=1", jax.devices()[:1])
    for bad, message in [(params["embed"].astype(np.int32), "has dtype int32; model weights must"),
                         (params["embed"][:-1],
                          r"has shape \(95, 32\), the model expects \(96, 32\)")]:
        out = tmp_path / f"ours-{bad.dtype}-{bad.shape[0]}"
        conv.save_params(str(out), {**params, "embed": bad}, config)
        with pytest.raises(ValueError, match=rf"array 'embed' {message}"):
            conv.load_params(str(out), mesh)
