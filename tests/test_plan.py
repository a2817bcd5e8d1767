"""The memory planner against hand calculations from the published Qwen2.5-Math configs."""

import json

import pytest

from r1zero_jax import plan as plan_lib
from r1zero_jax.config import load_config
from r1zero_jax.models import QwenConfig

GiB = 2**30

# Qwen2.5-Math-7B config.json: V D F L N K H, untied LM head.
V, D, F, L, N, K, H = 152064, 3584, 18944, 28, 28, 4, 128


def _hand_elements_per_device(fsdp: int, tensor: int) -> tuple[int, int]:
    """(total params, params per device) from the LOGICAL_RULES table by hand: matrices shard
    over fsdp (embed) and tensor (vocab/heads/mlp), biases over tensor, norms not at all."""
    matrices = 2 * V * D + L * (2 * D * N * H + 2 * D * K * H + 3 * D * F)
    biases = L * (N * H + 2 * K * H)
    norms = D + 2 * L * D
    return matrices + biases + norms, matrices // (fsdp * tensor) + biases // tensor + norms


def test_topologies():
    t = plan_lib.parse_topology("v4-64")
    assert (t.chips, t.hosts, t.hbm_bytes) == (32, 8, 32 * GiB)
    t = plan_lib.parse_topology("v5p-128")
    assert (t.chips, t.hosts, t.hbm_bytes) == (64, 16, 95 * GiB)
    t = plan_lib.parse_topology("v5e-256")
    assert (t.name, t.chips, t.hosts, t.hbm_bytes) == ("v5litepod-256", 256, 64, 16 * GiB)
    assert plan_lib.parse_topology("v4-8").hosts == 1 and plan_lib.parse_topology("v4-8").chips == 4
    assert plan_lib.parse_topology("v5litepod-8").hosts == 1
    assert plan_lib.parse_topology("v4-32").runtime_version == "tpu-ubuntu2204-base"
    for bad in ("v4-12", "v5e-12", "v3-8", "tpu"):
        with pytest.raises(ValueError, match=r"N is|N must|unknown TPU topology"):
            plan_lib.parse_topology(bad)


def test_7b_on_v4_64_matches_hand_calculation():
    cfg = load_config("qwen2_5_math_7b_dr_grpo")
    p = plan_lib.plan_config(cfg, "v4-64")
    assert p["mesh"] == {"data": 4, "fsdp": 4, "tensor": 2} and "note" not in p
    total, per_device = _hand_elements_per_device(fsdp=4, tensor=2)
    assert total == 7_615_616_512 == p["num_params"]
    d = p["per_device_bytes"]
    assert d["params"] == per_device * 4  # float32 master weights
    assert d["optimizer"] == per_device * 4 * 2  # AdamW mu + nu
    assert d["gradients"] == per_device * 4 * 2  # gradients + accumulation buffer (8 microbatches)
    # KV cache of one sampler call: 32 prompts x 8 samples over data x fsdp = 16 -> 16 sequences,
    # 512 + 3000 slots, 4 KV heads over tensor 2, bf16, k and v, 28 layers.
    assert d["kv_cache"] == 2 * L * 16 * 3512 * (K // 2) * H * 2
    assert d["activations"] == d["activations_remat"] < d["activations_no_remat"]
    assert d["peak"] == max(d["learn_phase"], d["sample_phase"])
    assert p["hbm_bytes"] == 32 * GiB and p["fits"] and p["hosts"] == 8
    # params x bytes / shards: 8 shards (fsdp x tensor); the data axis holds replicas
    assert d["params"] == pytest.approx(7_615_616_512 * 4 / 8, rel=0.001)
    assert 3.5 * GiB < d["params"] < 3.6 * GiB


def test_activations_hand_calculation():
    """Qwen2.5-Math-1.5B, one 2048-token sequence per device, bf16: per layer the saved tensors
    (norms/residuals 4D, q k v (N+2K)H, attention out NH, MLP 3F per token) and the naive
    attention's float32 scores + bf16 probabilities [N, T, T]; remat keeps each layer's input;
    the LM head is gathered once and its gradient is whole."""
    cfg = QwenConfig.qwen2_5_math_1_5b()
    mesh = {"data": 4, "fsdp": 4, "tensor": 1}
    w = plan_lib.Workload(train_batch=16, train_len=2048, accumulation_steps=1, sample_batch=16,
                          sample_len=2048, response_len=1536, logits_chunk=256, remat=False)
    d = plan_lib.plan_memory(cfg, mesh, w, 32 * GiB)["per_device_bytes"]
    t, dm = 2048, 1536
    layer = t * 2 * (4 * dm + (12 + 2 * 2) * 128 + 12 * 128 + 3 * 8960) + 12 * t * t * (4 + 2)
    logits = 3 * 256 * 151936 * 4  # one 256-position chunk: logits, softmax, gradient (float32)
    hidden = t * dm * 2 * 2
    head = 151936 * dm * (2 + 4)  # the LM head gathered over fsdp (bf16) and its f32 gradient
    assert d["activations_no_remat"] == 28 * layer + logits + hidden + head
    assert d["activations_remat"] == 28 * t * dm * 2 + layer + logits + hidden + head
    assert d["activations"] == d["activations_no_remat"]  # remat=False
    assert d["gradients"] == d["params"]  # no accumulation buffer


def test_too_big_says_what_to_change():
    cfg = load_config("qwen2_5_math_7b_dr_grpo", ["model.remat=false", "train.logits_chunk=0"])
    p = plan_lib.plan_config(cfg, "v4-64")
    assert not p["fits"] and not p["mesh_problems"]
    advice = " ".join(p["advice"])
    assert "model.remat=True" in advice and "train.logits_chunk=512" in advice
    # a mesh that cannot shard the batch is reported with the fix
    p = plan_lib.plan_config(load_config("qwen2_5_math_7b_dr_grpo"), "v5p-128")
    assert not p["fits"] and "train.microbatch_size=32" in " ".join(p["advice"])
    # 28 heads cannot be split 8 ways over tensor
    p = plan_lib.plan_config(load_config("qwen2_5_math_7b_dr_grpo",
                                         ["mesh.spec=data=2,fsdp=2,tensor=8"]), "v4-64")
    assert any("heads=28" in m for m in p["mesh_problems"])


def test_plan_cli_json(capsys):
    plan_lib.plan_cli("qwen2_5_math_1_5b_dr_grpo", overrides=[], topology="v5e-16", as_json=True)
    out = json.loads(capsys.readouterr().out)
    assert {"num_params", "per_device_bytes", "hbm_bytes", "fits"} <= set(out)
    assert {"params", "optimizer", "gradients", "activations", "kv_cache"} <= set(
        out["per_device_bytes"])
    assert out["num_params"] == 1_543_714_304 and out["hbm_bytes"] == 16 * GiB
    plan_lib.plan_cli("cpu_smoke", topology=None, as_json=False)
    text = capsys.readouterr().out
    assert "cpu-8" in text and "fits" in text


def test_bad_topology_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown TPU topology"):
        plan_lib.plan_config(load_config("qwen2_5_math_7b_dr_grpo"), "v9-64")


def test_continuous_batching_kv_cache_and_slots_that_fit():
    """sampling.decode_slots: the slots' cache plus the prompt caches of the whole rollout, by
    hand; decode_slots_max slots fill the sample phase up to the fit limit and no further."""
    over = ["sampling.decode_slots=256"]
    cfg = load_config("qwen2_5_math_7b_dr_grpo", over)
    p = plan_lib.plan_config(cfg, "v4-64")
    d = p["per_device_bytes"]
    slot = 2 * L * (K // 2) * H * 2  # one cache slot of one row: k and v, 28 layers, bf16
    prompts = cfg.prompts_per_rollout  # 1024 / 8 = 128 prompts of 512 slots, over 16 shards
    assert d["kv_cache"] == 256 // 16 * 3512 * slot + prompts // 16 * 512 * slot
    top = p["decode_slots_max"]
    assert top % 16 == 0 and top > 256
    limit = plan_lib.FIT_FRACTION * p["hbm_bytes"]
    at = lambda s: plan_lib.plan_config(  # noqa: E731
        load_config("qwen2_5_math_7b_dr_grpo", [f"sampling.decode_slots={s}"]),
        "v4-64")["per_device_bytes"]["sample_phase"]
    assert at(top) <= limit < at(top + 16)


def test_paged_cache_pool_and_pages_that_fit():
    """sampling.page_size: the slots' cache is the pool (by hand), default one full-length row
    per slot; cache_pages_max pages fill the sample phase up to the fit limit and no further."""
    over = ["sampling.decode_slots=256", "sampling.page_size=64"]
    slot = 2 * L * (K // 2) * H * 2  # one token of one row on one device: k and v, bf16
    prompts = 1024 // 8 // 16 * 512 * slot  # the rollout's prompt caches, as without pages
    p = plan_lib.plan_config(load_config("qwen2_5_math_7b_dr_grpo", over), "v4-64")
    row = -(-3512 // 64)  # 512 + 3000 tokens: 55 pages
    assert p["paged"]["pages_per_row"] == row and p["paged"]["cache_pages"] == 256 * row
    assert p["per_device_bytes"]["kv_cache"] == 256 * row // 16 * 64 * slot + prompts
    small = over + ["sampling.cache_pages=4096"]
    p = plan_lib.plan_config(load_config("qwen2_5_math_7b_dr_grpo", small), "v4-64")
    assert p["per_device_bytes"]["kv_cache"] == 4096 // 16 * 64 * slot + prompts
    top = p["paged"]["cache_pages_max"]
    assert top % 16 == 0 and p["paged"]["full_rows_max"] == top // row
    limit = plan_lib.FIT_FRACTION * p["hbm_bytes"]
    at = lambda pages: plan_lib.plan_config(  # noqa: E731
        load_config("qwen2_5_math_7b_dr_grpo", over + [f"sampling.cache_pages={pages}"]),
        "v4-64")["per_device_bytes"]["sample_phase"]
    assert at(top) <= limit < at(top + 16)
    assert "paged cache: 4,096 pages of 64 tokens" in plan_lib.format_plan(p)


def test_plan_reads_the_shape_at_model_path(tmp_path):
    """An HF config.json or our checkpoint's marker at model.path is planned, not the preset; a
    path that does not exist falls back to the preset, saying so."""
    from r1zero_jax.convert import hf as conv

    v, d, f, layers, n, k, h = 256, 64, 96, 3, 4, 2, 16
    shape = QwenConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_layers=layers,
                       num_heads=n, num_kv_heads=k, head_dim=h, tie_word_embeddings=False)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(shape.to_hf_dict()))
    conv.write_marker(str(tmp_path / "ours"), shape)
    # embedding + untied head + final norm; per layer q k v o (+ q k v biases), MLP, two norms
    want = 2 * v * d + d + layers * (2 * d * n * h + 2 * d * k * h + n * h + 2 * k * h
                                     + 3 * d * f + 2 * d)
    for path in (tmp_path / "hf", tmp_path / "ours"):
        cfg = load_config("qwen2_5_0_5b_cpu", [f"model.path={path}"])
        p = plan_lib.plan_config(cfg)
        assert p["num_params"] == want and p["model_source"] == str(path)
        assert p["topology"] == "cpu-1" and "note" not in p
    cfg = load_config("qwen2_5_0_5b_cpu", [f"model.path={tmp_path / 'absent'}"])
    p = plan_lib.plan_config(cfg)
    assert p["num_params"] == 494_032_768  # the qwen2.5-0.5b preset
    assert p["model_source"].startswith("preset qwen2.5-0.5b") and "not found" in p["model_source"]


def test_cpu_plan_reports_host_ram_and_warns_before_loading(monkeypatch):
    cfg = load_config("qwen2_5_0_5b_cpu", ["model.path="])
    p = plan_lib.plan_config(cfg)
    h, d = p["host"], p["per_device_bytes"]
    assert h["peak_bytes"] == p["chips"] * d["peak"] + plan_lib.HOST_BASE_BYTES
    # 494M float32 params + Adam mu and nu, at the least
    assert h["peak_bytes"] > 494_032_768 * 12
    assert "host RAM" in plan_lib.format_plan(p)
    monkeypatch.setattr(plan_lib, "machine_ram", lambda: (8 * GiB, 6 * GiB))
    warning = plan_lib.host_warning(cfg)
    assert warning.startswith("warning: this run needs about") and "6.00 GiB available" in warning
    monkeypatch.setattr(plan_lib, "machine_ram", lambda: (512 * GiB, 500 * GiB))
    assert plan_lib.host_warning(cfg) is None
    assert plan_lib.host_warning(load_config("qwen2_5_math_1_5b_dr_grpo")) is None  # not CPU
