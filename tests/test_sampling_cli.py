"""`r1zero-jax generate` end to end, and stop strings on a real byte-level BPE tokenizer."""

import json
import re

import numpy as np
import pytest

from r1zero_jax import cli
from r1zero_jax.sampling import stop_strings

CORPUS = ["<think> one plus one is two </think> <answer> 2 </answer>",
          "A conversation between User and Assistant. The answer is enclosed within tags.",
          "Please reason step by step, put your final answer within \\boxed{}. éüß 数学"] * 20


def _tiny_model_with_tokenizer(path, family: str, init_std: float = 0.02):
    """A tiny random HF model of `family` with a small byte-level BPE tokenizer (HF files,
    loaded offline); returns the torch model. A larger `init_std` gives less repetitive
    greedy text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    shape = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 initializer_range=init_std)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    else:  # Llama 3.2's shape: tied head, llama3 RoPE scaling, no biases
        model = LlamaForCausalLM(LlamaConfig(
            **shape, bos_token_id=None, eos_token_id=tok.eos_token_id, rope_theta=10000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_tok")
    _tiny_model_with_tokenizer(path, "qwen2")
    return str(path)


def test_stop_string_tables_on_byte_level_bpe(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    stops = ("</answer>", "数")
    tables = stop_strings.stop_string_tables(tok, 320, stops)
    finals = stop_strings.final_states(stops)
    rs = np.random.RandomState(0)
    pieces = [tok(t, add_special_tokens=False)["input_ids"] for t in CORPUS[:3]]
    # random token streams: the automaton stops where the decoded text first holds a stop string
    for _ in range(200):
        ids = [i for _ in range(4)
               for i in pieces[rs.randint(3)][rs.randint(20):][:rs.randint(1, 8)]]
        state, stopped_at = np.zeros(len(stops), int), None
        for k, t in enumerate(ids):
            state = tables[np.arange(len(stops)), t, state]
            if (state == finals).any():
                stopped_at = k + 1
                break
        text_hits = [k for k in range(1, len(ids) + 1)
                     if any(s.encode() in tok.decode(ids[:k]).encode() for s in stops)]
        assert stopped_at == (text_hits[0] if text_hits else None), tok.decode(ids)


def test_generate_cli_writes_jsonl_and_prints(model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", model_dir, "--prompt", "one plus one", "--prompt", "2",
            "--template", "r1", "--max-new-tokens", "6", "--n", "2", "--dtype", "float32",
            "--temperature", "1.0", "--seed", "3"]
    assert cli.main(args + ["--output", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4
    assert rows[0]["prompt"].startswith("A conversation") and rows[0]["prompt"].endswith(
        "User: one plus one\nAssistant: <think>")
    for row in rows:
        assert set(row) == {"prompt", "text", "token_ids", "logprobs", "finish_reason"}
        assert 1 <= len(row["token_ids"]) == len(row["logprobs"]) <= 6
        assert all(lp <= 0 for lp in row["logprobs"])
        want = stop_strings.truncate_after(
            tok.decode(row["token_ids"], skip_special_tokens=True), ("</answer>",))[0]
        assert row["text"] == want
        assert row["finish_reason"] == ("length" if len(row["token_ids"]) == 6 else "stop")
    assert rows[0]["token_ids"] != rows[1]["token_ids"]  # two samples of one prompt
    err = capsys.readouterr().err
    assert "generate: 2/2 prompts" in err and "tokens/s" in err and "ETA" in err
    # the per-rollout report: one call of 2 prompts padded to the 8 batch shards, 2 samples each
    lengths = [len(r["token_ids"]) for r in rows]
    report = re.search(r"generate: (\d+) decode steps, (\d+) tokens, slot utilization ([\d.]+)",
                       err)
    assert (int(report[1]), int(report[2])) == (max(lengths), sum(lengths))
    assert float(report[3]) == pytest.approx(sum(lengths) / (8 * 2 * max(lengths)), abs=1e-3)
    # printed texts, same seed: the same completions
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("=== prompt ") == 4 and rows[3]["text"] in printed


def test_generate_cli_refuses_bad_prompts_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1"}\n{"question": "x"}\n')
    assert cli.main(["generate", "--model", model_dir, "--prompts-file", str(bad)]) == 2
    assert "bad.jsonl:2: a row needs a string `prompt` or `problem`" in capsys.readouterr().err
    assert cli.main(["generate", "--model", model_dir, "--prompts-file",
                     str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


# Qwen2's greedy parity on both meshes is in test_sampling.py already; its CLI run is slow-only.
@pytest.mark.parametrize("family", [pytest.param("qwen2", marks=pytest.mark.slow), "llama"])
def test_convert_from_hf_then_greedy_generate_equals_transformers(tmp_path, family):
    """`convert from-hf`, then `generate --temperature 0` on 1 device (a fresh process) and on
    data=4,tensor=2: each prompt's tokens are transformers' greedy ones, up to its stop."""
    import os
    import subprocess
    import sys

    import torch

    hf_dir, ours = tmp_path / "hf", tmp_path / "ours"
    torch_model = _tiny_model_with_tokenizer(hf_dir, family, init_std=0.3)
    assert cli.main(["convert", "from-hf", str(hf_dir), str(ours)]) == 0
    prompts = ["one plus one is", "<think> 2", "Please reason step by step, put your final"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                    for p in prompts))
    args = ["generate", "--model", str(ours), "--prompts-file", str(tmp_path / "prompts.jsonl"),
            "--template", "no", "--max-new-tokens", "8", "--temperature", "0", "--dtype",
            "float32"]
    one = tmp_path / "one.jsonl"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-m", "r1zero_jax.cli", *args, "--mesh", "data=1",
                    "--output", str(one)], check=True, env=env, capture_output=True)
    assert cli.main(args + ["--mesh", "data=4,tensor=2",
                            "--output", str(tmp_path / "8.jsonl")]) == 0

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    for out in (one, tmp_path / "8.jsonl"):
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == prompts
        for row in rows:
            ids = tok(row["prompt"], return_tensors="pt")["input_ids"]
            with torch.no_grad():
                ref = torch_model.generate(ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=8, do_sample=False,
                                           eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id)
            want = ref[0, ids.shape[1]:].tolist()
            if tok.eos_token_id in want:  # transformers pads after the stop; we end there
                want = want[:want.index(tok.eos_token_id) + 1]
            assert row["token_ids"] == want, (out.name, row["prompt"])


def test_sampler_reports_progress_without_changing_samples(model_dir):
    """on_progress splits the decode loop into PROGRESS_EVERY-step calls; samples are the same."""
    import jax.numpy as jnp

    from r1zero_jax.convert.hf import load_model
    from r1zero_jax.sampling.sampler import PROGRESS_EVERY, SamplingParams, sample
    from r1zero_jax.sharding import make_mesh

    mesh = make_mesh("data=-1")
    net, _, tok = load_model(model_dir, mesh, dtype=jnp.float32)
    tokens = np.array([[0, 5, 6, 7], [8, 9, 10, 11]], np.int32)
    mask = np.array([[False, True, True, True], [True] * 4])
    m = 2 * PROGRESS_EVERY + 6
    params = SamplingParams(max_new_tokens=m, temperature=1.0, n=2, ignore_eos=True)
    calls = []
    a = sample(net, tokens, mask, params, seed=1, mesh=mesh)
    b = sample(net, tokens, mask, params, seed=1, mesh=mesh,
               on_progress=lambda rows, toks: calls.append((rows, toks)))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # 4 rows, all running to m (ignore_eos); prefill made token 1, each call PROGRESS_EVERY more
    k = PROGRESS_EVERY
    assert calls == [(0, 4 * (k + 1)), (0, 4 * (2 * k + 1)), (4, 4 * m)]
