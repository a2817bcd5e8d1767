"""Stop strings matched inside the jitted decode loop, on the bytes of the generated tokens.

For each stop string we build the KMP automaton over its UTF-8 bytes and fold every token's
bytes through it once on the host: `next_state[s, v, q]` is the automaton state after token v
when the generated text so far ends in state q, and a full match anywhere inside the token lands
on the final state `len(string)`. In the loop this is one gather per token and string, so a row
stops on the exact token that completes the stop string, wherever the token boundaries fall.
Only generated text is matched (the prompt may contain the string, as the r1 template does).
"""

from __future__ import annotations

import numpy as np

_BYTE_LEVEL_CACHE: dict = {}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level BPE's byte -> printable character table (used by Qwen2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=False))


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each token id contributes to the decoded text (b'' for special or unused ids)."""
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    out = []
    for i, piece in enumerate(pieces):
        if piece is None or i in special:
            out.append(b"")
        elif all(c in byte_of for c in piece):
            out.append(bytes(byte_of[c] for c in piece))
        else:  # not byte-level (an added token written as plain text)
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out + [b""] * (vocab_size - len(out))


def _kmp_dfa(pattern: bytes) -> np.ndarray:
    """[m+1, 256] transitions; state = length of the longest pattern prefix ending the text."""
    m = len(pattern)
    dfa = np.zeros((m + 1, 256), np.int32)
    dfa[0, pattern[0]] = 1
    fallback = 0
    for q in range(1, m + 1):
        dfa[q] = dfa[fallback]
        if q < m:
            dfa[q, pattern[q]] = q + 1
            fallback = dfa[fallback, pattern[q]]
    dfa[m] = m  # absorbing: once matched, the row is done
    return dfa


def transition_table(pieces: list[bytes], pattern: bytes) -> np.ndarray:
    """[V, m+1] int32: state after reading each token's bytes from each start state."""
    m = len(pattern)
    dfa = _kmp_dfa(pattern)
    lengths = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
    order = np.argsort(-lengths, kind="stable")  # longest first: active rows are a prefix
    width = int(lengths.max()) if len(pieces) else 0
    table = np.zeros((len(pieces), width), np.uint8)
    for row, i in enumerate(order):
        table[row, :lengths[i]] = np.frombuffer(pieces[i], np.uint8)
    sorted_len = lengths[order]
    state = np.broadcast_to(np.arange(m + 1, dtype=np.int32), (len(pieces), m + 1)).copy()
    for j in range(width):
        active = int(np.searchsorted(-sorted_len, -j, side="left"))  # rows with length > j
        state[:active] = dfa[state[:active], table[:active, j, None]]
    out = np.empty_like(state)
    out[order] = state
    return out


def stop_string_tables(tokenizer, vocab_size: int, stop_strings: tuple[str, ...]) -> np.ndarray:
    """[num_strings, V, max_len+1] int32 transition tables; final state = len(string).

    Shorter strings are padded with their (absorbing) final state; `final_states` gives each
    string's final state. Cached per tokenizer, vocabulary size and strings.
    """
    if any(not s for s in stop_strings):
        raise ValueError("stop strings must be non-empty")
    key = (id(tokenizer), vocab_size, tuple(stop_strings))
    if key not in _BYTE_LEVEL_CACHE:
        pieces = token_bytes(tokenizer, vocab_size)
        width = max(len(s.encode("utf-8")) for s in stop_strings) + 1
        tables = np.zeros((len(stop_strings), vocab_size, width), np.int32)
        for i, s in enumerate(stop_strings):
            t = transition_table(pieces, s.encode("utf-8"))
            tables[i, :, :t.shape[1]] = t
            tables[i, :, t.shape[1]:] = t.shape[1] - 1
        _BYTE_LEVEL_CACHE.clear()  # one tokenizer at a time; tables can be large
        _BYTE_LEVEL_CACHE[key] = (tokenizer, tables)
    return _BYTE_LEVEL_CACHE[key][1]


def final_states(stop_strings: tuple[str, ...]) -> np.ndarray:
    return np.asarray([len(s.encode("utf-8")) for s in stop_strings], np.int32)


def truncate_after(text: str, stop_strings: tuple[str, ...]) -> tuple[str, bool]:
    """Cut text right after the earliest stop string (kept); (text, whether one was found)."""
    ends = [text.find(s) + len(s) for s in stop_strings if s in text]
    return (text[:min(ends)], True) if ends else (text, False)
