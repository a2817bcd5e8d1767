"""Tiny random Hugging Face models (Qwen2, Llama) for parity tests (torch, float32)."""

import numpy as np


def make_hf_model(out_dir, *, vocab=96, hidden=32, inter=48, layers=2, heads=4, kv_heads=2,
                  theta=5000.0, eps=1e-5, tie=False, seed=0, noise=0.1, family="qwen2",
                  rope_scaling=None, eos=2):
    """Save a random Qwen2ForCausalLM (non-zero biases), Qwen3ForCausalLM (q/k norms) or
    LlamaForCausalLM (`rope_scaling`: HF's dict, e.g. Llama 3's) with norm weights away from 1;
    return the model."""
    import torch
    import transformers as tf

    config_cls, model_cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                             "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
                             "llama": (tf.LlamaConfig, tf.LlamaForCausalLM)}[family]
    extra = {} if rope_scaling is None else {"rope_scaling": rope_scaling}
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                     num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, rope_theta=theta, rms_norm_eps=eps,
                     tie_word_embeddings=tie, bos_token_id=1, eos_token_id=eos, **extra)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)  # biases and norms away from their 0 / 1 init
    model.save_pretrained(out_dir)
    return model


def hf_logits(model, tokens, mask, positions):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(tokens)),
                     attention_mask=torch.tensor(np.asarray(mask).astype(np.int64)),
                     position_ids=torch.tensor(np.asarray(positions))).logits.numpy()


def left_padded_batch(vocab, lengths, seed=0):
    """Random tokens [B, T] with row i holding lengths[i] real tokens at the right."""
    rng = np.random.RandomState(seed)
    t = max(lengths)
    tokens = rng.randint(0, vocab, (len(lengths), t)).astype(np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        mask[i, t - n:] = True
    tokens[~mask] = 0
    return tokens, mask
