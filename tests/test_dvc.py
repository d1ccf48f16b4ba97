"""The DVC pipeline (dvc.yaml + params.yaml) and remote, run for real in a temporary copy of the repository.

Nothing here talks to Google Cloud Storage: .dvc/config names a gs:// remote, and offline every GCS call only fails
after about 50 s of retries. The tests add a local-directory remote in the copy's .dvc/config.local, which wins.
The pipeline runs the real `birds` commands through the real `dvc` CLI, on a smaller synthetic dataset and one epoch
(set in the copy's config files, which is also how a user tunes the pipeline).
"""

from __future__ import annotations

import configparser
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_worktree

REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)  # the venv's `birds` and `dvc`
ENV = {
    **os.environ,
    "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
    "DVC_NO_ANALYTICS": "1",
    "BIRDS_QUIET": "1",
    "WANDB_MODE": "disabled",
    "GIT_AUTHOR_NAME": "birdcli tests",
    "GIT_AUTHOR_EMAIL": "tests@birdcli.invalid",
    "GIT_COMMITTER_NAME": "birdcli tests",
    "GIT_COMMITTER_EMAIL": "tests@birdcli.invalid",
}
STAGES = ["fetch", "train", "evaluate", "export"]


def sh(*cmd: str, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_repo(dest: Path) -> Path:
    """Copy what git would hold into `dest`, without this checkout's DVC cache and local config."""
    copy_worktree(dest)
    shutil.rmtree(dest / ".dvc" / "cache", ignore_errors=True)
    (dest / ".dvc" / "config.local").unlink(missing_ok=True)
    return dest


def tune_down(repo: Path) -> None:
    """A smaller synthetic dataset and one epoch, written into the copy's config files (DVC params)."""
    configs = repo / "birdcli" / "configs"
    base = yaml.safe_load((configs / "config.yaml").read_text())
    base["data"]["synthetic"].update(num_classes=4, train_per_class=12, valid_per_class=4, test_per_class=4)
    (configs / "config.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    smoke = yaml.safe_load((configs / "experiment" / "smoke.yaml").read_text())
    smoke["train"].update(epochs=1, batch_size=16)
    smoke["data"]["num_workers"] = 0
    smoke["tracking"]["wandb"]["mode"] = "disabled"
    (configs / "experiment" / "smoke.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))


def wipe(path: Path) -> None:
    """rmtree that also removes DVC's read-only cache files (Windows refuses to delete those otherwise)."""

    def make_writable_and_retry(func, target, _exc) -> None:
        os.chmod(target, stat.S_IWRITE)
        func(target)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)


UNTRACKED = {"checkpoint", ".checkpoint.old", "wandb"}  # left out of DVC by .dvcignore


def digests(*roots: Path) -> dict[str, str]:
    """sha256 of every file DVC tracks under `roots`, keyed by path: equal dicts mean the same files, bit for bit."""
    found = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not UNTRACKED & set(p.relative_to(root).parts):
                found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    assert found, f"no files under {roots}"
    return found


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A copy of the repository in which `dvc repro` ran the whole pipeline once."""
    repo = copy_repo(tmp_path_factory.mktemp("dvc") / "repo")
    tune_down(repo)
    sh("git", "init", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "copy", cwd=repo)
    sh("dvc", "repro", cwd=repo)
    return repo


def test_dvc_yaml_declares_the_four_birds_stages() -> None:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(spec["stages"]) == STAGES
    for name, stage in spec["stages"].items():
        assert stage["cmd"].lstrip().startswith("birds "), name
        assert stage["outs"], name
    assert spec["metrics"] and spec["plots"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["exp"] == "smoke" and params["data"]["source"] == "synthetic", "the default must run offline"


def test_default_remote_is_gcs() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".dvc" / "config")
    name = cfg["core"]["remote"]
    assert cfg[f"'remote \"{name}\"'"]["url"].startswith("gs://")


def test_repro_runs_the_smoke_pipeline(pipeline: Path) -> None:
    run = pipeline / "runs" / "smoke" / "dvc"
    assert (pipeline / "data" / "synthetic" / "train").is_dir()
    assert (run / "best" / "model.safetensors").is_file()
    assert (run / "checkpoint").is_dir()  # written by train, but not tracked:
    assert sh("dvc", "check-ignore", "runs/smoke/dvc/checkpoint/", cwd=pipeline).returncode == 0
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["birdcli/configs/experiment/smoke.yaml"]["train"]["epochs"] == 1

    shown = sh("dvc", "metrics", "show", "--json", cwd=pipeline).stdout
    assert "best_val_acc" in shown
    if "evaluate" in lock["stages"]:
        assert (pipeline / "eval" / "smoke" / "dvc" / "confusion.png").is_file()
        assert "top1" in shown or "accuracy" in shown
    if "export" in lock["stages"]:
        assert (pipeline / "exports" / "smoke" / "dvc" / "model.onnx").is_file()
    sh("dvc", "plots", "show", "-o", str(pipeline / "dvc_plots"), cwd=pipeline)
    assert (pipeline / "dvc_plots" / "index.html").is_file()

    # Nothing changed, so nothing reruns, and no stage wrote into another stage's output.
    again = sh("dvc", "repro", *lock["stages"], cwd=pipeline).stdout
    assert "Running stage" not in again, again
    assert "up to date" in sh("dvc", "status", *lock["stages"], cwd=pipeline).stdout


def test_exp_run_set_param_reruns_training(pipeline: Path) -> None:
    sh("git", "add", "-A", cwd=pipeline)
    sh("git", "commit", "-qm", "repro", cwd=pipeline)
    param = "birdcli/configs/experiment/smoke.yaml:train.epochs=2"
    done = sh("dvc", "exp", "run", "-S", param, "train", cwd=pipeline).stdout
    assert "Running stage 'train'" in done and "Stage 'fetch' didn't change" in done, done
    history = (pipeline / "runs" / "smoke" / "dvc" / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2"], history  # the epoch column
    if (REPO / "configs").is_symlink():  # a plain file where git checks out without symbolic links (Windows)
        assert (pipeline / "configs").is_symlink(), "dvc exp run must not replace the configs link"


def test_push_wipe_pull_round_trip(pipeline: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "--local", "--default", "--force", "localtest", str(remote), cwd=pipeline)
    assert sh("dvc", "remote", "default", cwd=pipeline).stdout.strip() == "localtest"
    outs = [pipeline / "data" / "synthetic", pipeline / "runs"]
    outs += [p for p in (pipeline / "eval", pipeline / "exports") if p.exists()]
    before = digests(*outs)

    stages = list(yaml.safe_load((pipeline / "dvc.lock").read_text())["stages"])
    sh("dvc", "push", *stages, cwd=pipeline)
    assert any(p.is_file() for p in remote.rglob("*"))
    wipe(pipeline / ".dvc" / "cache")
    for p in outs:
        wipe(p)
    sh("dvc", "pull", *stages, cwd=pipeline)
    assert digests(*outs) == before
    run = pipeline / "runs" / "smoke" / "dvc"
    assert (run / "best" / "model.safetensors").is_file() and not (run / "checkpoint").exists()

    # `birds data fetch --source dvc` pulls the dataset from the same remote.
    wipe(pipeline / ".dvc" / "cache")
    wipe(pipeline / "data" / "synthetic")
    got = sh("birds", "data", "fetch", "--exp", "smoke", "--source", "dvc", "--root", "data/synthetic", cwd=pipeline)
    assert got.returncode == 0
    assert digests(outs[0]) == {k: v for k, v in before.items() if k.startswith(str(outs[0]))}


def test_fetch_dvc_add_then_source_dvc(pipeline: Path, tmp_path: Path) -> None:
    """The other way to put data in DVC: `birds data fetch --dvc-add`, `dvc push`, and later `--source dvc`."""
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "--local", "--default", "--force", "localtest", str(remote), cwd=pipeline)
    sh(
        "birds",
        "data",
        "fetch",
        "--exp",
        "smoke",
        "--source",
        "synthetic",
        "--root",
        "data/raw",
        "--dvc-add",
        cwd=pipeline,
    )
    assert (pipeline / "data" / "raw.dvc").is_file()
    before = digests(pipeline / "data" / "raw")
    sh("dvc", "push", "data/raw.dvc", cwd=pipeline)
    wipe(pipeline / ".dvc" / "cache")
    wipe(pipeline / "data" / "raw")
    sh("birds", "data", "fetch", "--source", "dvc", "--root", "data/raw", cwd=pipeline)
    assert digests(pipeline / "data" / "raw") == before
