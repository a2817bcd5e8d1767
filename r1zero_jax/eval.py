"""Benchmark evaluation: sample, grade, score, and print the paper's Table 4 layout.

One record per sampled response: {benchmark, index (problem position in the benchmark), sample,
problem, answer, template, response, length (tokens), finish_reason ('stop' / 'length'), and,
once graded, extracted, correct, timed_out}. Records are what `generations.jsonl` holds and what
`--responses` reads back, so a saved run can be re-graded after a grader fix without a model.

Scores per benchmark: `accuracy` is the mean correctness over all responses (mean@n; with greedy
n=1 the paper's Table 4 number); with n > 1 also unbiased pass@k (Chen et al. 2021) for k = 1, 2,
4, ... and n. A response cut at max_new_tokens is graded on its text like any other (as in the
paper's evaluation) and counted in `truncation_rate`. `average` is the unweighted mean of the
benchmarks' accuracies (Table 4's Avg. column).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from r1zero_jax import dtypes, jsonl
from r1zero_jax.analysis import length_by_correctness, self_reflection
from r1zero_jax.data.builders import (BENCHMARKS, find_local_file, load_split, read_jsonl_rows,
                                     validate_row)
from r1zero_jax.data.pipeline import make_encoder
from r1zero_jax.progress import Progress
from r1zero_jax.rewards.templates import check_template

# Column headers of the paper's Table 4.
DISPLAY_NAMES = {"aime24": "AIME24", "amc23": "AMC", "math500": "MATH500",
                 "minerva_math": "Minerva", "olympiad_bench": "OlympiadBench"}
RESULTS_FILE, GENERATIONS_FILE = "results.json", "generations.jsonl"


# ---------------------------------------------------------------------------------------------
# Scores (pure)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a product so
    large n does not overflow."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_for(n: int) -> list[int]:
    """The k reported for n samples per problem: powers of two below n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
    return ks + [n]


def score(records: Sequence[dict]) -> dict:
    """Scores of one benchmark's graded records (any number of samples per problem)."""
    if not records:
        raise ValueError("no records to score")
    groups: dict[Any, list[dict]] = {}
    for r in records:
        groups.setdefault(r["index"], []).append(r)
    per_problem = [(len(g), sum(bool(r["correct"]) for r in g)) for g in groups.values()]
    n_min, n_max = min(n for n, _ in per_problem), max(n for n, _ in per_problem)
    correct = [bool(r["correct"]) for r in records]
    lengths = [r["length"] for r in records if r.get("length") is not None]
    finished = [r["finish_reason"] for r in records if r.get("finish_reason") is not None]
    out = {
        "accuracy": float(np.mean(correct)),
        "n": len(groups),
        "responses": len(records),
        "samples_per_problem": n_min if n_min == n_max else [n_min, n_max],
        "correct": int(sum(correct)),
        "mean_response_length": float(np.mean(lengths)) if lengths else None,
        "truncation_rate": (float(np.mean([f == "length" for f in finished]))
                            if finished else None),
        "no_answer_rate": float(np.mean([r.get("extracted") is None for r in records])),
        "grader_timeouts": int(sum(bool(r.get("timed_out")) for r in records)),
    }
    if n_max > 1:
        # Each problem's accuracy weighs the same, whatever its sample count.
        out[f"mean@{n_min}"] = float(np.mean([c / n for n, c in per_problem]))
        for k in ks_for(n_min):
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in per_problem]))
    out["self_reflection"] = dataclasses.asdict(
        self_reflection([[r["response"] for r in g] for g in groups.values()]))
    out["length_by_correctness"] = (dataclasses.asdict(length_by_correctness(lengths, correct))
                                    if len(lengths) == len(records) else None)
    return out


def summarize(records_by_benchmark: Mapping[str, Sequence[dict]],
              skipped: Mapping[str, int] | None = None) -> dict:
    """{"benchmarks": {name: score}, "average": mean accuracy, "average_metrics": unweighted
    means of every scalar score the benchmarks share, "analysis": over all responses}."""
    benchmarks = {}
    for name, records in records_by_benchmark.items():
        benchmarks[name] = score(records)
        benchmarks[name]["skipped_prompts"] = int((skipped or {}).get(name, 0))
    if not benchmarks:
        raise ValueError("no benchmark to summarize")
    scalars = [k for k, v in next(iter(benchmarks.values())).items()
               if isinstance(v, float) or k.startswith(("pass@", "mean@"))]
    average_metrics = {}
    for key in scalars:
        values = [b.get(key) for b in benchmarks.values()]
        if all(isinstance(v, (int, float)) for v in values):
            average_metrics[key] = float(np.mean(values))
    everything = [r for records in records_by_benchmark.values() for r in records]
    groups: dict[Any, list[str]] = {}
    for name, records in records_by_benchmark.items():
        for r in records:
            groups.setdefault((name, r["index"]), []).append(r["response"])
    analysis = {"self_reflection": dataclasses.asdict(self_reflection(list(groups.values()))),
                "length_by_correctness": None}
    if all(r.get("length") is not None for r in everything):
        analysis["length_by_correctness"] = dataclasses.asdict(length_by_correctness(
            [r["length"] for r in everything], [bool(r["correct"]) for r in everything]))
    return {"benchmarks": benchmarks, "average": average_metrics["accuracy"],
            "average_metrics": average_metrics, "analysis": analysis}


# ---------------------------------------------------------------------------------------------
# Table 4


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def format_table(results: dict, label: str = "model") -> str:
    """The paper's Table 4 layout: one column per benchmark and the unweighted average; rows
    for accuracy (%), pass@k / mean@k when sampled, mean response length and truncation rate."""
    names = list(results["benchmarks"])
    bench = results["benchmarks"]
    avg = results["average_metrics"]
    rows: list[tuple[str, list[str]]] = [(label, [_pct(bench[b]["accuracy"]) for b in names]
                                          + [_pct(results["average"])])]
    for key in avg:
        if key.startswith(("mean@", "pass@")):
            rows.append((f"  {key}", [_pct(bench[b].get(key)) for b in names] + [_pct(avg[key])]))
    rows.append(("mean response length (tokens)",
                 [_num(bench[b]["mean_response_length"]) for b in names]
                 + [_num(avg.get("mean_response_length"))]))
    rows.append(("truncation rate (%)", [_pct(bench[b]["truncation_rate"]) for b in names]
                 + [_pct(avg.get("truncation_rate"))]))
    rows.append(("problems", [str(bench[b]["n"]) for b in names] + [""]))
    for key, title in (("grader_timeouts", "grader timeouts"), ("skipped_prompts",
                                                                "skipped prompts (too long)")):
        if any(bench[b].get(key) for b in names):
            rows.append((title, [str(bench[b].get(key, 0)) for b in names] + [""]))
    header = [DISPLAY_NAMES.get(b, b) for b in names] + ["Avg."]
    first = max(len(r[0]) for r in rows + [("Model", [])])
    widths = [max(len(h), *(len(r[1][i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda head, cells: "  ".join(  # noqa: E731
        [head.ljust(first)] + [c.rjust(w) for c, w in zip(cells, widths, strict=False)])
    out = [line("Model", header), "-" * len(line("Model", header))]
    out += [line(h, cells) for h, cells in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Benchmark rows


def load_benchmarks(names: Sequence[str], data_dir: str | None = None,
                    source_dir: str | None = None, limit: int | None = None
                    ) -> dict[str, list[dict]]:
    """Rows {problem, answer} per benchmark, the first `limit` of each.

    `data_dir` holding `<name>.jsonl` (directly or under evaluation_suite/) is read as is (then
    every benchmark must be there); otherwise it is a TFDS data dir (TFDS's default when None)
    where each benchmark is built on first use, from `source_dir`'s JSONL when given, else by
    downloading the paper's release."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    jsonl_dir = data_dir is not None and source_dir is None and any(
        os.path.isfile(os.path.join(data_dir, sub, f"{name}.jsonl"))
        for name in names for sub in ("", "evaluation_suite"))
    out = {}
    for name in names:
        rows = (read_jsonl_rows(find_local_file(data_dir, name)) if jsonl_dir
                else load_split(name, data_dir, source_dir))
        if not rows:
            raise ValueError(f"benchmark {name!r} has no usable rows")
        out[name] = rows[:limit]
    return out


def parse_benchmarks(spec: str | Sequence[str] | None, known: bool = True) -> list[str]:
    """Benchmark names from 'a,b,c' (all five when None); `known`: only the paper's five."""
    names = list(BENCHMARKS) if spec is None else (
        [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec))
    unknown = [b for b in names if known and b not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark listed twice in {names}")
    return names


# ---------------------------------------------------------------------------------------------
# Sampling and grading


def grade_records(records: list[dict], pool, default_template: str = "qwen_math") -> list[dict]:
    """Sets `extracted`, `correct`, `timed_out` on each record (its own `template` first)."""
    by_template: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_template.setdefault(check_template(r.get("template") or default_template), []).append(i)
    for template, ids in by_template.items():
        results = pool.grade([records[i]["response"] for i in ids],
                             [records[i]["answer"] for i in ids], template)
        for i, g in zip(ids, results, strict=False):
            records[i].update(extracted=g.extracted, correct=g.reward > 0, timed_out=g.timed_out)
    return records


def sample_benchmark(model, tokenizer, name: str, rows: Sequence[dict], params, *, task, mesh,
                     pool, batch_size: int = 64, seed: int = 0,
                     max_prompt_tokens: int | None = None, progress: Progress | None = None,
                     continuous: dict | None = None) -> tuple[list[dict], int]:
    """Graded records (ordered by index, then sample) of one benchmark, and how many prompts
    were skipped for exceeding `max_prompt_tokens`. Prompts go through the one generation path
    in calls of `batch_size`, shortest first (narrow calls for short prompts); each call's
    responses are graded as the next one samples. `continuous`: generate's decode_slots,
    page_size and cache_pages: one continuous batch over the benchmark instead (graded at the
    end; every slot busy until the last rows, where a static call waits for its longest)."""
    from r1zero_jax.sampling.generation import generate
    from r1zero_jax.tasks import score

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompt_ids = make_encoder(tokenizer)([task.prompt(r) for r in rows])
    keep = [i for i, t in enumerate(prompt_ids) if max_prompt_tokens is None
            or len(t) <= max_prompt_tokens]
    skipped = len(rows) - len(keep)
    if skipped:
        print(f"eval {name}: skipped {skipped} prompts longer than {max_prompt_tokens} tokens",
              file=sys.stderr)
        if progress is not None:
            progress.update(progress.done + skipped, note=name)
    if not keep:
        raise ValueError(f"no prompt of {name} fits max_prompt_tokens={max_prompt_tokens}")
    keep.sort(key=lambda i: len(prompt_ids[i]))
    template = getattr(task, "template", None)
    records: list[dict] = []
    done0, tokens0 = (progress.done, progress.tokens) if progress is not None else (0, 0)
    generated = 0  # tokens of the calls graded so far

    def grade_call(first: int, out) -> None:
        nonlocal generated
        idx = keep[first:first + out.size // params.n]
        answers = [rows[i]["answer"] for i in idx for _ in range(params.n)]
        s = score(task, pool, out.texts, answers)
        for r, (i, j) in enumerate((i, j) for i in idx for j in range(params.n)):
            records.append({"benchmark": name, "index": i, "sample": j,
                            "problem": rows[i]["problem"], "answer": rows[i]["answer"],
                            "template": template, "response": out.texts[r],
                            "length": int(out.lengths[r]),
                            "finish_reason": str(out.finish_reason[r]),
                            "extracted": s.extracted[r], "correct": bool(s.correct[r]),
                            "timed_out": bool(s.timed_out[r])})
        generated += int(out.lengths.sum())
        if progress is not None:
            progress.update(done0 + first + len(idx), tokens=tokens0 + generated, note=name)

    def report(rows_done: int, tokens_done: int) -> None:  # a call can decode for minutes
        progress.update(done0 + rows_done // params.n, tokens=tokens0 + tokens_done, note=name)

    generate(model, [prompt_ids[i] for i in keep], params, tokenizer=tokenizer, mesh=mesh,
             seed=seed, prompts_per_call=batch_size, on_call=grade_call,
             on_progress=report if progress is not None else None, **(continuous or {}))
    records.sort(key=lambda r: (r["index"], r["sample"]))
    return records, skipped


def evaluate(model, tokenizer, rows_by_benchmark: Mapping[str, Sequence[dict]], params, *,
             task, mesh, pool, seed: int = 0, batch_size: int = 64,
             max_prompt_tokens: int | None = None, progress: bool = False,
             on_benchmark: Callable[[str, list[dict]], None] | None = None,
             continuous: dict | None = None) -> dict:
    """Sample (`params`, a SamplingParams) and grade every benchmark with `task`'s prompts and
    rewards; the `summarize` dict (results.json's scores). The `eval` command and the trainer's
    held-out eval both come here.

    `rows_by_benchmark`: {name: [rows]}, any names; `pool`: a grader pool running the task's
    reward function; `on_benchmark` receives each benchmark's graded records as soon as it is
    done (to write them); `continuous`: see `sample_benchmark`. Truncated responses are graded
    on their text, as in the paper's evaluation (training instead gives them 0, see
    rl/trainer.py)."""
    if not rows_by_benchmark or not all(rows_by_benchmark.values()):
        raise ValueError("evaluate needs at least one benchmark, each with rows")
    bar = None
    if progress:
        import jax

        # Every process must run the same programs (progress splits the decode loop into
        # calls); process 0 alone prints.
        quiet = jax.process_index() != 0
        bar = Progress("eval", sum(map(len, rows_by_benchmark.values())), "problems",
                       printer=(lambda line: None) if quiet else None)
    records, skipped = {}, {}
    for name, rows in rows_by_benchmark.items():
        records[name], skipped[name] = sample_benchmark(
            model, tokenizer, name, rows, params, task=task, mesh=mesh, pool=pool,
            batch_size=batch_size, seed=seed, max_prompt_tokens=max_prompt_tokens, progress=bar,
            continuous=continuous)
        if on_benchmark is not None:
            on_benchmark(name, records[name])
        if bar is not None:
            bar.update(note=f"{name} done: accuracy "
                            f"{np.mean([r['correct'] for r in records[name]]):.3f}", force=True)
    return summarize(records, skipped)


# ---------------------------------------------------------------------------------------------
# Saved generations


REQUIRED_FIELDS = ("benchmark", "response", "answer")


def read_responses(path: str, benchmarks: Iterable[str] | None = None
                   ) -> dict[str, list[dict]]:
    """Records of a generations JSONL by benchmark (file order of first appearance), each
    needing `benchmark`, `response` and `answer`; rows without `index` count as one problem
    each. `benchmarks` keeps only those (all must be present)."""
    by_name: dict[str, list[dict]] = {}
    for line_no, row in jsonl.read_objects(path):
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path}:{line_no}: a row needs {missing}")
        if not isinstance(row["response"], str):
            raise ValueError(f"{path}:{line_no}: `response` is not a string")
        why = validate_row({"problem": "-", "answer": row["answer"]})
        if why is not None:
            raise ValueError(f"{path}:{line_no}: {why}")
        records = by_name.setdefault(str(row["benchmark"]), [])
        row.setdefault("index", f"row{line_no}")
        records.append(row)
    if not by_name:
        raise ValueError(f"{path}: no generations")
    if benchmarks is not None:
        wanted = list(benchmarks)
        absent = [b for b in wanted if b not in by_name]
        if absent:
            raise ValueError(f"{path}: no generations for {absent} (it holds {sorted(by_name)})")
        by_name = {b: by_name[b] for b in wanted}
    return by_name


def regrade(records_by_benchmark: Mapping[str, list[dict]], pool, template: str = "qwen_math",
            progress: bool = True) -> dict[str, list[dict]]:
    """Grade saved generations again (their own `template` first, else `template`)."""
    bar = Progress("eval", sum(map(len, records_by_benchmark.values())), "responses",
                   every_s=5.0) if progress else None
    for name, records in records_by_benchmark.items():
        for start in range(0, len(records), 1024):
            grade_records(records[start:start + 1024], pool, template)
            if bar is not None:
                bar.update(bar.done + len(records[start:start + 1024]), note=name)
    return dict(records_by_benchmark)


def write_jsonl(path: str, records: Iterable[dict], append: bool = False) -> None:
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Command line


def eval_cli(model: str | None = None, benchmarks: str | None = None,
             template: str = "qwen_math", max_new_tokens: int = 3000, temperature: float = 0.0,
             n: int = 1, limit: int | None = None, data_dir: str | None = None,
             output_dir: str | None = None, mesh: str = "data=-1", batch_size: int = 64,
             responses: str | None = None, source_dir: str | None = None,
             tokenizer: str | None = None, top_p: float = 1.0, seed: int = 0,
             dtype: str = "bfloat16", max_prompt_tokens: int | None = None,
             workers: int | None = None, grader_timeout: float = 5.0,
             coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, decode_slots: int = 0, page_size: int = 0,
             cache_pages: int = 0) -> int:
    """`r1zero-jax eval`: print Table 4, write results.json and generations.jsonl.

    With several processes (a pod, or --coordinator ...), every process samples its share of
    each batch on the global mesh and grades its share of the responses; the verdicts are
    gathered, and process 0 alone prints and writes the files."""
    from r1zero_jax.rewards.pool import GraderPool

    check_template(template)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    for flag, v in (("--decode-slots", decode_slots), ("--page-size", page_size),
                    ("--cache-pages", cache_pages)):
        if v < 0:
            raise ValueError(f"{flag} must be >= 0, got {v}")
    if (page_size or cache_pages) and not decode_slots:
        raise ValueError("--page-size and --cache-pages page the cache of continuous batching: "
                         "set --decode-slots too")
    continuous = (dict(decode_slots=decode_slots, page_size=page_size, cache_pages=cache_pages)
                  if decode_slots else None)
    if (model is None) == (responses is None):
        raise ValueError("give either --model (sample and grade) or --responses (re-grade)")
    names = (None if benchmarks is None and responses is not None
             else parse_benchmarks(benchmarks, known=responses is None))
    if output_dir is None:
        output_dir = os.path.join("eval_results", _label(model or responses))
    if responses is not None and os.path.abspath(responses) == os.path.abspath(
            os.path.join(output_dir, GENERATIONS_FILE)):
        raise ValueError(f"--responses {responses} would be overwritten; choose another "
                         "--output-dir")
    gen_path = os.path.join(output_dir, GENERATIONS_FILE)
    run = {"template": template, "limit": limit}
    writer = True
    if model is not None:
        from r1zero_jax import distributed

        distributed.initialize(coordinator, num_processes, process_id)
        writer = distributed.is_main_process()
    start = time.monotonic()
    with GraderPool(workers, timeout_s=grader_timeout) as pool:
        if responses is not None:
            records = read_responses(responses, names)
            if limit is not None:
                records = {b: [r for r in rs if r["index"] in _first_indices(rs, limit)]
                           for b, rs in records.items()}
            records = regrade(records, pool, template)
            os.makedirs(output_dir, exist_ok=True)
            write_jsonl(gen_path, (r for rs in records.values() for r in rs))
            results = summarize(records)
            run |= {"responses": os.path.abspath(responses)}
        else:
            results, run = _eval_model(
                model, names, run, pool, gen_path,
                max_new_tokens=max_new_tokens, temperature=temperature, n=n, limit=limit,
                data_dir=data_dir, source_dir=source_dir, mesh_spec=mesh, batch_size=batch_size,
                tokenizer_path=tokenizer, top_p=top_p, seed=seed, dtype=dtype,
                max_prompt_tokens=max_prompt_tokens, writer=writer, continuous=continuous)
    if not writer:
        return 0
    results = {**run, "seconds": round(time.monotonic() - start, 1), **results}
    with open(os.path.join(output_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2)
    print(format_table(results, label=_label(model or responses)))
    print(f"\nresults: {os.path.join(output_dir, RESULTS_FILE)}   generations: {gen_path}")
    return 0


def _first_indices(records: Sequence[dict], limit: int) -> set:
    return set(list(dict.fromkeys(r["index"] for r in records))[:limit])


def _label(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or "model"


def _eval_model(model_path, names, run, pool, gen_path, *, max_new_tokens, temperature, n, limit,
                data_dir, source_dir, mesh_spec, batch_size, tokenizer_path, top_p, seed, dtype,
                max_prompt_tokens, writer=True, continuous=None):
    from r1zero_jax.convert.hf import load_model, load_tokenizer
    from r1zero_jax.sampling.sampler import SamplingParams
    from r1zero_jax.sharding import make_mesh
    from r1zero_jax.tasks import MathTask

    dtypes.check(dtype, "--dtype")
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"--model {model_path} does not exist")
    task = MathTask(run["template"])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            n=n, stop_strings=task.stop_strings)
    # Fail on data and settings before the (slow) model load.
    rows = load_benchmarks(names, data_dir, source_dir, limit)
    tok = load_tokenizer(tokenizer_path or model_path)
    if tok is None:
        raise ValueError(f"no tokenizer in {tokenizer_path or model_path}; pass --tokenizer DIR "
                         "(a Hugging Face tokenizer directory)")
    mesh = make_mesh(mesh_spec)
    model, _, _ = load_model(model_path, mesh, dtype=dtypes.numpy_dtype(dtype))
    if writer:
        os.makedirs(os.path.dirname(gen_path) or ".", exist_ok=True)
        open(gen_path, "w").close()
    results = evaluate(
        model, tok, rows, params, task=task, seed=seed, batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens, mesh=mesh, pool=pool, progress=True,
        on_benchmark=(lambda name, records: write_jsonl(gen_path, records, append=True))
        if writer else None, continuous=continuous)
    run = {**run, "model": os.path.abspath(model_path), "mesh": mesh_spec, "dtype": dtype,
           "sampling": {"max_new_tokens": max_new_tokens, "temperature": temperature,
                        "top_p": top_p, "n": n, "seed": seed, "batch_size": batch_size,
                        **(continuous or {})}}
    return results, run
