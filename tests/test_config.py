"""Run configs: loading configs/*.py, `--set` overrides with type checks, validation, JSON."""

import dataclasses
import json
import subprocess
import time
import sys

import pytest

from r1zero_jax import config as C

CONFIGS = ["cpu_smoke", "qwen2_5_math_1_5b_dr_grpo", "qwen2_5_math_7b_dr_grpo",
           "qwen2_5_math_1_5b_grpo"]


def test_config_module_does_not_import_jax():
    code = ("import sys, r1zero_jax.config as c; c.load_config('cpu_smoke'); "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_validates_and_round_trips(name):
    cfg = C.load_config(name)
    assert cfg.name == name
    back = C.from_dict(json.loads(json.dumps(C.to_dict(cfg))))
    assert back == cfg


def test_paper_recipes():
    dr = C.load_config("qwen2_5_math_1_5b_dr_grpo")
    grpo = C.load_config("qwen2_5_math_1_5b_grpo")
    assert (dr.rl.loss, grpo.rl.loss) == ("dr_grpo", "grpo")
    assert C.diff(dr, grpo) == ["name: 'qwen2_5_math_1_5b_dr_grpo' -> 'qwen2_5_math_1_5b_grpo'",
                                "rl.loss: 'dr_grpo' -> 'grpo'"]
    for cfg in (dr, C.load_config("qwen2_5_math_7b_dr_grpo")):
        assert (cfg.prompts_per_rollout, cfg.rl.group_size,
                cfg.train.minibatch_size) == (128, 8, 128)
        assert (cfg.sampling.temperature, cfg.sampling.max_new_tokens) == (1.0, 3000)
        assert (cfg.optim.learning_rate, cfg.optim.b1, cfg.optim.b2,
                cfg.optim.clip_norm) == (1e-6, 0.9, 0.95, 1.0)
        assert cfg.rl.kl_beta == 0.0 and cfg.data.template == "qwen_math"


def test_cpu_smoke_asks_for_8_devices_on_data_and_tensor_axes():
    cfg = C.load_config("cpu_smoke")
    sizes = C.parse_mesh_spec(cfg.mesh.spec, cfg.mesh.num_cpu_devices)
    assert cfg.mesh.num_cpu_devices == 8
    assert sizes["data"] > 1 and sizes["tensor"] > 1


def test_overrides_are_typed():
    cfg = C.load_config("cpu_smoke", ["optim.learning_rate=2e-4", "rl.loss=grpo", "train.steps=3",
                                      "rl.mask_truncated=true", "model.remat=False"])
    assert cfg.optim.learning_rate == 2e-4 and isinstance(cfg.optim.learning_rate, float)
    assert (cfg.rl.loss, cfg.train.steps, cfg.rl.mask_truncated,
            cfg.model.remat) == ("grpo", 3, True, False)
    tuple_cfg = C.apply_overrides(C.RunConfig(), [])
    assert tuple_cfg == C.RunConfig()


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        C.load_config("cpu_smoke", ["optim.lr=1e-3"])
    msg = str(e.value)
    assert ("unknown key 'optim.lr'" in msg and "optim.learning_rate" in msg
            and "rl.group_size" in msg)


@pytest.mark.parametrize("item,field,typ", [
    ("train.steps=ten", "train.steps", "int"),
    ("optim.learning_rate=fast", "optim.learning_rate", "float"),
    ("rl.mask_truncated=maybe", "rl.mask_truncated", "bool"),
    ("train.steps=1.5", "train.steps", "int"),
])
def test_wrong_type_names_field_and_type(item, field, typ):
    with pytest.raises(ValueError, match=rf"{field}=.*expected {typ}"):
        C.load_config("cpu_smoke", [item])


def test_section_and_malformed_overrides():
    with pytest.raises(ValueError, match="is a section"):
        C.apply_overrides(C.RunConfig(), ["optim=3"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        C.apply_overrides(C.RunConfig(), ["optim.learning_rate"])


@pytest.mark.parametrize("overrides,message", [
    (["rl.group_size=3"], "rollout_batch_size=.* not divisible by rl.group_size=3"),
    (["rl.rollout_batch_size=18", "rl.group_size=2", "train.minibatch_size=18"],
     r"rl.rollout_batch_size=18 is not divisible by the data axis \(data x fsdp = 4"),
    (["data.template=chatml"], "unknown template 'chatml'"),
    (["rl.loss=ppo"], "unknown loss 'ppo'"),
    (["rl.aggregation=sum"], "rl.aggregation"),
    (["train.minibatch_size=7"], "not divisible by train.minibatch_size=7"),
    (["mesh.spec=data=3,tensor=2"], "needs 6 devices, but 8 are available"),
    (["mesh.spec=rows=8"], "unknown axis 'rows'"),
])
def test_bad_configs_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        C.load_config("cpu_smoke", overrides)


def test_mesh_spec_resolution():
    assert C.parse_mesh_spec("data=-1,tensor=2", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert C.parse_mesh_spec("data=-1,tensor=2") == {"data": -1, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="not divisible"):
        C.parse_mesh_spec("data=-1,tensor=3", 8)


def test_from_dict_rejects_unknown_keys_and_bad_types():
    d = C.to_dict(C.RunConfig())
    d["rl"]["gamma"] = 1.0
    with pytest.raises(ValueError, match="gamma"):
        C.from_dict(d)
    d = C.to_dict(C.RunConfig())
    d["train"]["steps"] = "many"
    with pytest.raises(ValueError, match="steps"):
        C.from_dict(d)


def test_missing_config_lists_known_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="cpu_smoke"):
        C.load_config("no_such_config")
    bad = tmp_path / "bad.py"
    bad.write_text("def config():\n    return {}\n")
    with pytest.raises(ValueError, match="expected RunConfig"):
        C.load_config(str(bad))


def test_config_file_path_and_default_name(tmp_path):
    p = tmp_path / "mine.py"
    p.write_text("from r1zero_jax.config import RunConfig\n"
                 "def config():\n    return RunConfig()\n")
    cfg = C.load_config(str(p), ["mesh.spec=data=1"])
    assert cfg.name == "mine" and dataclasses.is_dataclass(cfg)


def test_every_numeric_field_has_a_range():
    numeric = [k for k in C.leaf_keys() if isinstance(C._get_key(C.RunConfig(), k), (int, float))
               and not isinstance(C._get_key(C.RunConfig(), k), bool)]
    assert sorted(numeric) == sorted(C.RANGES)


@pytest.mark.parametrize("item,message", [
    ("eval.batch_size=0", r"eval.batch_size=0 is out of range; allowed: \[1, inf\)"),
    ("optim.learning_rate=nan", r"optim.learning_rate=nan: must be a finite number in \[0, inf\)"),
    ("optim.learning_rate=inf", r"optim.learning_rate=inf: must be a finite number"),
    ("train.warmup_sft_steps=-5",
     r"train.warmup_sft_steps=-5 is out of range; allowed: \[0, inf\)"),
    ("train.minibatch_size=0", r"train.minibatch_size=0 is out of range; allowed: \[1, inf\)"),
    ("sampling.temperature=-1", r"sampling.temperature=-1.0 is out of range; allowed: \[0, inf\)"),
    ("sampling.top_p=-0.5", r"sampling.top_p=-0.5 is out of range; allowed: \(0, 1\]"),
    ("checkpoint.keep_last=0", r"checkpoint.keep_last=0 is out of range; allowed: \[1, inf\)"),
    ("checkpoint.every=-1", r"checkpoint.every=-1 is out of range; allowed: \[0, inf\)"),
    ("rl.clip_low=1", r"rl.clip_low=1.0 is out of range; allowed: \[0, 1\)"),
    ("rl.group_size=1", r"rl.group_size=1 is out of range; allowed: \[2, inf\)"),
])
def test_bad_numbers_name_key_value_and_range(item, message):
    with pytest.raises(ValueError, match=message):
        C.load_config("cpu_smoke", [item])


@pytest.mark.parametrize("overrides,message", [
    (["sampling.max_new_tokens=120"],
     r"max_new_tokens = 136 exceeds model.max_position_embeddings=128"),
    (["eval.max_new_tokens=200"], r"max_new_tokens = 216 exceeds"),
    (["sampling.top_k=33"], r"sampling.top_k=33 exceeds model.vocab_size=32"),
    (["checkpoint.keep_every=15"],
     r"checkpoint.keep_every=15 is not a multiple of checkpoint.every=10"),
    (["model.num_kv_heads=3"], r"model.num_heads=4 must be a multiple of model.num_kv_heads=3"),
])
def test_cross_field_constraints(overrides, message):
    with pytest.raises(ValueError, match=message):
        C.load_config("cpu_smoke", overrides)


# Each issue example through the real CLI in one fresh process: refused before JAX (so before
# any model, dataset or device work) and quickly, with nothing written to the workdir.
_REFUSALS = r"""
import contextlib, io, json, os, sys, time
from r1zero_jax.cli import main
out = []
for item in sys.argv[2:]:
    err, t0 = io.StringIO(), time.monotonic()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "cpu_smoke", "--workdir", sys.argv[1], "--set", item])
    out.append({"item": item, "rc": rc, "s": time.monotonic() - t0, "err": err.getvalue()})
print(json.dumps({"results": out, "jax": "jax" in sys.modules, "wd": os.path.exists(sys.argv[1])}))
"""

ISSUE_EXAMPLES = ["eval.batch_size=0", "optim.learning_rate=nan", "train.warmup_sft_steps=-5",
                  "train.minibatch_size=0", "sampling.temperature=-1", "sampling.top_p=-0.5",
                  "checkpoint.keep_last=0", "checkpoint.every=-1"]


def test_cli_refuses_each_bad_number_before_any_model_work(tmp_path):
    t0 = time.monotonic()
    wd = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", _REFUSALS, wd, *ISSUE_EXAMPLES],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert not report["jax"] and not report["wd"]
    for r in report["results"]:
        key = r["item"].split("=")[0]
        assert r["rc"] == 2 and r["s"] < 10, r
        assert r["err"].startswith(f"r1zero-jax train: error: {key}="), r
    assert time.monotonic() - t0 < 60
