"""Pod-scale truth on this host: the run's programs compiled for a TPU v4-8 with libtpu, and the
optimizer state of a real Trainer sharded like its params on the 8-device CPU mesh."""

import json
import math

import jax
import optax
import pytest

from r1zero_jax import compiled as comp
from r1zero_jax import plan as plan_lib
from r1zero_jax.config import load_config

# A 2-layer model with the recipe's shape ratios, small enough to compile in seconds.
TINY_MODEL = ["model.preset=custom", "model.path=", "model.hidden_size=256",
              "model.intermediate_size=1024", "model.num_layers=2", "model.num_heads=4",
              "model.num_kv_heads=2", "model.head_dim=64", "model.vocab_size=4096"]
TINY_RUN = ["mesh.spec=data=1,fsdp=4", "data.max_prompt_tokens=64", "sampling.max_new_tokens=128",
            "sampling.prompts_per_call=4", "rl.group_size=4", "rl.rollout_batch_size=32",
            "train.minibatch_size=16", "train.microbatch_size=8", "train.logits_chunk=64"]


def _tpu_devices(name):
    try:
        return comp.topology_devices(plan_lib.parse_topology(name))
    except RuntimeError as e:  # libtpu absent: the test extra installs it
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def v4_8_programs():
    from r1zero_jax.sharding import make_mesh

    cfg = load_config("qwen2_5_math_1_5b_dr_grpo", TINY_MODEL + TINY_RUN)
    mesh = make_mesh(cfg.mesh.spec, _tpu_devices("v4-8"))
    qc = plan_lib.model_config_of(cfg)
    kept = {}
    out = comp.compile_programs(cfg, qc, mesh, printer=lambda *a, **k: None, keep=kept)
    return cfg, qc, mesh, out, kept


def test_optimizer_state_is_sharded_like_the_params_in_the_compiled_step(v4_8_programs):
    *_, kept = v4_8_programs
    (state, _), _ = kept["learn"].input_shardings
    out_state, _ = kept["learn"].output_shardings
    for shardings in (state, out_state):
        adam = [s for s in jax.tree.leaves(shardings.opt_state, is_leaf=lambda x: isinstance(
            x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
        assert len(adam) == 1
        params = jax.tree.leaves(shardings.params)
        for moments in (adam[0].mu, adam[0].nu):
            got = jax.tree.leaves(moments)
            assert len(got) == len(params)
            for p, m in zip(params, got, strict=False):
                assert m.spec == p.spec
        assert any(p.spec != jax.sharding.PartitionSpec() for p in params)  # really sharded
        assert adam[0].count.spec == jax.sharding.PartitionSpec()


def test_decode_loop_moves_no_weight_matrix_and_no_vocab_logits(v4_8_programs):
    _, qc, _, _, kept = v4_8_programs
    decode = comp.collectives(kept["decode"].as_text(), top=10**6)
    assert decode["count"] > 0
    query_kernel = 2 * qc.hidden_size * qc.num_heads * qc.head_dim  # bf16 [D, N, H]
    for c in decode["largest"]:
        assert c["bytes"] < query_kernel, c
        assert str(qc.vocab_size) not in c["shape"], c  # no [rows, V] (nor [V, D]) moves


def test_learner_collectives_within_the_fsdp_budget(v4_8_programs):
    cfg, qc, mesh, out, _ = v4_8_programs
    from r1zero_jax.models.decoder import num_params

    learn = out["learn"]
    a = cfg.train.minibatch_size // cfg.microbatch
    weights_bf16 = num_params(qc) * 2
    # Weight-gathering FSDP: weights gathered 3 times (bf16), gradients reduce-scattered once
    # (f32), per microbatch. Moving activations instead costs far more at these shapes.
    ideal_per_microbatch = 3 * weights_bf16 + 2 * weights_bf16
    assert learn["collective_bytes_per_step"] / a <= 3 * ideal_per_microbatch
    assert learn["collectives_by_op"]["all-gather"]["count"] >= qc.num_layers * a
    for name in ("learn", "prefill", "decode"):
        c = out[name]
        assert c["peak_bytes"] == (c["argument_bytes"] + c["output_bytes"] - c["alias_bytes"]
                                   + c["temp_bytes"] + c["resident_bytes"]) > 0
        assert c["compile_s"] < 60


def test_hlo_collectives_count_loop_trips():
    """Collectives are multiplied by the trip counts of counted loops around them; a dynamic
    loop counts once (per iteration)."""
    hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %g = f32[32,16]{1,0} all-gather(%x), channel_id=1, dimensions={0}
  %r = f32[8,16]{1,0} all-reduce(%x), channel_id=2, to_apply=%add
  ROOT %t = (s32[], f32[8,16]) tuple(%i, %r)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%dyncond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  ROOT %c = pred[] custom-call(%p), custom_call_target="done"
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body
  %v = (s32[], f32[8,16]) while(%init), condition=%dyncond, body=%body
  ROOT %cp = bf16[4,4]{1,0} collective-permute(%y), channel_id=3
}
"""
    c = comp.collectives(hlo)
    # %body runs 6 times in the counted loop and once per iteration of the dynamic one.
    assert c["by_op"]["all-gather"] == {"count": 7, "bytes": 7 * 32 * 16 * 4}
    assert c["by_op"]["all-reduce"] == {"count": 7, "bytes": 7 * 8 * 16 * 4}
    assert c["by_op"]["collective-permute"] == {"count": 1, "bytes": 32}
    assert c["count"] == 15 and c["largest"][0]["shape"] == "f32[32,16]"


def test_topology_grids_and_unknown_topology():
    assert comp._grid(4, 3) == (2, 2, 1) and comp._grid(16, 3) == (2, 2, 4)
    assert comp._grid(32, 3) == (2, 4, 4) and comp._grid(64, 3) == (4, 4, 4)
    assert comp._grid(8, 2) == (2, 4) and comp._grid(16, 2) == (4, 4) and comp._grid(1, 2) == (1, 1)
    devices = _tpu_devices("v5litepod-16")
    assert len(devices) == 16 and "v5" in devices[0].device_kind.lower()
    assert len(_tpu_devices("v4-32")) == 16
    with pytest.raises(ValueError, match="not a TPU topology"):
        comp.topology_devices(plan_lib.parse_topology("cpu-8"))


def test_plan_compile_cli_json(capsys):
    """`r1zero-jax plan --compile --json` on the tiny run: the documented fields, per chip."""
    from r1zero_jax.cli import main

    _tpu_devices("v4-8")
    args = ["plan", "qwen2_5_math_1_5b_dr_grpo", "--topology", "v4-8", "--compile", "--json"]
    rc = main(args + [a for s in TINY_MODEL + TINY_RUN for a in ("--set", s)])
    p = json.loads(capsys.readouterr().out)
    assert rc == 0 and p["fits"] is True
    assert (p["topology"], p["num_devices"], p["hbm_bytes"]) == ("v4-8", 4, 32 * 2**30)
    for name in ("learn", "decode", "prefill"):
        assert 0 < p["compiled"][name]["peak_bytes"] < 0.9 * p["hbm_bytes"]
    for key in ("argument_bytes", "temp_bytes", "collective_bytes_per_step",
                "collectives_per_step"):
        assert key in p["compiled"]["learn"] and key in p["compiled"]["decode"]
    assert p["analytic"]["per_device_bytes"]["peak"] > 0
    assert math.isclose(p["compiled"]["learn"]["collective_ratio_to_ideal"],
                        p["compiled"]["learn"]["collective_bytes_per_step"]
                        / p["compiled"]["learn"]["fsdp_ideal_bytes_per_step"], rel_tol=1e-2)


def test_trainer_optimizer_state_sharded_like_params_fresh_and_restored(tmp_path):
    """A real Trainer on fsdp=4,tensor=2: Adam's mu and nu carry each param's sharding, after a
    fresh start and after a restore from its checkpoint."""
    from r1zero_jax.rl.trainer import Trainer

    overrides = ["mesh.spec=fsdp=4,tensor=2", "eval.source=", "train.warmup_sft_steps=0",
                 "train.warmup_sft_habit_steps=0", "rl.rollout_batch_size=16",
                 "train.minibatch_size=16", "train.microbatch_size=8", "sampling.max_new_tokens=8",
                 "checkpoint.every=1", "log.tensorboard=false", "log.plot=false"]
    wd = str(tmp_path / "run")
    for steps in (1, 2):  # the second run restores step 1
        trainer = Trainer(load_config("cpu_smoke", overrides), wd, printer=lambda *a, **k: None)
        trainer.run(steps)
        state = trainer.state
        assert int(state.step) == steps
        adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
            x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
        params = jax.tree.leaves(state.params)
        assert any("fsdp" in str(p.sharding.spec) for p in params)
        for moments in (adam.mu, adam.nu):
            for p, m in zip(params, jax.tree.leaves(moments), strict=False):
                assert m.sharding.spec == p.sharding.spec, (p.shape, p.sharding.spec)
                assert m.addressable_shards[0].data.shape == p.addressable_shards[0].data.shape


def _continuous_on_v4_8(extra=()):
    from r1zero_jax.sharding import make_mesh

    cfg = load_config("qwen2_5_math_1_5b_dr_grpo",
                      TINY_MODEL + TINY_RUN + ["sampling.decode_slots=10", *extra])
    mesh = make_mesh(cfg.mesh.spec, _tpu_devices("v4-8"))
    qc = plan_lib.model_config_of(cfg)
    kept = {}
    out = comp.compile_programs(cfg, qc, mesh, programs=("prefill", "decode"),
                                printer=lambda *a, **k: None, keep=kept)
    return qc, out, kept


def test_continuous_batching_compiles_for_v4_8_and_moves_no_weights():
    """sampling.decode_slots: the prefill of every prompt of the rollout with the first fill of
    the slots, and the refilling decode loop, compiled for a v4-8: within HBM, and a decode step
    moves neither a weight matrix nor [rows, V] logits nor the rollout's [R, M] output buffers."""
    qc, out, kept = _continuous_on_v4_8()
    (_, loop, *_), _ = kept["decode"].args_info
    assert loop.row.shape == (12,) and loop.tokens.shape == (32, 128)  # slots rounded to 4 shards
    assert loop.cache.k[0].shape == (12, 2, 64, 64 + 128)  # [S, K, H, Tp + M]
    for name in ("prefill", "decode"):
        assert 0 < out[name]["peak_bytes"] < 0.9 * 32 * 2**30
    decode = comp.collectives(kept["decode"].as_text(), top=10**6)
    query_kernel = 2 * qc.hidden_size * qc.num_heads * qc.head_dim
    for c in decode["largest"]:
        assert c["bytes"] < query_kernel, c
        assert str(qc.vocab_size) not in c["shape"], c
        assert "[32,128]" not in c["shape"], c


def test_paged_cache_compiles_for_v4_8_smaller_with_pages_kept_in_place():
    """sampling.page_size: the paged decode loop compiled for a v4-8 beside the dense one. The
    pool of 64 pages of 16 (16 per chip) replaces 3 slots x 192 tokens per chip: XLA's argument
    bytes drop by at least that much cache; the pool is never copied (one layout for the page
    writes and the ragged reads) and never moves between chips: the step's collectives are the
    dense step's."""
    import re

    qc, dense, dense_kept = _continuous_on_v4_8()
    _, out, kept = _continuous_on_v4_8(["sampling.page_size=16", "sampling.cache_pages=64"])
    (_, loop, *_), _ = kept["decode"].args_info
    kh = qc.num_kv_heads * qc.head_dim
    assert loop.cache.k[0].shape == (64, 16, kh)  # [P, Z, K*H]
    assert loop.cache.table.shape == (12, -(-(64 + 128) // 16))  # [S, W]
    token = 2 * qc.num_layers * kh * 2  # k and v of one token, bf16, on a chip
    saved = (3 * (64 + 128) - 16 * 16) * token
    assert dense["decode"]["argument_bytes"] - out["decode"]["argument_bytes"] >= saved
    text = kept["decode"].as_text()
    pool = rf"bf16\[16,16,{kh}\]"  # one chip's pool of one layer
    assert re.search(pool, text)
    assert not re.search(pool + r"\{[^}]*\} copy\(", text)
    steps = comp.collectives(text, top=10**6)
    assert steps["bytes"] <= comp.collectives(dense_kept["decode"].as_text())["bytes"] * 1.01
    assert not any(f",16,{kh}]" in c["shape"] for c in steps["largest"])
