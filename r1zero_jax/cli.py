"""`r1zero-jax` command line: argument parsing only; each command calls one library function.

Library modules are imported inside each command so `r1zero-jax --help` stays fast and so
`train` can set up virtual CPU devices before JAX is imported.
"""

import argparse
import os
import sys

from r1zero_jax import dtypes
from r1zero_jax.rewards.templates import TEMPLATES


def _forward(module: str, name: str):
    """A command that passes every parsed option to `module.name` as keyword arguments; the
    module is imported only when the command runs."""
    def run(a):
        import importlib

        fn = getattr(importlib.import_module(module), name)
        return fn(**{k: v for k, v in vars(a).items() if k not in ("func", "command")})

    return run


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face and r1zero-jax")
    conv = p.add_subparsers(dest="direction", required=True)
    f = conv.add_parser("from-hf", help="HF safetensors directory -> r1zero-jax checkpoint")
    f.add_argument("hf_dir")
    f.add_argument("out")
    t = conv.add_parser("to-hf", help="r1zero-jax checkpoint -> HF directory")
    t.add_argument("ckpt")
    t.add_argument("out")
    t.add_argument("--dtype", choices=dtypes.NAMES, default=None,
                   help="default: the checkpoint's own dtype (lossless)")

    def run(a):
        from r1zero_jax.convert import hf

        if a.direction == "from-hf":
            hf.convert_from_hf(a.hf_dir, a.out)
        else:
            hf.convert_to_hf(a.ckpt, a.out, dtype=a.dtype)

    p.set_defaults(func=run)


def _add_generate(sub):
    p = sub.add_parser("generate", help="sample completions from a model")
    p.add_argument("--model", required=True, help="HF directory or r1zero-jax checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    src.add_argument("--prompts-file", help="JSONL rows with `prompt` or `problem`")
    p.add_argument("--template", default="qwen_math", choices=sorted(TEMPLATES))
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--mesh", default="data=-1")
    p.add_argument("--dtype", choices=dtypes.NAMES, default="bfloat16")
    p.add_argument("--output", help="write one JSON row per sample here")

    p.set_defaults(func=_forward("r1zero_jax.sampling.generate", "generate_cli"))


def _add_grade(sub):
    p = sub.add_parser("grade", help="grade responses against reference answers")
    p.add_argument("--input", required=True,
                   help="JSONL with `response`, `answer`, optional `template`")
    p.add_argument("--output", help="JSONL: input rows plus `reward` and `extracted`")
    p.add_argument("--workers", type=int, default=None)

    def run(a):
        from r1zero_jax.rewards.pool import grade_file

        return grade_file(a.input, a.output, workers=a.workers)

    p.set_defaults(func=run)


def _add_process_args(p):
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)


def _add_train(sub):
    p = sub.add_parser("train", help="Dr. GRPO training from a config in configs/")
    p.add_argument("config", help="path to a configs/*.py file, or a config name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume an existing workdir even though the config differs")
    _add_process_args(p)

    p.set_defaults(func=_forward("r1zero_jax.rl.launch", "train_cli"))


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate on the paper's benchmarks (Table 4 layout)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF directory or r1zero-jax checkpoint")
    src.add_argument("--responses", default=None,
                     help="re-grade a saved generations.jsonl (no model)")
    p.add_argument("--benchmarks", default=None,
                   help="comma-separated (default: aime24,amc23,math500,minerva_math,"
                        "olympiad_bench; with --responses: all in the file)")
    p.add_argument("--template", default="qwen_math", choices=sorted(TEMPLATES))
    p.add_argument("--max-new-tokens", type=int, default=3000)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--n", type=int, default=1, help="samples per problem (pass@k, mean@k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first K problems of each benchmark")
    p.add_argument("--data-dir", default=None,
                   help="directory of <name>.jsonl (or evaluation_suite/<name>.jsonl), read as "
                        "is; else a TFDS data dir")
    p.add_argument("--source-dir", default=None,
                   help="JSONL directory to build the TFDS datasets in --data-dir from")
    p.add_argument("--output-dir", default=None, help="default: eval_results/<model name>")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model's)")
    p.add_argument("--mesh", default="data=-1")
    p.add_argument("--dtype", choices=dtypes.NAMES, default="bfloat16")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per sampler call")
    p.add_argument("--decode-slots", type=int, default=0,
                   help="continuous batching over each benchmark on this many decode slots "
                        "(0: static calls of --batch-size)")
    p.add_argument("--page-size", type=int, default=0,
                   help="with --decode-slots: a paged KV cache of pages of this many tokens")
    p.add_argument("--cache-pages", type=int, default=0,
                   help="with --page-size: pages in the pool (0: every slot at full length)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="skip (and count) longer prompts")
    p.add_argument("--workers", type=int, default=None, help="grader processes")
    p.add_argument("--grader-timeout", type=float, default=5.0,
                   help="CPU seconds per response (independent of machine load)")
    _add_process_args(p)

    p.set_defaults(func=_forward("r1zero_jax.eval", "eval_cli"))


def _add_plan(sub):
    p = sub.add_parser("plan", help="per-chip memory plan of a config, analytic or compiled for "
                                    "a TPU topology (exit status 1 when it does not fit)")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--topology", default=None, help="e.g. v4-64, v5p-128, v5e-256")
    p.add_argument("--json", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="compile the learner step, prefill and decode loop for the topology with "
                        "libtpu and report XLA's per-chip memory and collectives (needs libtpu)")

    def run(a):
        from r1zero_jax.plan import plan_cli

        return plan_cli(a.config, overrides=a.overrides, topology=a.topology, as_json=a.json,
                        compile=a.compile)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1zero-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_convert, _add_generate, _add_grade, _add_train, _add_eval, _add_plan):
        add(sub)
    return parser


def main(argv=None) -> int:
    from r1zero_jax.paths import StorageError
    from r1zero_jax.run_lock import RunLockedError

    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError, StorageError, RunLockedError) as e:
        # Library errors are written for users; a traceback would bury the message.
        print(f"r1zero-jax {args.command}: error: {e}", file=sys.stderr)
        if argv is None and isinstance(e, StorageError):
            # The command line: a failed checkpoint write can leave Orbax's (non-daemon)
            # threads waiting for a signal that never comes, holding the process at exit.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
