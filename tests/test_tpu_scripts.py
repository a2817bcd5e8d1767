"""tpu/ scripts: dry-run output for a v4-32 and a v5p-64, the supervisor's decisions, worker.sh."""

import importlib.util
import io
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("tpu_cli", os.path.join(ROOT, "tpu", "tpu.py"))
tpu = importlib.util.module_from_spec(_spec)
sys.modules["tpu_cli"] = tpu  # dataclasses look their module up there
_spec.loader.exec_module(tpu)

WHERE = {"v4-32": ("r1-15b", "us-central2-b", "proj-a"),
         "v5p-64": ("r1-7b", "us-east5-a", "proj-b")}
CONFIG = {"v4-32": "configs/qwen2_5_math_1_5b_dr_grpo.py",
          "v5p-64": "configs/qwen2_5_math_7b_dr_grpo.py"}


def dry(*argv) -> list[list[str]]:
    """The commands a dry run prints, each split back into argv (comments dropped)."""
    out = io.StringIO()
    assert tpu.main([*argv, "--dry-run"], out=out) == 0
    return [shlex.split(line) for line in out.getvalue().splitlines() if not line.startswith("#")]


def target(acc):
    name, zone, project = WHERE[acc]
    return ["--name", name, "--zone", zone, "--project", project]


def assert_where(cmd, acc):
    name, zone, project = WHERE[acc]
    assert cmd[:3] == ["gcloud", "compute", "tpus"]
    assert any(c == name or c.startswith(f"{name}:") for c in cmd)
    assert f"--zone={zone}" in cmd and f"--project={project}" in cmd


def remote(cmd) -> str:
    """The --command of an ssh argv, after checking it goes to all workers unless told."""
    assert cmd[3:5] == ["tpu-vm", "ssh"]
    return cmd[cmd.index("--command") + 1]


@pytest.mark.parametrize("acc", ["v4-32", "v5p-64"])
def test_create(acc):
    runtime = {"v4-32": "tpu-ubuntu2204-base", "v5p-64": "v2-alpha-tpuv5"}[acc]
    [cmd] = dry("create", *target(acc), "--accelerator-type", acc)
    assert_where(cmd, acc)
    assert cmd[3:6] == ["tpu-vm", "create", WHERE[acc][0]]
    assert f"--accelerator-type={acc}" in cmd and f"--version={runtime}" in cmd
    assert "--spot" not in cmd and "--preemptible" not in cmd
    [cmd] = dry("create", *target(acc), "--accelerator-type", acc, "--spot")
    assert "--spot" in cmd
    [cmd] = dry("create", *target(acc), "--accelerator-type", acc, "--preemptible")
    assert "--preemptible" in cmd
    [cmd] = dry("create", *target(acc), "--accelerator-type", acc, "--queued", "--spot")
    assert cmd[3:6] == ["queued-resources", "create", WHERE[acc][0]]
    assert f"--node-id={WHERE[acc][0]}" in cmd and f"--runtime-version={runtime}" in cmd
    assert "--spot" in cmd
    assert_where(cmd, acc)


def test_create_prints_chip_count_and_rejects_bad_input():
    out = io.StringIO()
    tpu.main(["create", *target("v5p-64"), "--accelerator-type", "v5p-64", "--dry-run"], out=out)
    assert "# v5p-64: 32 chips on 8 worker VM(s), 95 GiB HBM per chip" in out.getvalue()
    with pytest.raises(SystemExit, match="unknown TPU topology"):
        tpu.main(["create", *target("v4-32"), "--accelerator-type", "v9-32", "--dry-run"])
    with pytest.raises(SystemExit, match="--spot, not --preemptible"):
        tpu.main(["create", *target("v4-32"), "--accelerator-type", "v4-32", "--queued",
                  "--preemptible", "--dry-run"])
    with pytest.raises(SystemExit):  # argparse: TPU names are lower-case
        tpu.main(["create", "--name", "Bad_Name", "--zone", "z", "--project", "p",
                  "--accelerator-type", "v4-32", "--dry-run"])


@pytest.mark.parametrize("acc", ["v4-32", "v5p-64"])
def test_install_ships_the_tree_to_all_workers(acc):
    pack, copy, setup = dry("install", *target(acc))
    assert pack[:3] == ["tar", "czf", tpu.TARBALL] and pack[-3:] == ["-C", ROOT, "."]
    assert "--exclude=.git" in pack and "--exclude=.venv" in pack
    assert copy[3:6] == ["tpu-vm", "scp", tpu.TARBALL] and "--worker=all" in copy
    assert copy[6] == f"{WHERE[acc][0]}:r1zero-jax-src.tar.gz"
    assert_where(copy, acc)
    assert_where(setup, acc)
    assert "--worker=all" in setup
    script = remote(setup)
    assert "tar xzf $HOME/r1zero-jax-src.tar.gz -C $HOME/r1zero-jax" in script
    assert 'pip install -q -e "$HOME/r1zero-jax[tpu]"' in script


@pytest.mark.parametrize("acc", ["v4-32", "v5p-64"])
def test_launch_runs_the_config_on_all_workers(acc):
    run = os.path.splitext(os.path.basename(CONFIG[acc]))[0]
    [cmd] = dry("launch", *target(acc), CONFIG[acc], "--workdir", f"gs://bkt/runs/{run}",
                "--set", "train.steps=50", "--env", "JAX_COMPILATION_CACHE_DIR=gs://bkt/cache",
                "--env", "NOTE=two words")
    assert_where(cmd, acc)
    assert "--worker=all" in cmd
    script = remote(cmd)
    head, _, train = script.partition(" -- ")
    assert head == f"cd $HOME/r1zero-jax && bash tpu/worker.sh run {run} gs://bkt/runs/{run}"
    argv = shlex.split(train.replace("$HOME", "/home/u"))
    assert argv[:5] == ["env", "PYTHONUNBUFFERED=1", "JAX_COMPILATION_CACHE_DIR=gs://bkt/cache",
                        "NOTE=two words", "/home/u/r1zero-venv/bin/r1zero-jax"]
    assert argv[5:] == ["train", CONFIG[acc], f"--workdir=gs://bkt/runs/{run}",
                        "--set=train.steps=50"]
    with pytest.raises(SystemExit):
        dry("launch", *target(acc), CONFIG[acc], "--workdir", "gs://b/r", "--env", "no_equals")


@pytest.mark.parametrize("acc", ["v4-32", "v5p-64"])
def test_status_logs_stop_delete(acc):
    describe, status = dry("status", *target(acc), "--run", "r")
    assert describe[3:6] == ["tpu-vm", "describe", WHERE[acc][0]]
    assert "--format=value(state)" in describe
    assert_where(describe, acc)
    assert "--worker=all" in status and "worker.sh status r;" in remote(status)
    describe, _ = dry("status", *target(acc), "--run", "r", "--queued")
    assert describe[3:5] == ["queued-resources", "describe"]
    assert "--format=value(state.state)" in describe

    [logs] = dry("logs", *target(acc), "--run", "r")
    assert "--worker=0" in logs and remote(logs) == "bash $HOME/r1zero-jax/tpu/worker.sh logs r 100"
    [logs] = dry("logs", *target(acc), "--run", "r", "--worker", "3", "--lines", "20", "--follow")
    assert "--worker=3" in logs and remote(logs).endswith("logs r 20 --follow")

    [stop] = dry("stop", *target(acc), "--run", "r")
    assert "--worker=all" in stop and remote(stop) == "bash $HOME/r1zero-jax/tpu/worker.sh stop r"
    assert_where(stop, acc)

    [delete] = dry("delete", *target(acc))
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", WHERE[acc][0],
                      f"--zone={WHERE[acc][1]}", f"--project={WHERE[acc][2]}", "--quiet"]
    [delete] = dry("delete", *target(acc), "--queued")
    assert delete[3:6] == ["queued-resources", "delete", WHERE[acc][0]] and "--force" in delete


def test_supervise_dry_run_lists_the_recovery_sequence():
    cmds = dry("supervise", *target("v5p-64"), "--accelerator-type", "v5p-64", "--queued",
               "--spot", CONFIG["v5p-64"], "--workdir", "gs://bkt/runs/7b")
    kinds = [" ".join(c[3:5]) if c[0] == "gcloud" else c[0] for c in cmds]
    assert kinds == ["queued-resources describe", "tpu-vm ssh",  # poll
                     "queued-resources delete", "queued-resources create", "tar", "tpu-vm scp",
                     "tpu-vm ssh", "tpu-vm ssh",  # recreate, install, launch
                     "tpu-vm ssh", "tpu-vm ssh"]  # stop, launch
    assert "--spot" in cmds[3]
    assert "worker.sh stop" in remote(cmds[8]) and "worker.sh run" in remote(cmds[9])


class FakeGcloud:
    """Stands in for Runner: answers describe/status from a script of (node state, status) polls;
    a stop turns the status into `status_after_stop`. Records what was called."""

    def __init__(self, polls, status_after_stop=""):
        self.polls, self.status_after_stop = list(polls), status_after_stop
        self.calls, self.status, self.dry_run = [], "", False

    def __call__(self, argv, *, check=True, capture=False):
        cmd = remote(argv) if argv[3:5] == ["tpu-vm", "ssh"] else ""
        if "describe" in argv:
            state, self.status = self.polls.pop(0)
            self.calls.append("describe")
            return state
        for word in ("status", "stop", "run"):
            if f"worker.sh {word}" in cmd:
                self.calls.append(word)
                if word == "stop":
                    self.status = self.status_after_stop
                return self.status if word == "status" else ""
        self.calls.append(" ".join(argv[3:5]) if argv[0] == "gcloud" else argv[0])
        return ""


def lines(*states):
    return "\n".join(f"r1zero-status worker={i} state={s}" for i, s in enumerate(states))


def test_supervisor_recreates_after_preemption_and_relaunches_after_exit_75():
    args = tpu.build_parser().parse_args(
        ["supervise", *target("v4-32"), "--accelerator-type", "v4-32", "--spot", CONFIG["v4-32"],
         "--workdir", "gs://bkt/runs/15b", "--poll-s", "0"])
    fake = FakeGcloud([
        ("PREEMPTED", ""),  # spot VM taken away
        ("CREATING", ""),
        ("READY", lines(*["uninstalled"] * 4)),  # fresh VM
        ("READY", lines(*["running"] * 4)),
        ("READY", lines("running", "exited code=75", "running", "running")),  # maintenance
        ("READY", lines(*["exited code=0"] * 4)),
    ], status_after_stop=lines(*["exited code=75"] * 4))
    assert tpu.cmd_supervise(args, fake, sleep=lambda s: None) == 0
    assert fake.calls == [
        "describe", "tpu-vm delete", "tpu-vm create",
        "describe",
        "describe", "status", "tar", "tpu-vm scp", "tpu-vm ssh", "run",
        "describe", "status",
        "describe", "status", "stop", "status", "run",
        "describe", "status",
    ]


def test_supervisor_gives_up_after_repeated_failures():
    args = tpu.build_parser().parse_args(
        ["supervise", *target("v4-32"), "--accelerator-type", "v4-32", CONFIG["v4-32"],
         "--workdir", "gs://bkt/runs/15b", "--poll-s", "0", "--max-failures", "1"])
    crash = ("READY", lines("exited code=1", "exited code=1", "exited code=1", "exited code=1"))
    fake = FakeGcloud([crash, crash], status_after_stop=crash[1])
    assert tpu.cmd_supervise(args, fake, sleep=lambda s: None) == 1
    assert fake.calls.count("run") == 1  # one relaunch, then it gives up


def test_decide():
    W = tpu.WorkerState
    assert tpu.decide("", []) == "recreate"
    assert tpu.decide("SUSPENDED", []) == "recreate"
    assert tpu.decide("WAITING_FOR_RESOURCES", []) == "wait"
    assert tpu.decide(tpu.UNKNOWN, []) == "wait"  # a failed describe never deletes the TPU
    assert tpu.decide("READY", []) == "wait"  # ssh reached nobody
    assert tpu.decide("ACTIVE", [W("0", "absent"), W("1", "absent")]) == "launch"
    assert tpu.decide("READY", [W("0", "running"), W("1", "lost")]) == "relaunch"
    assert tpu.decide("READY", [W("0", "running"), W("1", "exited", 1)]) == "failed"
    assert tpu.decide("READY", [W("0", "exited", 0), W("1", "exited", 0)]) == "done"
    assert tpu.decide("READY", [W("0", "exited", 0), W("1", "running")]) == "wait"
    assert tpu.parse_status("noise\nr1zero-status worker=3 state=exited code=75\n  tail") == [
        W("3", "exited", 75)]


def test_runner_tells_not_found_from_other_failures(capsys):
    run = tpu.Runner(dry_run=False)
    gone = ["bash", "-c", "echo 'ERROR: (gcloud) NOT_FOUND: node' >&2; exit 1"]
    flaky = ["bash", "-c", "echo 'ERROR: connection reset' >&2; exit 1"]
    assert run(gone, capture=True, check=False) == ""
    assert run(flaky, capture=True, check=False) == tpu.UNKNOWN
    assert run(["bash", "-c", "echo READY"], capture=True) == "READY\n"
    with pytest.raises(SystemExit, match="exit code 1"):
        run(flaky, capture=True)
    assert "connection reset" in capsys.readouterr().err


def test_preempted_exit_code_matches_the_trainer():
    from r1zero_jax.checkpoint import PREEMPTED_EXIT_CODE

    assert tpu.PREEMPTED_EXIT_CODE == PREEMPTED_EXIT_CODE


def test_script_entry_point_dry_run():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tpu", "tpu.py"), "delete",
                          *target("v4-32"), "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ("gcloud compute tpus tpu-vm delete r1-15b --zone=us-central2-b "
                                  "--project=proj-a --quiet")


def test_worker_script_runs_logs_and_reports_exit_code(tmp_path):
    env = dict(os.environ, R1ZERO_LOG_ROOT=str(tmp_path / "logs"), R1ZERO_LOG_SYNC_S="1")
    sh = ["bash", os.path.join(ROOT, "tpu", "worker.sh")]
    workdir = tmp_path / "run"

    def call(*args):
        return subprocess.run([*sh, *args], env=env, capture_output=True, text=True, timeout=30)

    assert "state=absent" in call("status", "r").stdout
    res = call("run", "r", str(workdir), "--", "bash", "-c", "echo step 1; sleep 1; exit 75")
    assert res.returncode == 0, res.stderr
    assert call("run", "r", str(workdir), "--", "true").returncode == 1  # already running
    for _ in range(100):
        status = call("status", "r").stdout
        if "state=exited" in status:
            break
        subprocess.run(["sleep", "0.2"])
    assert tpu.parse_status(status)[0].code == 75
    [log] = list((workdir / "logs").iterdir())  # copied to the run directory
    assert "step 1" in log.read_text() and "exit code 75" in log.read_text()
