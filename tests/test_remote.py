"""Sharing results through real DVC remotes: what a second machine of the team sees.

One tiny repository (this one with only check → prepare → baseline, 80 MNIST training images,
one epoch) is reproduced once, committed with a local-directory DVC remote and pushed to a bare git
repository standing in for the team's server. Each test then works in a fresh ``git clone``:

- a local-directory remote: ``dvc push``, ``dvc pull``, outputs byte-identical;
- the run cache: a parameter set that no commit records, pushed with ``--run-cache``, is restored
  by ``dvc repro --pull`` in a clone with no training;
- an SSH remote on 127.0.0.1 (Debian's sshd, started here with throwaway keys; dvc-ssh);
- ``dvc exp push`` / ``dvc exp pull`` of two experiments, listed with their metrics by
  ``dvc.api.exp_show``;
- the first experiment in a fresh clone that pulled nothing: it works, and the check stage warns
  up front which outputs the clone lacks and that ``dvc pull`` brings them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from dvc_repo import copy_workspace, run, scratch_repository
from stages.guard import missing_outputs
from train_repo import free_port, tiny

STAGES = ("check", "prepare", "baseline")
SSHD = Path("/usr/sbin/sshd")


def tiny_pipeline(repo: Path) -> None:
    """check → prepare → baseline only (the stages a remote has to carry: a data folder, a trained
    model, DVCLive plots), one epoch on ``train_repo.tiny``'s 80 images."""
    params = tiny(yaml.safe_load((repo / "params.yaml").read_text()))
    params["models"][params["student"]].update(epochs=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in STAGES}
    pipeline["plots"] = [{"Validation top-1": {"x": "step", "y": {"reports/baseline/plots/metrics/val/top1.tsv": "top1"}}}]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))


def cached_outputs(repo: Path) -> list[str]:
    """The outputs of dvc.yaml that live in the DVC cache (not the ``cache: false`` metrics)."""
    found = []
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("outs", []):
            path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            if options.get("cache", True):
                found.append(path)
    return found


def file_md5s(repo: Path, paths: list[str]) -> dict[str, str]:
    """md5 of every file under each of ``paths`` (a file or a folder), by path relative to ``repo``."""
    found = {}
    for path in paths:
        top = repo / path
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for file in files:
            found[str(file.relative_to(repo))] = hashlib.md5(file.read_bytes()).hexdigest()
    return found


def stages_run(stdout: str) -> set[str]:
    return {line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage '")}


def clone(team: dict, name: str) -> Path:
    target = team["tmp"] / name
    run(["git", "clone", "-q", str(team["origin"]), str(target)], team["tmp"], team["env"])
    return target


def test_missing_outputs_are_the_lock_outputs_in_neither_workspace_nor_cache(tmp_path):
    """stages.guard.missing_outputs, on a hand-written dvc.yaml/dvc.lock: an output present in
    the workspace or in the cache (here a cache.dir set in .dvc/config.local, as a queued
    experiment's copy has it) is not missing; a stale lock entry (a stage dvc.yaml no longer has,
    or a foreach entry of a stage that is no longer a foreach) is skipped, and so are `cache: false`
    outputs (git carries them; DVC deletes those of the running stage, check's own included)."""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "make": {"cmd": "x", "outs": ["data/here", "data/cached", "data/gone"],
                 "metrics": [{"reports/make.json": {"cache": False}}]},
        "each": {"foreach": ["a", "b"], "do": {"cmd": "y", "outs": ["out/${item}.json"],
                                              "metrics": [{"reports/${item}.json": {"cache": False}}]}},
        "keyed": {"foreach": {"t": {"seed": "teacher_seed"}},  # a foreach over a mapping names its key ${key}
                  "do": {"cmd": "k", "outs": ["k/${key}.json"], "metrics": [{"reports/k/${key}.json": {"cache": False}}]}}}}))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "make": {"cmd": "x", "outs": [{"path": "data/here", "md5": "1" * 32 + ".dir"},
                                      {"path": "data/cached", "md5": "ab" + "2" * 30},
                                      {"path": "data/gone", "md5": "3" * 32 + ".dir"},
                                      {"path": "reports/make.json", "md5": "7" * 32}]},  # in git
        "each@a": {"cmd": "y", "outs": [{"path": "out/a.json", "md5": "4" * 32},
                                        {"path": "reports/a.json", "md5": "8" * 32}]},
        "each": {"cmd": "old", "outs": [{"path": "out", "md5": "5" * 32 + ".dir"}]},  # before foreach
        "keyed@t": {"cmd": "k", "outs": [{"path": "k/t.json", "md5": "9" * 32},
                                         {"path": "reports/k/t.json", "md5": "a" * 32}]},
        "removed": {"cmd": "z", "outs": [{"path": "old/thing", "md5": "6" * 32}]}}}))
    (tmp_path / "data" / "here").mkdir(parents=True)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config.local").write_text("[cache]\n    dir = ../elsewhere\n")
    (tmp_path / "elsewhere" / "files" / "md5" / "ab").mkdir(parents=True)
    (tmp_path / "elsewhere" / "files" / "md5" / "ab" / ("2" * 30)).write_text("cached")
    assert missing_outputs(tmp_path) == {"make": ["data/gone"], "each@a": ["out/a.json"], "keyed@t": ["k/t.json"]}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.json").write_text("{}")
    assert missing_outputs(tmp_path) == {"make": ["data/gone"], "keyed@t": ["k/t.json"]}
    (tmp_path / "dvc.lock").unlink()  # a pipeline never reproduced: nothing to pull
    assert missing_outputs(tmp_path) == {}


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The tiny pipeline reproduced and committed with a default local-directory DVC remote (the
    remote's config is committed first: `dvc exp push` reads it from each experiment's commit) and
    pushed to a bare git repository ``origin``, its outputs with `dvc push`. The repository ``repo`` is
    the team member who ran it."""
    tmp = tmp_path_factory.mktemp("remote")
    repo, origin, store = tmp / "repo", tmp / "origin.git", tmp / "store"
    repo.mkdir()
    env = scratch_repository(repo, tiny_pipeline)
    started = time.monotonic()
    first = run(["dvc", "repro"], repo, env)
    repro_s = time.monotonic() - started
    assert stages_run(first.stdout) == set(STAGES), first.stdout
    run(["dvc", "remote", "add", "-d", "store", str(store)], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny pipeline results, local-directory remote"], repo, env)
    run(["git", "branch", "-M", "main"], repo, env)
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp, env)
    run(["git", "remote", "add", "origin", str(origin)], repo, env)
    run(["git", "push", "-q", "origin", "main"], repo, env)
    pushed = run(["dvc", "push"], repo, env)
    yield {"tmp": tmp, "repo": repo, "origin": origin, "store": store, "env": env, "repro_s": repro_s,
           "push_stdout": pushed.stdout, "outputs": file_md5s(repo, cached_outputs(repo))}


@pytest.mark.slow
def test_push_then_pull_in_a_fresh_clone_gives_identical_outputs(team):
    repo, env = team["repo"], team["env"]
    assert cached_outputs(repo) == ["data/prepared", "models/baseline", "reports/baseline/plots"]
    assert any(path.startswith("models/baseline/") and path.endswith(".pt") for path in team["outputs"])
    assert "pushed" in team["push_stdout"], team["push_stdout"]  # the fixture's `dvc push`
    assert any((team["store"] / "files" / "md5").rglob("*.dir")), "no folder manifest reached the remote"

    fresh = clone(team, "clone-local")
    assert not (fresh / "models").exists()  # only git's files came with the clone
    run(["dvc", "pull"], fresh, env)
    assert file_md5s(fresh, cached_outputs(fresh)) == team["outputs"]
    status = run(["dvc", "status"], fresh, env)
    assert "up to date" in status.stdout, status.stdout


@pytest.mark.slow
def test_run_cache_restores_an_uncommitted_parameter_set_without_training(team, tmp_path):
    """A team member tries another learning rate without committing it and pushes the run cache
    (`dvc push --run-cache`, then scripts/push_run_cache.py for the objects DVC leaves behind); a
    fresh clone that sets the same value gets the trained model from the remote, no training.
    `dvc repro --pull` is what does it on DVC 3.67: it pulls the run cache and, for a stage it
    finds there, that run's outputs (`dvc pull --run-cache` fetches only the run-cache entries and
    the outputs named by dvc.lock, so a plain `dvc repro` after it would train again)."""
    def other_lr(params: dict) -> None:
        params["models"][params["student"]]["lr"] = 0.01

    tried = copy_workspace(team["repo"], tmp_path / "tried")
    env = team["env"]
    set_params(tried, other_lr)
    trained = run(["dvc", "repro"], tried, env)
    assert stages_run(trained.stdout) == {"check", "baseline"}, trained.stdout
    tried_outputs = file_md5s(tried, cached_outputs(tried))
    models = [path for path in tried_outputs if path.startswith("models/baseline/")]
    assert any(tried_outputs[p] != team["outputs"][p] for p in models), "lr 0.01 trained the same model as 0.05"
    run(["dvc", "push", "--run-cache"], tried, env)
    # DVC 3.67 leaves out the run's `cache: false` metrics, which restoring it needs (see
    # scripts/push_run_cache.py); if this starts failing, DVC sends them and the script can go
    metrics_md5 = hashlib.md5((tried / "reports/baseline/metrics.json").read_bytes()).hexdigest()
    metrics_object = team["store"] / "files" / "md5" / metrics_md5[:2] / metrics_md5[2:]
    assert (tried / ".dvc/cache/files/md5" / metrics_md5[:2] / metrics_md5[2:]).is_file()
    assert not metrics_object.exists()
    pushed = run([sys.executable, "scripts/push_run_cache.py"], tried, env)
    assert metrics_object.is_file(), pushed.stdout

    fresh = clone(team, "clone-run-cache")
    set_params(fresh, other_lr)
    restored = run(["dvc", "repro", "--pull"], fresh, env)
    # check has a `cache: false` output, which gives it no run-cache entry: it re-validates
    # params.yaml (a second); prepare and baseline must not run
    assert stages_run(restored.stdout) <= {"check"}, restored.stdout
    assert "Stage 'baseline' is cached - skipping run, checking out outputs" in restored.stdout, restored.stdout
    assert file_md5s(fresh, cached_outputs(fresh)) == tried_outputs
    assert json.loads((fresh / "reports/baseline/metrics.json").read_text()) \
        == json.loads((tried / "reports/baseline/metrics.json").read_text())


def set_params(repo: Path, change) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    change(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


class Sshd:
    """Debian's OpenSSH server on 127.0.0.1:``port`` with its own config, a throwaway host key and
    one authorized throwaway user key, logging to stderr (``-D -e``). ``home`` is a HOME whose
    ``.ssh/known_hosts`` trusts exactly that host key, so clients keep host-key checking on."""

    def __init__(self, folder: Path) -> None:
        if not SSHD.is_file():
            pytest.fail(f"{SSHD} is missing: the SSH remote test needs Debian's openssh-server "
                        "(scripts/setup.sh installs it: apt-get install -y --no-install-recommends openssh-server)")
        folder.mkdir(parents=True)
        self.folder, self.port = folder, free_port()
        self.host_key, self.user_key = folder / "host_ed25519", folder / "user_ed25519"
        for key in (self.host_key, self.user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                           capture_output=True)
        (folder / "authorized_keys").write_text(Path(f"{self.user_key}.pub").read_text())
        self.home = folder / "home"
        (self.home / ".ssh").mkdir(parents=True, mode=0o700)
        host_type, host_blob = Path(f"{self.host_key}.pub").read_text().split()[:2]
        (self.home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_type} {host_blob}\n")
        self.config = folder / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {folder / 'sshd.pid'}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no",  # the keys sit under /tmp, which is world-writable
            "Subsystem sftp internal-sftp",  # dvc-ssh (asyncssh) moves files over SFTP
            "LogLevel VERBOSE", ""]))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        self.log = folder / "sshd.log"
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.config)], stdout=self._log_file,
                                        stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"sshd exited {self.process.returncode} at start:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"sshd did not answer on 127.0.0.1:{self.port} within {timeout_s:.0f} s:\n"
                    f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(tmp_path / "sshd")
    yield server
    server.stop()


@pytest.mark.slow
def test_ssh_remote_push_then_pull_in_a_fresh_clone(team, sshd, tmp_path):
    """An SSH remote is added per machine (`--local`: .dvc/config.local, not committed, since the
    key file is each machine's own); push from one clone, pull into another, over sshd."""
    storage = tmp_path / "ssh-store"
    storage.mkdir()
    env = {**team["env"], "HOME": str(sshd.home)}  # known_hosts with the throwaway host key

    def add_ssh_remote(repo: Path) -> None:
        run(["dvc", "remote", "add", "--local", "ssh", f"ssh://root@127.0.0.1:{sshd.port}{storage}"], repo, env)
        run(["dvc", "remote", "modify", "--local", "ssh", "keyfile", str(sshd.user_key)], repo, env)

    pusher = clone(team, "clone-ssh-push")
    run(["dvc", "pull"], pusher, env)  # from the local-directory remote
    add_ssh_remote(pusher)
    push = run(["dvc", "push", "-r", "ssh"], pusher, env)
    assert "pushed" in push.stdout, push.stdout
    assert any((storage / "files" / "md5").rglob("*.dir")), f"nothing reached {storage}\n{sshd.log.read_text()}"

    puller = clone(team, "clone-ssh-pull")
    add_ssh_remote(puller)
    run(["dvc", "pull", "-r", "ssh"], puller, env)
    assert file_md5s(puller, cached_outputs(puller)) == team["outputs"]
    log = sshd.log.read_text()
    assert log.count("Accepted publickey for root from 127.0.0.1") >= 2, log[-3000:]


@pytest.mark.slow
def test_experiments_pushed_then_pulled_into_a_fresh_clone(team):
    """Two experiments (the student's learning rate: check and baseline re-run, a few seconds each)
    go to the git remote with `dvc exp push` (refs/exps plus their cache to the DVC remote); a
    fresh clone's `dvc exp pull` brings both, `dvc.api.exp_show` lists them with their metrics, and
    `dvc exp apply` checks an experiment's model out of the pulled cache."""
    from dvc.api import exp_show

    repo, env = team["repo"], team["env"]
    made = {}
    for name, lr in (("lr-slow", 0.01), ("lr-fast", 0.2)):
        out = run(["dvc", "exp", "run", "-n", name, "-S", f"models.cnn_small.lr={lr}"], repo, env)
        assert stages_run(out.stdout) == {"check", "baseline"}, out.stdout
        made[name] = {"metrics": json.loads((repo / "reports/baseline/metrics.json").read_text()),
                      "models": file_md5s(repo, ["models/baseline"])}
    assert made["lr-slow"]["models"] != made["lr-fast"]["models"]
    pushed = run(["dvc", "exp", "push", "origin", *made], repo, env)
    assert all(name in pushed.stdout for name in made), pushed.stdout

    fresh = clone(team, "clone-exps")
    assert run(["git", "for-each-ref", "refs/exps"], fresh, env).stdout == ""  # a clone does not fetch them
    run(["dvc", "exp", "pull", "origin", *made], fresh, env)
    rows = {row["Experiment"]: row for row in exp_show(repo=str(fresh)) if row.get("Experiment")}
    assert set(made) <= set(rows), rows.keys()
    for name, result in made.items():
        row = rows[name]
        lr_column = next(key for key in row if key.endswith("models.cnn_small.lr"))
        top1_column = next(key for key in row if key.endswith("best_val_top1"))
        assert row[lr_column] == {"lr-slow": 0.01, "lr-fast": 0.2}[name]
        assert row[top1_column] == pytest.approx(result["metrics"]["best_val_top1"])
    run(["dvc", "exp", "apply", "lr-fast"], fresh, env)
    assert file_md5s(fresh, ["models/baseline"]) == made["lr-fast"]["models"]


@pytest.mark.slow
def test_first_experiment_in_a_fresh_clone_works_and_says_what_to_pull(team):
    """A fresh clone has dvc.lock but none of its cached outputs: `dvc exp run prepare -S ...`
    (check and prepare run, a few seconds) succeeds, and the check stage says up front which outputs
    are missing and that `dvc pull` brings them; after `dvc pull` it says nothing."""
    env = team["env"]
    fresh = clone(team, "clone-first-exp")
    out = run(["dvc", "exp", "run", "-n", "first", "prepare", "-S", "datasets.mnist.options.val_per_class=3"],
              fresh, env)
    assert stages_run(out.stdout) == {"check", "prepare"}, out.stdout
    said = out.stdout + out.stderr
    assert "warning: dvc.lock records 3 output(s) that are in neither the workspace nor the DVC cache" in said, said
    assert "models/baseline" in said and "`dvc pull`" in said
    assert json.loads((fresh / "reports/prepare/manifest.json").read_text())["splits"]["val"]["count"] == 30
    assert "first" in run(["dvc", "exp", "list", "--name-only"], fresh, env).stdout

    pulled = clone(team, "clone-pulled")
    run(["dvc", "pull"], pulled, env)
    check = run([sys.executable, "-m", "stages.check"], pulled, {**env, "PYTHONPATH": str(pulled)})
    assert "warning" not in check.stderr and "is valid" in check.stdout, check.stderr
