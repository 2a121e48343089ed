"""Run a training stage's work in this process, or under ``torchrun`` in several.

``runtime.nproc_per_node`` > 1 or ``runtime.nnodes`` > 1: the stage process (the one DVC
started, which holds the staged outputs, :mod:`stages.guard`) checks devices and the
rendezvous, then runs ``python -m torch.distributed.run ... -m stages.<stage> <args> --worker``
and waits. Each worker joins the process group (:meth:`kdlib.runtime.Runtime.from_env`) and
writes into the stage's staging folder, whose path it gets in ``KDLIB_STAGING``; each machine's
local rank 0 writes that machine's outputs. When torchrun succeeds, the stage commits them as
it would its own. torchrun dies with the stage (``PR_SET_PDEATHSIG``) and the workers with
torchrun, so a cancelled ``dvc`` leaves no training behind.

A stage started by hand under torchrun (``torchrun -m stages.train teacher``) is refused: the
processes would each stage their own outputs; ``-S runtime.nproc_per_node=N`` is the way.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kdlib.outputs import StagedOutputs
from kdlib.process import die_with_parent, process_start_time, watch_process
from kdlib.runtime import RuntimeSettings

if TYPE_CHECKING:
    from kdlib.resume import ResumeStore
    from kdlib.runtime import Runtime
    from stages.params import Run

STAGING_ENV = "KDLIB_STAGING"
WORKER_FLAG = "--worker"


class LaunchError(RuntimeError):
    """The run's processes cannot start as ``runtime`` describes."""


class WorkerOutputs:
    """A worker's view of the stage's staged outputs: the same ``out(path)`` mapping as
    :class:`kdlib.outputs.StagedOutputs`, into the folder the stage process made."""

    def __init__(self, staging: Path, root: Path) -> None:
        self.staging, self.root = Path(staging), Path(root)

    def __call__(self, path: Path) -> Path:
        relative = Path(os.path.relpath(Path(path).absolute(), self.root.absolute()))
        twin = self.staging / relative
        twin.parent.mkdir(parents=True, exist_ok=True)
        return twin


def parse_stage_args(doc: str | None, roles: tuple[str, ...] = ()) -> argparse.Namespace:
    """The stage's command line (``role`` when ``roles``), with the hidden ``--worker`` flag;
    a stage started by hand under torchrun is refused here."""
    parser = argparse.ArgumentParser(description=doc)
    if roles:
        parser.add_argument("role", choices=roles)
    parser.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    refuse_bare_torchrun(args.worker)
    return args


def refuse_bare_torchrun(worker: bool) -> None:
    if "TORCHELASTIC_RUN_ID" in os.environ and not worker:
        raise SystemExit("error: this stage starts torchrun itself: run it as `python -m stages.<stage>` (or through "
                         "dvc) with -S runtime.nproc_per_node=N (and runtime.nnodes, runtime.node_rank, "
                         "runtime.rdzv_endpoint for several machines), not under torchrun")


def worker_outputs(root: Path) -> WorkerOutputs:
    staging = os.environ.get(STAGING_ENV)
    if not staging or not Path(staging).is_dir():
        raise SystemExit(f"error: {WORKER_FLAG} is for the processes a stage starts under torchrun "
                         f"({STAGING_ENV} names no folder)")
    return WorkerOutputs(Path(staging), root)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolved_device(settings: RuntimeSettings) -> str:
    import torch

    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


def check_launch(settings: RuntimeSettings, connect: Callable[[str, int, float], bool] | None = None) -> None:
    """Refuse, before any work, what cannot run: more processes than devices, SyncBatchNorm on
    CPU, an unreachable rendezvous (on a machine other than node 0, within ``rdzv_timeout_s``)."""
    import torch

    device = resolved_device(settings)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise LaunchError("runtime.device = 'cuda': expected a CUDA device, and torch sees none")
        count = torch.cuda.device_count()
        if settings.nproc_per_node > count:
            raise LaunchError(f"runtime.nproc_per_node = {settings.nproc_per_node}: expected at most {count}, the "
                              "CUDA devices of this machine (one process per GPU)")
    else:
        cpus = usable_cpus()
        if settings.nproc_per_node > cpus:
            raise LaunchError(f"runtime.nproc_per_node = {settings.nproc_per_node}: expected at most {cpus}, the CPU "
                              "cores this process may use (each process needs at least one)")
        if settings.sync_bn:
            raise LaunchError("runtime.sync_bn = true: expected false on CPU (torch's SyncBatchNorm only works "
                              "with CUDA modules)")
    if settings.nnodes > 1 and settings.node_rank > 0:
        assert settings.rdzv_endpoint is not None
        host, _, port = settings.rdzv_endpoint.rpartition(":")
        if not (connect or wait_for_endpoint)(host, int(port), settings.rdzv_timeout_s):
            raise LaunchError(f"runtime.rdzv_endpoint = {settings.rdzv_endpoint!r}: nothing accepted a connection "
                              f"within runtime.rdzv_timeout_s = {settings.rdzv_timeout_s} s; expected node 0 "
                              "(runtime.node_rank = 0) to be running the same stage there, reachable from here")


def wait_for_endpoint(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout_s`` (retrying)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def torchrun_command(settings: RuntimeSettings, module: str, args: list[str], run_id: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(settings.nproc_per_node),
           "--max-restarts", str(settings.max_restarts)]
    if settings.nnodes == 1:
        cmd += ["--standalone"]
    else:
        # is_host: node 0 hosts the rendezvous store. c10d would guess it from the endpoint's
        # address, which is every machine's on loopback (and a wrong guess on NAT)
        conf = (f"is_host={int(settings.node_rank == 0)},join_timeout={settings.rdzv_timeout_s},"
                f"read_timeout={settings.rdzv_timeout_s}")
        # ranks are given by the rendezvous (c10d ignores --node-rank); every machine's local rank 0
        # writes the same outputs, so which machine holds global rank 0 does not matter
        cmd += ["--nnodes", str(settings.nnodes),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", str(settings.rdzv_endpoint), "--rdzv-id", run_id,
                "--rdzv-conf", conf]
    return cmd + ["-m", module, *args, WORKER_FLAG]


def run_id(tag: str, params: dict) -> str:
    """The same on every machine of one run: the stage and its parameters but for the machine's
    own ``runtime.node_rank``."""
    shared = json.loads(json.dumps(params, default=str))
    shared.get("runtime", {}).pop("node_rank", None)
    return hashlib.sha256(f"{tag}:{json.dumps(shared, sort_keys=True)}".encode()).hexdigest()[:16]


def launch(settings: RuntimeSettings, module: str, args: list[str], out: StagedOutputs, tag: str,
           params: dict) -> None:
    """Run the stage's workers under torchrun into ``out``'s staging folder; raise
    :class:`LaunchError` if they fail (their own output already says why)."""
    check_launch(settings)
    cmd = torchrun_command(settings, module, args, run_id(tag, params))
    env = {**os.environ, STAGING_ENV: str(out.staging.absolute())}
    parent = os.getpid()
    proc = subprocess.Popen(cmd, env=env, preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent))
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:  # the stage is being cancelled: take the workers down with it
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if code != 0:
        where = f" (node {settings.node_rank} of {settings.nnodes})" if settings.nnodes > 1 else ""
        raise LaunchError(f"{tag}: torchrun with {settings.world_size} processes{where} exited {code}; "
                          "nothing was written")


def start_worker() -> None:
    """What a worker does first: die with torchrun's agent.

    A worker writes only into the stage's staging folder, which the stage process discards, so
    it needs no cleanup and keeps the default SIGTERM (with a handler that unwinds, a restarted
    group under ``--max-restarts`` failed to connect: it read the killed group's gloo
    addresses). The agent is watched by a thread, not by ``PR_SET_PDEATHSIG``, which follows the
    parent *thread*: the agent may start workers from a thread that then ends."""
    agent = os.getppid()
    watch_process(agent, process_start_time(agent), sig=signal.SIGKILL)


def configure_logging(rank: int) -> None:
    """kdlib's INFO messages (resumed epochs, adapted weights) on stderr, from rank 0 only."""
    import logging

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)


# (run, out(path) -> where to write path, this process's runtime, its resume store) -> None
Body = Callable[["Run", Callable[[Path], Path], "Runtime", "ResumeStore | None"], None]


def run_or_launch(tag: str, module: str, args: list[str], run: "Run", out: StagedOutputs, root: Path,
                  body: Body) -> None:
    """Inside ``stage_outputs``: run ``body`` here, or in torchrun's workers when the run asks
    for several processes (they run :func:`run_worker`)."""
    from kdlib.runtime import Runtime
    from stages.guard import PARAMS_FILE
    from stages.params import read_params
    from stages.resume import resume_store

    settings = run.params.runtime
    try:
        if settings.launches:
            return launch(settings, module, args, out, tag, read_params(root / PARAMS_FILE))
        check_launch(settings)
    except LaunchError as err:
        raise SystemExit(f"error: {err}") from None
    runtime = Runtime.from_env(settings.device)
    configure_logging(runtime.rank)
    body(run, out, runtime, resume_store(root, tag, read_params(root / PARAMS_FILE), runtime, settings.resume))


def run_worker(tag: str, root: Path, body: Body) -> None:
    """One of torchrun's processes: join the group, run ``body`` into the stage's staging folder."""
    from kdlib.distributed import destroy_process_group
    from kdlib.runtime import Runtime
    from stages.guard import PARAMS_FILE
    from stages.params import load_params, read_params
    from stages.resume import resume_store

    start_worker()
    out = worker_outputs(root)
    run = load_params(root / PARAMS_FILE)
    settings = run.params.runtime
    runtime = Runtime.from_env(settings.device, settings.rdzv_timeout_s)
    configure_logging(runtime.rank)
    try:
        body(run, out, runtime, resume_store(root, tag, read_params(root / PARAMS_FILE), runtime, settings.resume))
    finally:
        destroy_process_group()


def claim_resume(tag: str, root: Path, enabled: bool) -> bool:
    """Whether this stage process owns its run's resume state (:func:`stages.resume.claim`). When
    another process owns it, this one and its workers train without resume, and say so."""
    from stages.guard import PARAMS_FILE
    from stages.params import read_params
    from stages.resume import RESUME_OFF_ENV, claim

    if not enabled:
        return False
    if claim(root, tag, read_params(root / PARAMS_FILE)):
        return True
    os.environ[RESUME_OFF_ENV] = "1"
    print(f"{tag}: another process is running this stage on the same inputs and holds its resume state; "
          "this run trains without resume", file=sys.stderr, flush=True)
    return False


def finish(tag: str, root: Path) -> None:
    """After the stage committed: its resume state is of no more use."""
    from stages.guard import PARAMS_FILE
    from stages.params import read_params
    from stages.resume import clear_resume

    clear_resume(root, tag, read_params(root / PARAMS_FILE))


def stage_main(tag: str, args: argparse.Namespace, module_args: list[str], outputs: tuple[Path, ...],
               root: Path, body: Body, manifests: tuple[Path, ...] = (),
               prepare: Callable[["Run"], "Run"] = lambda run: run) -> None:
    """A training stage's ``main``: a worker runs ``body``; the stage process stages ``outputs``
    (:func:`stages.guard.stage_outputs`), runs ``body`` or torchrun's workers, commits, and
    drops the resume state. ``prepare`` may adjust the run first (one process for no work)."""
    from stages.guard import stage_outputs
    from stages.params import load_params
    from stages.workspace import Workspace

    from kdlib.resume import ResumeError

    if args.worker:
        return run_worker(tag, root, body)
    run = prepare(load_params(root / "params.yaml"))
    try:
        owner = claim_resume(tag, root, run.params.runtime.resume)
    except ResumeError as err:  # e.g. a dangling .kdlib-resume link: before any work, like a bad parameter
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    with stage_outputs(tag, *outputs, ws=Workspace(root), manifests=manifests) as out:
        run_or_launch(tag, f"stages.{module_args[0]}", module_args[1:], run, out, root, body)
    if owner:
        finish(tag, root)
