"""`birds train` end to end on CPU: artifacts, exact resume after SIGKILL, torchrun (gloo), W&B offline, errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import wandb_log
from tests.conftest import run_birds

# Small, deterministic settings shared by the subprocess runs below.
FAST = ["data.num_workers=0", "tracking.wandb.mode=disabled", "train.log_every=1"]


def _weights(run: Path, sub: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / sub / "model.safetensors"))


def test_smoke_run_leaves_everything_behind(smoke_run: Path):
    for name in ("config.yaml", "history.csv", "metrics.json", "manifest.json"):
        assert (smoke_run / name).is_file(), name
    for sub in ("best", "last"):
        for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
            assert (smoke_run / sub / name).is_file(), f"{sub}/{name}"
    assert (smoke_run / "checkpoint" / "state.pt").is_file()
    config = json.loads((smoke_run / "best" / "config.json").read_text())
    assert len(config["id2label"]) == 6 and "AZURE ROUND WARBLER" in config["label2id"]
    rows = list(csv.DictReader((smoke_run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "val_acc", "val_top5", "lr", "images_per_s", "seconds"} <= set(rows[0])
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    assert manifest["precision"] in {"bf16", "fp32"} and len(manifest["data_fingerprint"]) == 16
    assert set(manifest["versions"]) >= {"torch", "transformers"}
    # the checkpoint is loadable without unpickling arbitrary objects
    state = torch.load(smoke_run / "checkpoint" / "state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(state)


def test_transformers_pipeline_loads_best(smoke_run: Path, synthetic_data: Path):
    from transformers import pipeline

    clf = pipeline("image-classification", model=str(smoke_run / "best"), device="cpu")
    image = sorted((synthetic_data / "test").rglob("*.jpg"))[0]
    out = clf(str(image), top_k=3)
    assert len(out) == 3 and all(0 <= o["score"] <= 1 for o in out)
    labels = json.loads((smoke_run / "best" / "config.json").read_text())["id2label"].values()
    assert out[0]["label"] in labels


def test_smoke_learns_well_above_chance(tmp_path: Path):
    """The shipped smoke experiment, as a user runs it: fetches its own data, trains, beats chance by far."""
    r = run_birds("train", "--exp", "smoke", "--quiet", "tracking.wandb.mode=disabled", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(next((tmp_path / "runs" / "smoke").glob("*/metrics.json")).read_text())
    assert metrics["best_val_acc"] > 0.5  # 10 species: chance is 0.1
    assert (tmp_path / "data" / "synthetic" / "birds.csv").is_file()


def test_runs_are_never_overwritten(tmp_path: Path, synthetic_data: Path):
    args = ["train", "--exp", "smoke", "--quiet", f"data.root={synthetic_data}", "train.max_steps=1", *FAST]
    assert run_birds(*args, "--name", "same", cwd=tmp_path).returncode == 0
    again = run_birds(*args, "--name", "same", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert run_birds(*args, cwd=tmp_path).returncode == 0
    assert run_birds(*args, cwd=tmp_path).returncode == 0
    assert len(list((tmp_path / "runs" / "smoke").iterdir())) == 3


def _resume_args(data: Path) -> list[str]:
    return [
        "--exp", "smoke", "--quiet", f"data.root={data}", "train.epochs=6", "train.checkpoint_every=2",
        "train.deterministic=true", "augment.enabled=true", "augment.color_jitter=0.2", *FAST,
    ]  # fmt: skip


def test_kill_and_resume_is_bit_exact(tmp_path: Path, synthetic_data: Path):
    """SIGKILL a real run mid-epoch after a checkpoint, resume it, and get the uninterrupted run's weights exactly."""
    args = _resume_args(synthetic_data)
    full = run_birds("train", *args, "--name", "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr

    env = {**os.environ, "BIRDS_QUIET": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "birdcli", "train", *args, "--name", "killed"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    meta = tmp_path / "runs" / "smoke" / "killed" / "checkpoint" / "meta.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            position = json.loads(meta.read_text())["position"]
            if position["batch"] > 0 and position["epoch"] >= 1:  # a mid-epoch checkpoint, in the 2nd epoch
                break
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited early"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = tmp_path / "runs" / "smoke" / "killed"
    assert not (run / "metrics.json").exists(), "the run finished before it could be killed"

    resumed = run_birds("train", "--exp", "smoke", "--resume", str(run), "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "runs" / "smoke" / "full"), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (
        json.loads((run / "metrics.json").read_text())["steps"]
        == json.loads((tmp_path / "runs" / "smoke" / "full" / "metrics.json").read_text())["steps"]
    )


def test_resume_auto_picks_latest_and_errors_cleanly(tmp_path: Path, synthetic_data: Path):
    none = run_birds("train", "--exp", "smoke", "--resume", "auto", cwd=tmp_path)
    assert none.returncode == 1 and "no run with a checkpoint" in none.stderr and "Traceback" not in none.stderr
    args = ["--exp", "smoke", "--quiet", f"data.root={synthetic_data}", "train.epochs=1", *FAST]
    assert run_birds("train", *args, "--name", "a", cwd=tmp_path).returncode == 0
    # extend the finished run by one epoch: resume continues from its last checkpoint
    cfg = tmp_path / "runs" / "smoke" / "a" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("epochs: 1", "epochs: 2"))
    r = run_birds("train", "--exp", "smoke", "--resume", "auto", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((tmp_path / "runs" / "smoke" / "a" / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


@pytest.mark.slow
def test_torchrun_gloo_matches_single_process(tmp_path: Path, synthetic_data: Path):
    """2 CPU processes (gloo, DDP) with the same global batch end where a single process does."""
    common = [
        "--exp", "smoke", "--quiet", f"data.root={synthetic_data}", "train.epochs=2", "train.batch_size=16",
        "train.precision=fp32", *FAST,
    ]  # fmt: skip
    single = run_birds("train", *common, "--name", "single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "BIRDS_QUIET": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "birdcli", "train", *common, "--name", "ddp"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "smoke" / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["replicas_identical"] is True
    a, b = _weights(tmp_path / "runs" / "smoke" / "single"), _weights(tmp_path / "runs" / "smoke" / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=5e-4)  # Adam magnifies fp32 reduction-order noise


def test_wandb_offline_run_is_written_and_resumed_with_same_id(tmp_path: Path, synthetic_data: Path):
    args = [
        "--exp",
        "smoke",
        "--quiet",
        f"data.root={synthetic_data}",
        "train.epochs=1",
        "data.num_workers=0",
        "train.log_every=1",
    ]
    env = {"WANDB_MODE": "offline"}
    r = run_birds("train", *args, "tracking.wandb.mode=offline", "--name", "w", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "smoke" / "w"
    wandb_id = json.loads((run / "checkpoint" / "meta.json").read_text())["wandb_id"]
    assert wandb_id
    offline = list((run / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert offline and list(offline[0].glob("*.wandb")), "no offline W&B run was written"
    # read back what was logged: the resolved config, per-step train and per-epoch val metrics
    log = next(offline[0].glob("*.wandb"))
    rows = wandb_log.history(log)
    assert any("train/loss" in r and "train/lr" in r for r in rows)
    assert any("val/acc" in r and "val/top5" in r for r in rows)
    assert wandb_log.config(log)["train"]["batch_size"] == 32

    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("epochs: 1", "epochs: 2"))
    r = run_birds("train", "--exp", "smoke", "--resume", str(run), "--quiet", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["wandb_id"] == wandb_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2  # same id, continued


def test_device_and_model_errors_are_one_line(tmp_path: Path, synthetic_data: Path):
    if not torch.cuda.is_available():
        r = run_birds("train", "--exp", "smoke", "--device", "cuda", f"data.root={synthetic_data}", cwd=tmp_path)
        assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    r = run_birds(
        "train", "--exp", "exp1", f"data.root={synthetic_data}", *FAST, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}
    )
    assert r.returncode == 1 and "cannot load pretrained model" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3
    r = run_birds("train", "--exp", "exp2", "data.root=nowhere", cwd=tmp_path)
    assert r.returncode == 1 and "birds data fetch" in r.stderr


@pytest.mark.parametrize(
    "knobs",
    [
        ["optimizer=sgd", "scheduler.name=linear", "train.grad_accum=2", "train.grad_clip=null"],
        ["scheduler.name=constant", "scheduler.warmup_steps=2", "augment.enabled=true", "augment.rand_augment=true"],
        ["train.early_stopping_patience=1", "optimizer.lr=0.0", "train.epochs=4", "train.label_smoothing=0.1"],
        ["train.precision=fp32", "model.attn_implementation=eager", "data.cache=true"],
    ],
)
def test_training_knobs_run(tmp_path: Path, synthetic_data: Path, knobs: list[str]):
    from birdcli.config import load
    from birdcli.train import train

    base = [f"data.root={synthetic_data}", f"runs_dir={tmp_path}", "train.epochs=2", "data.num_workers=0"]
    cfg = load("smoke", [*base, "tracking.wandb.mode=disabled", f"data.cache_dir={tmp_path / 'cache'}", *knobs])
    run = train(cfg, device="cpu")
    rows = list(csv.DictReader((run / "history.csv").open()))
    if "train.early_stopping_patience=1" in knobs:  # lr 0: nothing improves after epoch 1, so it stops after 2
        assert len(rows) == 2
    else:
        assert len(rows) == 2 and (run / "best" / "model.safetensors").is_file()


def test_many_unreadable_images_in_a_worker_end_in_one_line(tmp_path: Path, synthetic_data: Path):
    """The error is raised inside a DataLoader worker process; the user still sees one plain line."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    for image in (data / "train").rglob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    r = run_birds("train", "--exp", "smoke", f"data.root={data}", "data.num_workers=1", "data.max_bad_in_row=3",
                  "tracking.wandb.mode=disabled", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unreadable images in a row" in errors[0], r.stderr[-2000:]
