"""`r1zero-jax generate` end to end, and stop strings on a real byte-level BPE tokenizer."""

import json

import numpy as np
import pytest

from r1zero_jax import cli
from r1zero_jax.sampling import stop_strings

CORPUS = ["<think> one plus one is two </think> <answer> 2 </answer>",
          "A conversation between User and Assistant. The answer is enclosed within tags.",
          "Please reason step by step, put your final answer within \\boxed{}. éüß 数学"] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen2 with a small byte-level BPE tokenizer (HF files, loaded offline)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tiny_qwen2_tok")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model.save_pretrained(path)
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
    for trial in range(200):
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
