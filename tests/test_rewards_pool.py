"""The bounded worker pool: hostile inputs, CPU-time bounds, dead workers at any moment, the
reward API and the CLI path."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from r1zero_jax.rewards import GraderPool, compute_rewards, grade_file
from r1zero_jax.rewards import pool as pool_module

CORPUS = os.path.join(os.path.dirname(__file__), "data", "grader_corpus.jsonl")

# 30 distinct symbolic items in reverse order: matching them takes ~0.1 s of sympy work.
_SLOW_ITEMS = [f"\\sqrt{{{k}}}+\\frac{{\\pi}}{{{k + 1}}}x^{{{k}}}" for k in range(2, 32)]
SLOW_PRED = "\\boxed{\\{" + ",".join(_SLOW_ITEMS) + "\\}}"
SLOW_REF = "\\{" + ",".join(reversed(_SLOW_ITEMS)) + "\\}"


@pytest.fixture(scope="module")
def pool():
    with GraderPool(workers=2, timeout_s=2.0) as p:
        p.grade(["\\boxed{\\sqrt{8}}"] * 2, ["2\\sqrt{2}"] * 2)  # workers up before timing
        yield p


def _pids(p: GraderPool) -> list[int]:
    return p.worker_pids()


def test_corpus_through_pool_matches_labels(pool):
    with open(CORPUS) as f:
        rows = [json.loads(line) for line in f]
    for template in ("qwen_math", "r1", "no"):
        sub = [r for r in rows if r["template"] == template]
        res = pool.grade([r["response"] for r in sub], [r["answer"] for r in sub], template)
        assert [r.reward for r in res] == [r["expected"] for r in sub]
        assert not any(r.timed_out for r in res)


def test_hostile_inputs_score_zero_fast_without_side_effects(pool, tmp_path):
    marker = tmp_path / "pwned"
    hostile = [
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f"\\boxed{{exec(\"open('{marker}', 'w')\")}}",
        "\\boxed{9^{9^{9^{9}}}}",
        "\\boxed{10^{10^{10^{10}}}}",
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
        "\\boxed{" + "\\sqrt{" * 10_000 + "1" + "}" * 10_000 + "}",
        "x" * 5_000_000 + "\\boxed{1}",
        "\\boxed{\\frac{1}{0}}",
        "\\boxed{(10^{100})!}",
        "\\boxed{" + "{" * 900 + "1" + "}" * 900 + "}",  # short enough to reach the parser
        "\\boxed{" + "\\sqrt{" * 250 + "2" + "}" * 250 + "}",
        "\\boxed{1e309}",  # once an OverflowError that escaped into the trainer
        "\\boxed{1e9999999}",  # once 50 s of the trainer's main thread
        "\\boxed{-1e9999999}", "\\boxed{1e-9999999}", "\\boxed{10^{1e9999}}",
    ]
    refs = ["0", "0", "1", "1", "1", "1", "1", "\\infty", "1", "2", "2", "1", "1", "1", "0", "1"]
    t = time.perf_counter()
    res = pool.grade(hostile, refs)
    assert time.perf_counter() - t < 2.0 + 1.0
    assert [r.reward for r in res] == [0.0] * len(hostile)
    assert all(r.reason for r in res)
    assert not marker.exists()
    # still serving, with correct answers
    assert [r.reward for r in pool.grade(["\\boxed{\\sqrt{8}}", "\\boxed{2}"],
                                         ["2\\sqrt{2}", "3"])] == [1.0, 0.0]


def test_timeout_kills_and_replaces_the_worker():
    with GraderPool(workers=1, timeout_s=0.01) as p:
        p.grade(["\\boxed{\\sqrt{8}}"], ["2\\sqrt{2}"])  # wait until a worker is up
        before, timeouts = _pids(p), p.timeouts
        res = p.grade([SLOW_PRED, "\\boxed{7}"], [SLOW_REF, "7"])
        assert res[0].timed_out and res[0].reward == 0.0
        assert res[1].reward == 1.0 and not res[1].timed_out  # fast path, unaffected
        assert _pids(p) != before and p.timeouts == timeouts + 1
        with pytest.raises(ProcessLookupError):
            os.kill(before[0], 0)
    # with time to spare, the same pair is a correct answer
    with GraderPool(workers=1, timeout_s=5.0) as p:
        assert p.grade([SLOW_PRED], [SLOW_REF])[0].reward == 1.0


def test_random_expressions_never_time_out(pool):
    """Seeded random nests of powers, factorials, logs, roots and big literals stay within bound."""
    rng = random.Random(0)
    atoms = ["x", "2", "10", "0", "e", "\\pi", "i", "0.5", "10^{100}", "99", "\\infty"]

    def gen(depth=0):
        if depth > 6 or rng.random() < 0.2:
            return rng.choice(atoms)
        a, b = gen(depth + 1), gen(depth + 1)
        return rng.choice([f"{a}+{b}", f"{a}{b}", f"\\frac{{{a}}}{{{b}}}", f"{{{a}}}^{{{b}}}",
                           f"({a})!", f"\\sqrt[{a}]{{{b}}}", f"\\log({a})", f"e^{{{a}}}",
                           f"\\binom{{{a}}}{{{b}}}"])

    exprs = [gen() for _ in range(300)]
    t = time.perf_counter()
    res = pool.grade([f"\\boxed{{{e}}}" for e in exprs], exprs[1:] + exprs[:1])
    assert not any(r.timed_out for r in res)
    assert time.perf_counter() - t < 30


def test_dead_workers_are_replaced_and_the_batch_completes(pool):
    pool.grade(["\\boxed{\\sqrt{8}}"], ["2\\sqrt{2}"])
    for pid in _pids(pool):
        os.kill(pid, signal.SIGKILL)
    res = pool.grade(["\\boxed{\\sqrt{8}}", "\\boxed{\\sqrt{12}}", "\\boxed{x+1}"],
                     ["2\\sqrt{2}", "2\\sqrt{3}", "1+x"])
    assert [r.reward for r in res] == [1.0, 1.0, 1.0]


def test_compute_rewards_api(pool):
    responses = ["so \\boxed{\\frac{1}{2}}", "so \\boxed{0.33}", "no box",
                 " a </think> <answer> 4 </answer>"]
    answers = ["0.5", "\\frac13", "1", ["4"]]
    assert compute_rewards(responses, answers, "qwen_math", pool=pool) == [1.0, 0.0, 0.0, 0.0]
    assert compute_rewards(responses, answers, "r1", pool=pool) == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        compute_rewards(["a", "b"], ["1"], pool=pool)
    with pytest.raises(TypeError, match="answer 0"):
        compute_rewards(["a"], [[]], pool=pool)
    with pytest.raises(TypeError, match="response 0 is bytes"):
        compute_rewards([b"a"], ["1"], pool=pool)


def test_rewards_package_does_not_import_jax():
    code = ("import sys, r1zero_jax.rewards; "
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_grade_file_writes_rows_and_reports(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [
        {"response": "\\boxed{3}", "answer": "3"},
        {"response": "\\boxed{(1,2)}", "answer": "(2,1)", "id": 7},
        {"response": " x </think> <answer> 5 </answer>", "answer": ["5"], "template": "r1"},
        {"response": "nothing", "answer": 21.0},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert grade_file(str(src), str(out), workers=1) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["reward"] for g in got] == [1.0, 0.0, 1.0, 0.0]
    assert [g["extracted"] for g in got] == ["3", "(1,2)", "5", None]
    assert [g["reason"] for g in got] == ["equal", "not equal", "equal", "no answer"]
    assert got[1]["id"] == 7
    assert "accuracy: 2/4 = 50.00%  timeouts: 0" in capsys.readouterr().out


def test_grade_file_names_bad_rows(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"response": "x", "answer": "1"}\n{"response": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a row needs `response` and `answer`"):
        grade_file(str(src))
    src.write_text('{"response": "x", "answer": "1", "template": "chat"}\n')
    with pytest.raises(ValueError, match="unknown template 'chat'"):
        grade_file(str(src))


def _sympy_rows(n: int, seed: int = 0) -> tuple[list[str], list[str], list[float]]:
    """n responses needing a few ms of sympy each ((\\sqrt a + \\sqrt b)^2 = a + b + 2\\sqrt{ab}),
    every third one wrong, every fifth a plain integer; and their true rewards."""
    rng = random.Random(seed)
    responses, refs, want = [], [], []
    for k in range(n):
        a, b = rng.randrange(2, 40), rng.randrange(2, 40)
        if k % 5 == 0:
            responses.append(f"so \\boxed{{{a * b}}}")
            refs.append(str(a * b + (k % 3 == 0)))
        else:
            responses.append(f"so \\boxed{{(\\sqrt{{{a}}}+\\sqrt{{{b}}})^2}}")
            refs.append(f"{a + b + (k % 3 == 0)}+2\\sqrt{{{a * b}}}")
        want.append(0.0 if k % 3 == 0 else 1.0)
    return responses, refs, want


def _server_children(p: GraderPool) -> list[int]:
    """Workers of the pool's server, ready or not (Linux /proc)."""
    pid = p.server_pid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def test_workers_killed_before_they_are_ready_are_replaced():
    """Issue 14: one worker dying before it reported ready broke the pool for good."""
    responses, refs, want = _sympy_rows(40)
    with GraderPool(workers=2, timeout_s=2.0) as p:
        os.kill(p.server_pid(), signal.SIGKILL)  # still importing sympy: no worker ever starts
        assert [r.reward for r in p.grade(responses, refs)] == want
        assert p.start_failures >= 2 and p.server_restarts >= 1
        # Now fork-time kills: every new worker dies as soon as it exists, a few times over.
        for pid in p.worker_pids():
            os.kill(pid, signal.SIGKILL)
        stop, killed = threading.Event(), []

        def killer():
            while not stop.is_set() and len(killed) < 6:
                for pid in _server_children(p):
                    if pid not in killed:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)

        t = threading.Thread(target=killer)
        t.start()
        try:
            res = p.grade(responses, refs)
        finally:
            stop.set()
            t.join()
        # A worker that got ready before the killer saw it may die mid-row: twice is a 0.
        assert all(r.reward == w or r.reason == "worker died"
                   for r, w in zip(res, want, strict=False))
        assert sum(r.reason == "worker died" for r in res) <= 3
        # ... and the server itself, once it is serving (idle workers killed cost no row)
        os.kill(p.server_pid(), signal.SIGKILL)
        for pid in p.worker_pids():
            os.kill(pid, signal.SIGKILL)
        assert [r.reward for r in p.grade(responses, refs)] == want


def test_a_worker_killed_every_half_second_over_5000_rows(caplog):
    """Every row answered, in order, right (bar a row that two kills happened to hit), and the
    deaths logged and counted."""
    responses, refs, want = _sympy_rows(5000)
    stop, kills = threading.Event(), []
    with GraderPool(workers=2, timeout_s=2.0) as p:
        p.grade(responses[:2], refs[:2])

        def killer():
            rng = random.Random(1)
            while not stop.wait(0.5):
                pids = p.worker_pids()
                if pids:
                    pid = rng.choice(pids)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append(pid)
                    except ProcessLookupError:
                        pass

        t = threading.Thread(target=killer)
        t.start()
        try:
            res = []
            for lo in range(0, len(responses), 1024):  # the trainer's batch size
                res += p.grade(responses[lo : lo + 1024], refs[lo : lo + 1024])
        finally:
            stop.set()
            t.join()
        deaths = p.worker_deaths
    assert len(res) == 5000 and all(r is not None for r in res)
    lost = {k for k, r in enumerate(res) if r.reason == "worker died"}  # two kills hit its row
    assert len(lost) <= 10
    kept = [k for k in range(len(res)) if k not in lost]
    boxed = [s[s.index("{") + 1 : -1] for s in responses]
    assert [res[k].extracted for k in kept] == [boxed[k] for k in kept]  # each row its own answer
    assert [res[k].reward for k in kept] == [want[k] for k in kept]
    assert len(kills) >= 4 and deaths >= len(kills) - 2  # a kill may land between two batches
    assert sum("grader worker" in m and "died" in m for m in caplog.messages) >= deaths


def test_a_row_past_its_budget_in_uninterruptible_code_is_killed_by_the_pool(monkeypatch):
    """The worker's CPU timer cannot interrupt a long call in C; the pool then kills on CPU time
    read from /proc (simulated: the pool's limit set far below the worker's own timer)."""
    monkeypatch.setattr(pool_module, "KILL_GRACE_S", -0.95)  # pool limit 0.05 s, worker timer 1 s
    with GraderPool(workers=1, timeout_s=1.0) as p:
        p.grade(["\\boxed{1}"], ["1"])
        pid = p.worker_pids()[0]
        res = p.grade([SLOW_PRED, "\\boxed{\\sqrt{8}}"], [SLOW_REF, "2\\sqrt{2}"])
        assert res[0].timed_out and res[0].reason == "timeout" and p.timeouts == 1
        assert res[1].reward == 1.0
        assert pid not in p.worker_pids()


def test_a_stopped_worker_is_replaced_and_its_row_graded_elsewhere(monkeypatch):
    monkeypatch.setattr(pool_module, "WALL_LIMIT_S", 1.0)
    with GraderPool(workers=1, timeout_s=0.5) as p:
        p.grade(["\\boxed{1}"], ["1"])
        os.kill(p.worker_pids()[0], signal.SIGSTOP)  # no CPU time passes: the wall limit sees it
        res = p.grade(["\\boxed{\\sqrt{8}}"], ["2\\sqrt{2}"])
        assert res[0].reward == 1.0 and p.worker_deaths == 1


def test_rewards_do_not_depend_on_machine_load():
    """Issue 14: the same 2,000 responses, graded idle and with a CPU-bound process on every core,
    get identical rewards. The bound is CPU time: expensive correct answers (~0.2 s of CPU
    each, a 0.5 s budget) pass under load, and ones far over it (~2 s) time out both times."""
    items = [f"\\sqrt{{{k}}}+\\frac{{\\pi}}{{{k + 1}}}x^{{{k}}}+\\frac{{{k}}}{{x+{k}}}"
             for k in range(2, 34)]
    heavy_pred = "\\boxed{\\{" + ",".join(items) + "\\}}"
    heavy_ref = "\\{" + ",".join(reversed(items)) + "\\}"
    # 20 values that differ only past their 1,500th digit, matched pairwise: ~2 s of CPU
    close = [f"\\cos(\\frac{{2\\pi}}{{7}})+\\cos(\\frac{{4\\pi}}{{7}})+{k}\\cdot10^{{-1500}}"
             for k in range(1, 21)]
    over_pred = "\\boxed{\\{" + ",".join(close) + "\\}}"
    over_ref = "\\{" + ",".join(reversed(close)) + "\\}"
    responses, refs, _ = _sympy_rows(288, seed=2)
    responses += [f"The answer is \\boxed{{{k % 97}}}." for k in range(1_700)]
    refs += [str(k % 89) for k in range(1_700)]
    responses += [heavy_pred] * 10 + [over_pred] * 2
    refs += [heavy_ref] * 10 + [over_ref] * 2
    order = random.Random(3).sample(range(len(responses)), len(responses))
    responses, refs = [responses[k] for k in order], [refs[k] for k in order]

    def run():
        with GraderPool(workers=2, timeout_s=0.5) as p:
            return p.grade(responses, refs)

    idle = run()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(os.cpu_count() or 2)]  # every core busy
    try:
        loaded = run()
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert [r.reward for r in loaded] == [r.reward for r in idle]
    heavy = [k for k, r in enumerate(responses) if r == heavy_pred]
    over = [k for k, r in enumerate(responses) if r == over_pred]
    assert all(idle[k].reward == 1.0 and loaded[k].reward == 1.0 for k in heavy)
    assert all(idle[k].timed_out and loaded[k].timed_out for k in over)


def test_step_metrics_count_grading_timeouts_and_lost_workers():
    import numpy as np

    from r1zero_jax.rl.metrics import rollout_metrics
    from r1zero_jax.rl.trainer import training_rewards
    from r1zero_jax.sampling.sampler import Rollout
    from r1zero_jax.tasks import MathTask, score

    texts = [SLOW_PRED, "\\boxed{2}", "\\boxed{3}", "no answer"]
    r = len(texts)
    rollout = Rollout(tokens=np.zeros((r, 2), np.int32), logprobs=np.zeros((r, 2), np.float32),
                      mask=np.ones((r, 2), bool), lengths=np.full(r, 2, np.int32),
                      finish_reason=np.array(["stop", "length", "stop", "stop"]), texts=texts)
    with GraderPool(workers=1, timeout_s=0.01) as p:
        p.grade(["\\boxed{1}"], ["1"])
        os.kill(p.worker_pids()[0], signal.SIGKILL)  # found dead when the step's rows arrive
        scores = score(MathTask(), p, texts, [SLOW_REF, "2", "4", "1"])
    rewards = training_rewards(rollout, scores)
    assert scores.rewards.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert rewards.tolist() == [0.0] * 4  # the right answer was cut at the length limit
    m = rollout_metrics(rollout, scores, rewards, group_size=2)
    assert m["accuracy"] == 0.25 and m["truncation_rate"] == 0.25
    assert m["grader_timeouts"] == 1 and m["grader_worker_deaths"] == 1


def _refuse(*args, **kwargs):
    raise BlockingIOError  # a fork server whose request queue stays full


def test_workers_that_can_never_start_back_off_then_raise(monkeypatch, caplog):
    """A server that cannot hand out workers (here: the socket refuses every request) must not
    spin: the pool backs off, logs a few lines, and gives up loudly after STARTUP_TIMEOUT_S."""
    monkeypatch.setattr(pool_module, "STARTUP_TIMEOUT_S", 3.0)
    monkeypatch.setattr(pool_module.socket, "send_fds", _refuse)
    t = time.perf_counter()
    with GraderPool(workers=2) as p:
        with pytest.raises(RuntimeError, match="(no grader worker could start|before any worker)"):
            p.grade(["\\boxed{1}"], ["1"])
        assert p.start_failures < 40
    assert time.perf_counter() - t < 15
    assert len(caplog.messages) < 30


def test_a_pool_that_worked_raises_only_after_startup_timeout_without_workers(monkeypatch):
    monkeypatch.setattr(pool_module, "STARTUP_TIMEOUT_S", 3.0)
    send_fds = pool_module.socket.send_fds
    with GraderPool(workers=1) as p:
        assert p.grade(["\\boxed{1}"], ["1"])[0].reward == 1.0
        monkeypatch.setattr(pool_module.socket, "send_fds", _refuse)
        os.kill(p.worker_pids()[0], signal.SIGKILL)
        t = time.perf_counter()
        with pytest.raises(RuntimeError, match="no grader worker could start"):
            p.grade(["\\boxed{1}"], ["1"])
        assert 3.0 < time.perf_counter() - t < 20 and p.start_failures < 40
        monkeypatch.setattr(pool_module.socket, "send_fds", send_fds)  # the cause goes away
        assert p.grade(["\\boxed{1}", "\\boxed{2}"], ["1", "1"])[0].reward == 1.0
