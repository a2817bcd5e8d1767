"""Grading throughput on a realistic mix, with math-verify as the baseline on the same rows.

    python benchmarks/grading.py [--data ../shared/data] [--workers N] [--mv-sample 300]

Mix (built from ../shared/data, never copied): MATH-500 gold worked solutions against their own
answer (correct, long text) and against another problem's answer (wrong); the five benchmarks'
reference answers boxed (correct; AMC floats, Minerva lists); the labelled corpus (every
equivalence form, hostile rows); responses cut before their box (no answer). Graded in batches of
1,024 as the trainer does. Also reports the string-match-only workload and the slowest single
in-process `is_equiv` call.
"""

import argparse
import contextlib
import glob
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from r1zero_jax.rewards import GraderPool, extract_answer, is_equiv, math_grader  # noqa: E402
from r1zero_jax.rewards.normalize import normalize  # noqa: E402
from r1zero_jax.rewards.pool import default_workers  # noqa: E402


def clear_caches() -> None:
    """Start cold: in training every response is new (references repeat, but count them cold)."""
    normalize.cache_clear()
    math_grader._parse.cache_clear()


def build_mix(data: str) -> tuple[list[tuple[str, object, str]], list[tuple[str, object, str]]]:
    """(response, answer, template) rows: the realistic mix, and its string-matching subset."""
    with open(os.path.join(data, "math500_gold_solutions.jsonl")) as f:
        gold = [json.loads(line) for line in f]
    mix = [(g["output"], g["gt_answer"], "qwen_math") for g in gold]
    mix += [(g["output"], gold[(k + 1) % len(gold)]["gt_answer"], "qwen_math")
            for k, g in enumerate(gold)]
    mix += [(g["output"][: g["output"].rfind("\\boxed")], g["gt_answer"], "qwen_math")
            for g in gold[:100]]
    string_rows = []
    for path in sorted(glob.glob(os.path.join(data, "evaluation_suite", "*.jsonl"))):
        with open(path) as f:
            for line in f:
                ans = json.loads(line)["answer"]
                first = ans[0] if isinstance(ans, list) else ans
                string_rows.append((f"Thus the answer is $\\boxed{{{first}}}$.", ans, "qwen_math"))
    mix += string_rows
    with open(os.path.join(HERE, "..", "tests", "data", "grader_corpus.jsonl")) as f:
        mix += [(r["response"], r["answer"], r["template"]) for r in map(json.loads, f)]
    random.Random(0).shuffle(mix)
    return mix, string_rows


def run_pool(pool: GraderPool, rows, batch: int = 1024) -> tuple[float, float, int]:
    """(responses/s, slowest batch in s, timeouts)."""
    by_t: dict[str, list] = {}
    for r in rows:
        by_t.setdefault(r[2], []).append(r)
    t0, worst, timeouts = time.perf_counter(), 0.0, 0
    for template, sub in by_t.items():
        for lo in range(0, len(sub), batch):
            chunk = sub[lo : lo + batch]
            tb = time.perf_counter()
            res = pool.grade([c[0] for c in chunk], [c[1] for c in chunk], template)
            worst = max(worst, time.perf_counter() - tb)
            timeouts += sum(r.timed_out for r in res)
    return len(rows) / (time.perf_counter() - t0), worst, timeouts


def slowest_call(rows) -> tuple[float, str]:
    worst, what = 0.0, ""
    for resp, ans, template in rows:
        t = time.perf_counter()
        pred = extract_answer(resp, template)
        if pred is not None:
            is_equiv(pred, ans if isinstance(ans, list) else str(ans))
        dt = time.perf_counter() - t
        if dt > worst:
            worst, what = dt, (pred or "")[:60]
    return worst, what


def math_verify_rate(rows) -> float:
    from math_verify import parse, verify

    t = time.perf_counter()
    for resp, ans, _ in rows:
        refs = ans if isinstance(ans, list) else [str(ans)]
        with contextlib.suppress(Exception):  # a baseline failure is a 0, as in its own use
            any(verify(parse(f"\\boxed{{{g}}}"), parse(resp)) for g in refs)
    return len(rows) / (time.perf_counter() - t)


def math_verify_agreement() -> None:
    """Our verdict vs math-verify's on the labelled corpus, disagreements listed with the label.

    math-verify sees the same response (for r1 rows: our extracted answer, boxed, or nothing when
    the strict format fails, since it has no notion of that format)."""
    from math_verify import parse, verify

    with open(os.path.join(HERE, "..", "tests", "data", "grader_corpus.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    agree, diff = 0, []
    for r in rows:
        refs = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        pred = extract_answer(r["response"], r["template"])
        ours = pred is not None and is_equiv(pred, r["answer"])
        text = r["response"] if r["template"] != "r1" else (pred and f"\\boxed{{{pred}}}")
        try:
            theirs = bool(text) and any(verify(parse(f"\\boxed{{{g}}}"), parse(text)) for g in refs)
        except Exception:  # noqa: BLE001
            theirs = False
        if ours == theirs:
            agree += 1
        else:
            diff.append((r["id"], r["category"], pred, r["answer"], r["expected"], ours, theirs))
    ours_right = sum(d[5] == bool(d[4]) for d in diff)
    print(f"agreement with math-verify on the corpus: {agree}/{len(rows)} = "
          f"{agree / len(rows):.1%}; "
          f"on {ours_right} of the {len(diff)} disagreements our verdict is the corpus label")
    for d in diff:
        print("  id={} {} pred={!r} ref={!r} label={} ours={} math-verify={}".format(*d))


def cross_agreement(data: str) -> None:
    """Each benchmark reference, boxed, graded against another random problem's reference: the
    verdicts of both graders (nearly all should be 0; a 1 must be a genuinely equal value)."""
    from math_verify import parse, verify

    answers = []
    for path in sorted(glob.glob(os.path.join(data, "evaluation_suite", "*.jsonl"))):
        with open(path) as f:
            answers += [a if isinstance(a, list) else [str(a)] for a in
                        (json.loads(line)["answer"] for line in f)]
    rng = random.Random(1)
    pairs = [(answers[rng.randrange(len(answers))][0].strip(), a) for a in answers]
    agree = ours_pos = 0
    for pred, refs in pairs:
        ours = is_equiv(pred, refs)
        try:
            theirs = any(verify(parse(f"\\boxed{{{g}}}"), parse(f"\\boxed{{{pred}}}"))
                         for g in refs)
        except Exception:  # noqa: BLE001
            theirs = False
        agree += ours == theirs
        ours_pos += ours
        if ours != theirs:
            print(f"  pred={pred!r} ref={refs!r} ours={ours} math-verify={theirs}")
    print(f"cross-problem pairs: {len(pairs)}, agreement {agree}/{len(pairs)}, "
          f"matched by us: {ours_pos}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mv-sample", type=int, default=300,
                    help="rows timed with math-verify (0: skip)")
    ap.add_argument("--agreement", action="store_true",
                    help="only compare verdicts with math-verify")
    a = ap.parse_args()
    if a.agreement:
        math_verify_agreement()
        return cross_agreement(a.data)
    mix, string_rows = build_mix(a.data)
    print(f"mix: {len(mix)} responses; string-match subset: {len(string_rows)}; "
          f"cpus: {os.cpu_count()}")
    for name, rows in (("string-match", string_rows), ("realistic mix", mix)):
        runs = []
        for _ in range(a.repeat):  # a fresh pool and empty caches each time: no warm-cache figures
            clear_caches()
            t = time.perf_counter()
            with GraderPool(a.workers) as pool:
                n = a.workers or default_workers()
                pool.grade(["\\boxed{x}"] * n, ["x+0"] * n)  # wait for the workers to be up
                start_s = time.perf_counter() - t
                runs.append(run_pool(pool, rows) + (start_s,))
        rates = sorted(r[0] for r in runs)
        print(f"{name}: {rates[len(rates) // 2]:.0f} responses/s "
              f"(median of {len(runs)}; min {rates[0]:.0f}), "
              f"slowest 1024-batch {max(r[1] for r in runs):.3f} s, "
              f"timeouts {sum(r[2] for r in runs)}, "
              f"pool start {runs[0][3]:.2f} s ({n} workers)")
    clear_caches()
    worst, what = slowest_call(mix)
    print(f"slowest single in-process call: {worst * 1e3:.1f} ms ({what!r})")
    if a.mv_sample:
        sample = mix[: a.mv_sample]
        clear_caches()
        t = time.perf_counter()
        slowest_call(sample)
        ours = len(sample) / (time.perf_counter() - t)
        print(f"same {len(sample)} rows, one process, no pool: ours {ours:.0f}/s, "
              f"math-verify {math_verify_rate(sample):.1f}/s")


if __name__ == "__main__":
    main()
