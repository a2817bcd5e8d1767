#!/usr/bin/env python3
"""Create, install, launch, watch and delete r1zero-jax runs on Cloud TPU VMs (v4, v5e, v5p, v6e).

    tpu/tpu.py create    --name N --zone Z --project P --accelerator-type v4-32 [--spot] [--queued]
    tpu/tpu.py install   --name N --zone Z --project P
    tpu/tpu.py launch    --name N --zone Z --project P CONFIG --workdir gs://B/runs/R
                         [--set K=V] [--env K=V]
    tpu/tpu.py status    --name N --zone Z --project P [--run R]
    tpu/tpu.py logs      --name N --zone Z --project P [--run R] [--worker 0] [--follow]
    tpu/tpu.py stop      --name N --zone Z --project P [--run R]
    tpu/tpu.py delete    --name N --zone Z --project P [--queued]
    tpu/tpu.py supervise (create + launch arguments) [--poll-s 120] [--max-failures 3]

Every command takes --dry-run: it prints the exact commands (one per line, shell-quoted) and runs
nothing. Commands on the VMs go through `gcloud compute tpus tpu-vm ssh --worker=all` and
tpu/worker.sh, which keeps each worker's log in ~/r1zero-logs/RUN/ and copies it to
WORKDIR/logs/. On a pod every worker runs the same command; JAX finds its peers by itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from r1zero_jax.plan import parse_topology  # noqa: E402

PREEMPTED_EXIT_CODE = 75  # r1zero_jax.checkpoint.PREEMPTED_EXIT_CODE (a test keeps them equal)
REMOTE_SRC = "$HOME/r1zero-jax"
REMOTE_VENV = "$HOME/r1zero-venv"
TARBALL = "/tmp/r1zero-jax-src.tar.gz"
DEFAULT_ENV = ("PYTHONUNBUFFERED=1",)
# Source-tree entries never shipped to the workers.
TAR_EXCLUDES = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "runs")

UNKNOWN = "UNKNOWN"  # what a failed query reads as (the supervisor waits)
# States of `tpu-vm describe` (nodes) and `queued-resources describe` (state.state).
WAIT_STATES = {"CREATING", "STARTING", "RESTARTING", "REPAIRING", "ACCEPTED",
               "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING_QUEUED"}
READY_STATES = {"READY", "ACTIVE"}
GONE_STATES = {"", "PREEMPTED", "TERMINATED", "STOPPED", "FAILED", "SUSPENDED", "SUSPENDING",
               "DELETING"}


class Runner:
    """Runs commands, or with dry_run prints them exactly (shell-quoted) and runs nothing."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run, self.out = dry_run, out or sys.stdout

    def __call__(self, argv: list[str], *, check: bool = True, capture: bool = False) -> str:
        if self.dry_run:
            print(shlex.join(argv), file=self.out)
            return ""
        print(f"+ {shlex.join(argv)}", file=sys.stderr)
        pipe = subprocess.PIPE if capture else None
        res = subprocess.run(argv, text=True, stdout=pipe, stderr=pipe)
        if res.returncode and capture:
            sys.stderr.write(res.stderr)
        if check and res.returncode:
            raise SystemExit(f"command failed with exit code {res.returncode}: {shlex.join(argv)}")
        if res.returncode and capture and not res.stdout.strip():
            # "Not found" means gone; any other failure (network, auth) must not read as gone,
            # or the supervisor would delete a healthy TPU.
            return "" if "NOT_FOUND" in res.stderr or "not found" in res.stderr else UNKNOWN
        return res.stdout or ""

    def note(self, text: str) -> None:
        if self.dry_run:
            print(f"# {text}", file=self.out)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    zone: str
    project: str
    queued: bool = False

    @property
    def where(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise argparse.ArgumentTypeError(
            f"{name!r}: TPU names are lower-case letters, digits and '-', starting with a letter")
    return name


def _env_item(item: str) -> str:
    key, sep, _ = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(f"--env {item!r}: expected NAME=VALUE")
    return item


# -- gcloud command builders (pure: they return argv lists) --------------------------------------
def ssh(t: Target, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", t.name, *t.where, f"--worker={worker}",
            "--command", command]


def create_cmd(t: Target, accelerator: str, runtime: str | None, spot: bool,
               preemptible: bool) -> list[str]:
    runtime = runtime or parse_topology(accelerator).runtime_version
    if t.queued:
        if preemptible:
            raise SystemExit("queued resources take --spot, not --preemptible")
        return ["gcloud", "compute", "tpus", "queued-resources", "create", t.name,
                f"--node-id={t.name}", *t.where, f"--accelerator-type={accelerator}",
                f"--runtime-version={runtime}", *(["--spot"] if spot else [])]
    if spot and preemptible:
        raise SystemExit("choose one of --spot and --preemptible")
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", t.name, *t.where,
            f"--accelerator-type={accelerator}", f"--version={runtime}",
            *(["--spot"] if spot else []), *(["--preemptible"] if preemptible else [])]


def describe_cmd(t: Target) -> list[str]:
    if t.queued:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", t.name, *t.where,
                "--format=value(state.state)"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", t.name, *t.where,
            "--format=value(state)"]


def delete_cmd(t: Target) -> list[str]:
    if t.queued:  # --force also deletes the TPU VM the queued resource holds
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", t.name, *t.where,
                "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", t.name, *t.where, "--quiet"]


def install_cmds(t: Target, source: str = ROOT) -> list[list[str]]:
    pack = ["tar", "czf", TARBALL, *(f"--exclude={e}" for e in TAR_EXCLUDES), "-C", source, "."]
    copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", TARBALL,
            f"{t.name}:r1zero-jax-src.tar.gz", *t.where, "--worker=all"]
    remote = (f"set -e; rm -rf {REMOTE_SRC} && mkdir -p {REMOTE_SRC} && "
              f"tar xzf $HOME/r1zero-jax-src.tar.gz -C {REMOTE_SRC} && "
              f"python3 -m venv {REMOTE_VENV} && {REMOTE_VENV}/bin/pip install -q -U pip && "
              f"{REMOTE_VENV}/bin/pip install -q -e \"{REMOTE_SRC}[tpu]\" && "
              f"{REMOTE_VENV}/bin/python -c 'import jax, r1zero_jax; print(jax.__version__)'")
    return [pack, copy, ssh(t, remote)]


def train_command(config: str, workdir: str, overrides: list[str], env: list[str],
                  steps: int | None = None) -> list[str]:
    argv = ["env", *DEFAULT_ENV, *env, f"{REMOTE_VENV}/bin/r1zero-jax", "train", config,
            f"--workdir={workdir}"]
    argv += [f"--set={o}" for o in overrides]
    if steps is not None:
        argv.append(f"--steps={steps}")
    return argv


def _remote_join(argv: list[str]) -> str:
    # shlex.join would quote $HOME away; these paths must expand on the worker.
    return " ".join(a if a.startswith("$HOME/") else shlex.quote(a) for a in argv)


def launch_cmd(t: Target, run: str, config: str, workdir: str, overrides: list[str],
               env: list[str], steps: int | None = None) -> list[str]:
    train = train_command(config, workdir, overrides, env, steps)
    remote = (f"cd {REMOTE_SRC} && bash tpu/worker.sh run {shlex.quote(run)} "
              f"{shlex.quote(workdir)} -- {_remote_join(train)}")
    return ssh(t, remote)


def worker_cmd(t: Target, action: str, run: str, worker: str = "all", extra: str = "") -> list[str]:
    script = f"{REMOTE_SRC}/tpu/worker.sh"
    remote = f"bash {script} {action} {shlex.quote(run)}{extra}"
    if action == "status":  # a fresh VM has no project yet: say so instead of failing
        remote = (f"if [ -f {script} ]; then {remote}; else echo "
                  f"\"r1zero-status worker=$(hostname) state=uninstalled\"; fi")
    return ssh(t, remote, worker)


# -- supervisor decisions (pure) ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorkerState:
    worker: str
    state: str  # running | exited | lost | absent | uninstalled
    code: int | None = None


def parse_status(text: str) -> list[WorkerState]:
    out = []
    for m in re.finditer(r"^r1zero-status worker=(\S+) state=(\w+)(?: code=(-?\d+))?", text, re.M):
        out.append(WorkerState(m[1], m[2], None if m[3] is None else int(m[3])))
    return out


def decide(node_state: str, workers: list[WorkerState]) -> str:
    """The supervisor's next move: wait | recreate | install | launch | relaunch | done | failed.

    `relaunch` (stop what still runs, launch again; the trainer resumes from its workdir) follows
    a preemption exit (75) or a lost process; `failed` follows any other non-zero exit.
    """
    node_state = node_state.strip().upper()
    if node_state in GONE_STATES:
        return "recreate"
    if node_state in WAIT_STATES or node_state not in READY_STATES:
        return "wait"
    if not workers:  # ssh reached no worker: look again later
        return "wait"
    states = {w.state for w in workers}
    if "uninstalled" in states:
        return "install"
    codes = [w.code for w in workers if w.state == "exited"]
    if any(c not in (0, PREEMPTED_EXIT_CODE) for c in codes):
        return "failed"
    if codes and all(w.state == "exited" and w.code == 0 for w in workers):
        return "done"
    if PREEMPTED_EXIT_CODE in codes or "lost" in states:
        return "relaunch"
    if states == {"absent"}:
        return "launch"
    if "absent" in states:  # some workers never started: start all of them again
        return "relaunch"
    return "wait"  # running, or finishing one after another


# -- commands -------------------------------------------------------------------------------------
def _target(a) -> Target:
    return Target(a.name, a.zone, a.project, getattr(a, "queued", False))


def cmd_create(a, run: Runner) -> int:
    topo = parse_topology(a.accelerator_type)
    run.note(f"{a.accelerator_type}: {topo.chips} chips on {topo.hosts} worker VM(s), "
             f"{topo.hbm_bytes / 2**30:.0f} GiB HBM per chip")
    run(create_cmd(_target(a), a.accelerator_type, a.runtime_version, a.spot, a.preemptible))
    return 0


def cmd_install(a, run: Runner) -> int:
    for argv in install_cmds(_target(a), a.source):
        run(argv)
    return 0


def cmd_launch(a, run: Runner) -> int:
    run(launch_cmd(_target(a), a.run or _run_name(a.config), a.config, a.workdir, a.overrides,
                   a.env, a.steps))
    return 0


def cmd_status(a, run: Runner) -> int:
    t = _target(a)
    state = run(describe_cmd(t), capture=True)
    if not run.dry_run:
        print(f"{t.name}: {state.strip() or 'not found'}")
    if run.dry_run or state.strip().upper() in READY_STATES:
        run(worker_cmd(t, "status", a.run), check=False)
    return 0


def cmd_logs(a, run: Runner) -> int:
    extra = f" {a.lines}" + (" --follow" if a.follow else "")
    run(worker_cmd(_target(a), "logs", a.run, worker=a.worker, extra=extra), check=False)
    return 0


def cmd_stop(a, run: Runner) -> int:
    run(worker_cmd(_target(a), "stop", a.run))
    return 0


def cmd_delete(a, run: Runner) -> int:
    run(delete_cmd(_target(a)))
    return 0


def cmd_supervise(a, run: Runner, sleep=time.sleep) -> int:
    """Poll the node and the run; recreate, reinstall and relaunch until the run ends."""
    t, run_name = _target(a), a.run or _run_name(a.config)
    create = create_cmd(t, a.accelerator_type, a.runtime_version, a.spot, a.preemptible)
    launch = launch_cmd(t, run_name, a.config, a.workdir, a.overrides, a.env, a.steps)
    stop = worker_cmd(t, "stop", run_name)
    if run.dry_run:
        run.note("each poll")
        run(describe_cmd(t))
        run(worker_cmd(t, "status", run_name))
        run.note("recreate (node preempted or gone), then install and launch")
        run(delete_cmd(t))
        run(create)
        for argv in install_cmds(t, a.source):
            run(argv)
        run(launch)
        run.note(f"relaunch (a worker exited {PREEMPTED_EXIT_CODE} or was lost); the trainer "
                 "resumes from the workdir's latest checkpoint")
        run(stop, check=False)
        run(launch)
        return 0
    failures = 0
    while True:
        state = run(describe_cmd(t), capture=True, check=False).strip()
        workers = []
        if state.upper() in READY_STATES:
            workers = parse_status(run(worker_cmd(t, "status", run_name), capture=True,
                                       check=False))
        action = decide(state, workers)
        print(f"[supervise {time.strftime('%H:%M:%S')}] node={state or 'absent'} "
              f"workers={[(w.worker, w.state, w.code) for w in workers]} -> {action}", flush=True)
        if action == "done":
            return 0
        if action == "failed":
            failures += 1
            if failures > a.max_failures:
                print(f"run failed {failures} times; giving up (see `tpu.py logs`)",
                      file=sys.stderr)
                return 1
            action = "relaunch"
        if action == "recreate":
            run(delete_cmd(t), check=False)
            run(create, check=False)  # a queued resource returns at once; polls wait for it
        elif action == "install":
            for argv in install_cmds(t, a.source):
                run(argv, check=False)
            run(launch, check=False)
        elif action in ("launch", "relaunch"):
            if action == "relaunch":
                run(stop, check=False)
                _wait_stopped(t, run_name, run, sleep, a.stop_grace_s)
            run(launch, check=False)
        sleep(a.poll_s)


def _wait_stopped(t: Target, run_name: str, run: Runner, sleep, timeout_s: float,
                  every_s: float = 10.0) -> None:
    """Wait until no worker still runs (the trainer writes its preemption checkpoint first)."""
    waited = 0.0
    while waited < timeout_s:
        workers = parse_status(run(worker_cmd(t, "status", run_name), capture=True, check=False))
        if not any(w.state == "running" for w in workers):
            return
        sleep(every_s)
        waited += every_s
    print(f"workers still running after {timeout_s:.0f} s; launching anyway", file=sys.stderr)


def _run_name(config: str) -> str:
    return os.path.splitext(os.path.basename(config))[0]


# -- argument parsing -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, type=_check_name,
                        help="TPU VM / queued resource name")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a (v5p)")
    common.add_argument("--project", required=True)
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")

    queued = argparse.ArgumentParser(add_help=False)
    queued.add_argument("--queued", action="store_true",
                        help="a queued resource (waits for capacity) instead of a direct TPU VM")

    create = argparse.ArgumentParser(add_help=False)
    create.add_argument("--accelerator-type", required=True,
                        help="v4-8 ... v4-512, v5litepod-N (v5e), v5p-N, v6e-N")
    create.add_argument("--runtime-version", default=None,
                        help="TPU software version (default: the generation's base image)")
    create.add_argument("--spot", action="store_true")
    create.add_argument("--preemptible", action="store_true", help="direct TPU VMs only")

    install = argparse.ArgumentParser(add_help=False)
    install.add_argument("--source", default=ROOT, help="project tree shipped to the workers")

    launch = argparse.ArgumentParser(add_help=False)
    launch.add_argument("config", help="configs/NAME.py (path relative to the project root)")
    launch.add_argument("--workdir", required=True,
                        help="gs://BUCKET/runs/NAME (checkpoints, logs)")
    launch.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    launch.add_argument("--env", action="append", default=[], type=_env_item, metavar="NAME=VALUE",
                        help="environment variable for the trainer on every worker (repeatable)")
    launch.add_argument("--steps", type=int, default=None)
    launch.add_argument("--run", default=None, help="run name for logs (default: config name)")

    run_name = argparse.ArgumentParser(add_help=False)
    run_name.add_argument("--run", required=True, help="run name (the config's name by default "
                                                       "at launch)")

    p = argparse.ArgumentParser(prog="tpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("create", parents=[common, queued, create]).set_defaults(func=cmd_create)
    sub.add_parser("install", parents=[common, install]).set_defaults(func=cmd_install)
    sub.add_parser("launch", parents=[common, launch]).set_defaults(func=cmd_launch)
    sub.add_parser("status", parents=[common, queued, run_name]).set_defaults(func=cmd_status)
    logs = sub.add_parser("logs", parents=[common, run_name])
    logs.add_argument("--worker", default="0", help="worker index, or 'all'")
    logs.add_argument("--lines", type=int, default=100)
    logs.add_argument("--follow", action="store_true")
    logs.set_defaults(func=cmd_logs)
    sub.add_parser("stop", parents=[common, run_name]).set_defaults(func=cmd_stop)
    sub.add_parser("delete", parents=[common, queued]).set_defaults(func=cmd_delete)
    sup = sub.add_parser("supervise", parents=[common, queued, create, install, launch])
    sup.add_argument("--poll-s", type=float, default=120.0)
    sup.add_argument("--stop-grace-s", type=float, default=300.0,
                     help="how long a stopped run may take to write its checkpoint")
    sup.add_argument("--max-failures", type=int, default=3,
                     help="relaunches after non-preemption failures before giving up")
    sup.set_defaults(func=cmd_supervise)
    return p


def main(argv=None, out=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "accelerator_type", None):
        try:
            parse_topology(args.accelerator_type)
        except ValueError as e:
            raise SystemExit(f"tpu.py: error: {e}") from None
    return args.func(args, Runner(args.dry_run, out))


if __name__ == "__main__":
    sys.exit(main())
