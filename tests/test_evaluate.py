"""birds evaluate: metrics checked by hand, reports written and parsed, label mismatches, W&B, real photos."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from birdcli.errors import BirdsError
from birdcli.evaluate import calibration, compute, confusion_view, evaluate, most_confused
from tests import wandb_log
from tests.conftest import run_birds

REPORTS = ["metrics.json", "per_class.csv", "confusion.csv", "confused_pairs.csv", "misclassified.csv"]
PLOTS = ["confusion.png", "reliability.png"]

# Six samples, three classes, chosen as probabilities so that softmax(log p) = p and everything is hand-computable.
PROBS = np.array(
    [
        [0.72, 0.18, 0.10],  # true 0, predicted 0, confidence .72
        [0.33, 0.62, 0.05],  # true 0, predicted 1  (wrong)
        [0.12, 0.83, 0.05],  # true 1, predicted 1
        [0.21, 0.55, 0.24],  # true 1, predicted 1
        [0.64, 0.11, 0.25],  # true 2, predicted 0  (wrong)
        [0.04, 0.05, 0.91],  # true 2, predicted 2
    ]
)
LABELS = np.array([0, 0, 1, 1, 2, 2])


def test_metrics_match_a_hand_computation():
    m = compute(np.log(PROBS), LABELS, bins=10)
    s = m.summary
    assert s["samples"] == 6 and s["errors"] == 2
    assert s["top1"] == pytest.approx(4 / 6)
    assert s["top5"] == pytest.approx(1.0)  # 3 classes: the top 5 holds everything
    assert s["loss"] == pytest.approx(-(math.log(0.72 * 0.33 * 0.83 * 0.55 * 0.25 * 0.91)) / 6)
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # precision: class 0 predicted twice, right once; class 1 three times, right twice; class 2 once, right
    assert m.precision.tolist() == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert m.recall.tolist() == pytest.approx([1 / 2, 1.0, 1 / 2])  # = per-class accuracy
    f1 = [0.5, 2 * (2 / 3) / (5 / 3), 2 * 0.5 / 1.5]
    assert m.f1.tolist() == pytest.approx(f1)
    assert s["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert s["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert s["f1_macro"] == pytest.approx(sum(f1) / 3)
    # ECE, 10 bins: (.5,.6]: {.55 right}; (.6,.7]: {.62 wrong, .64 wrong}; (.7,.8]: {.72 right}; (.8,.9]: {.83 right};
    # (.9,1]: {.91 right}  ->  (|1-.55| + 2*|0-.63| + |1-.72| + |1-.83| + |1-.91|) / 6
    assert s["ece"] == pytest.approx((0.45 + 1.26 + 0.28 + 0.17 + 0.09) / 6)
    assert s["mean_confidence"] == pytest.approx((0.72 + 0.62 + 0.83 + 0.55 + 0.64 + 0.91) / 6)
    pairs = most_confused(m.confusion, ["a", "b", "c"])
    assert pairs == [
        {"true": "a", "predicted": "b", "count": 1, "rate": 0.5},
        {"true": "c", "predicted": "a", "count": 1, "rate": 0.5},
    ]


def test_top5_and_agreement_with_the_training_metrics():
    import torch

    from birdcli.inference import basic_metrics

    # 7 classes: sample 0's true class ranks 6th (a top-5 miss), sample 1's ranks 5th (a hit)
    logits = np.array([[7, 6, 5, 4, 3, 2, 1], [7, 6, 5, 4, 3, 2, 1]], dtype=np.float64)
    m = compute(logits, np.array([5, 4]))
    assert m.summary["top1"] == 0.0 and m.summary["top5"] == 0.5

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 12)).astype(np.float32)
    labels = rng.integers(0, 12, 200)
    ours = compute(logits, labels).summary
    theirs = basic_metrics(torch.from_numpy(logits), torch.from_numpy(labels))
    assert ours["top1"] == pytest.approx(theirs["acc"])
    assert ours["top5"] == pytest.approx(theirs["top5"])
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


def test_calibration_bins_and_a_perfectly_calibrated_model():
    conf = np.array([0.25, 0.25, 0.25, 0.25, 0.95, 0.95])
    correct = np.array([True, False, False, False, True, True])
    ece, bins = calibration(conf, correct, bins=4)
    assert [b["count"] for b in bins] == [4, 0, 0, 2]
    assert ece == pytest.approx(4 / 6 * 0 + 2 / 6 * 0.05)
    assert math.isnan(bins[1]["accuracy"])


def test_confusion_view_keeps_the_big_confusions_at_525_classes():
    c = 525
    cm = np.diag(np.full(c, 5))
    cm[10, 400] = 4  # the worst pair
    cm[7, 8] = 2
    cm[300, 301] = 1
    block, idx = confusion_view(cm, [f"s{i}" for i in range(c)], n=4)
    assert idx == [10, 400, 7, 8]  # pairs in order of their counts, both ends next to each other
    assert block.shape == (4, 5)  # plus a column for "any other class"
    assert block[0].tolist() == [5, 4, 0, 0, 0]
    assert block[:, 4].tolist() == [0, 0, 0, 0]
    small, idx = confusion_view(cm[:6, :6], list("abcdef"), n=25)
    assert idx == list(range(6)) and small.shape == (6, 6)


def _check_reports(out: Path, classes: int, samples: int) -> dict:
    for name in REPORTS + PLOTS:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(not isinstance(v, (dict, list)) for v in metrics.values()), "metrics.json must be flat"
    assert metrics["samples"] == samples and metrics["classes_model"] == classes
    per_class = list(csv.DictReader((out / "per_class.csv").open()))
    assert len(per_class) == classes
    assert sum(int(r["correct"]) for r in per_class) / samples == pytest.approx(metrics["top1"])
    rows = list(csv.reader((out / "confusion.csv").open()))
    assert len(rows) == classes + 1 and len(rows[0]) == classes + 1
    cm = np.array([[int(x) for x in r[1:]] for r in rows[1:]])
    assert cm.sum() == samples and np.trace(cm) == samples - metrics["errors"]
    wrong = list(csv.DictReader((out / "misclassified.csv").open()))
    assert len(wrong) == metrics["errors"]
    assert all(r["true"] != r["predicted"] and Path(r["file"]).is_file() for r in wrong)
    confidences = [float(r["confidence"]) for r in wrong]
    assert confidences == sorted(confidences, reverse=True)
    for name in PLOTS:
        with Image.open(out / name) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
    return metrics


def test_evaluate_the_smoke_run(smoke_run, tmp_path):
    result = evaluate(str(smoke_run), "test", out_dir=tmp_path / "out", device="cpu", workers=0, track=False)
    metrics = _check_reports(tmp_path / "out", classes=6, samples=6 * 4)
    assert metrics == result.metrics
    assert metrics["left_out"] == 0 and metrics["unreadable_images"] == 0
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0


def test_cli_evaluate_json_and_default_out(smoke_run, tmp_path):
    run = shutil.copytree(smoke_run, tmp_path / "run")  # the default --out writes into the run folder
    r = run_birds("evaluate", str(run), "--split", "valid", "--device", "cpu", "--workers", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    printed = json.loads(r.stdout)
    out = run / "eval" / "valid"
    assert Path(printed["out"]).resolve() == out.resolve()
    metrics = _check_reports(out, classes=6, samples=6 * 4)
    assert {k: printed[k] for k in metrics} == metrics
    assert isinstance(printed["most_confused"], list)

    table = run_birds("evaluate", str(run / "best"), "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "t"))
    assert table.returncode == 0, table.stderr
    assert "top-1 accuracy" in table.stdout and "macro F1" in table.stdout
    assert (tmp_path / "t" / "metrics.json").is_file()


def test_label_mismatch_is_reported_and_left_out(smoke_run, synthetic_data, tmp_path, capsys):
    species = sorted(p.name for p in (synthetic_data / "test").iterdir())
    root = tmp_path / "data"
    for name in species[1:]:  # the model's first species has no images here
        shutil.copytree(synthetic_data / "test" / name, root / "test" / name)
    extra = root / "test" / "UNHEARD-OF WARBLER"  # a species the model does not know: 3 images to leave out
    extra.mkdir()
    for i, src in enumerate(sorted((synthetic_data / "test" / species[0]).iterdir())[:3]):
        shutil.copy(src, extra / f"{i}.jpg")
    result = evaluate(str(smoke_run), data_root=root, out_dir=tmp_path / "out", device="cpu", workers=0, track=False)
    m = result.metrics
    assert m["left_out"] == 3 and m["samples"] == 5 * 4
    assert m["species_unknown_to_model"] == 1 and m["species_missing_in_data"] == 1
    assert m["classes_evaluated"] == 5
    err = capsys.readouterr().err
    assert "UNHEARD-OF WARBLER" in err and "left out 3 of 23 images" in err
    assert species[0] in err

    only_strangers = tmp_path / "strangers"
    shutil.copytree(extra, only_strangers / "test" / extra.name)
    with pytest.raises(BirdsError, match="none of the 3 images"):
        evaluate(str(smoke_run), data_root=only_strangers, out_dir=tmp_path / "x", device="cpu", workers=0)


def test_logs_to_the_training_runs_wandb_run(smoke_run, tmp_path):
    """Offline W&B (no network here): the metrics go into the run id that checkpoint/meta.json names."""
    pytest.importorskip("wandb")
    run = shutil.copytree(smoke_run, tmp_path / "run")
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(cfg.replace("mode: disabled", "mode: offline"))
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    (run / "checkpoint" / "meta.json").write_text(json.dumps({**meta, "wandb_id": "evaltest42"}))
    # a subprocess: wandb's service finishes writing the offline log by the time the process has exited
    r = run_birds("evaluate", str(run), "--device", "cpu", "--workers", "0", "--json", env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr
    logs = list((run / "wandb").glob("offline-run-*-evaltest42/run-evaltest42.wandb"))
    assert len(logs) == 1
    logged = {k: v for row in wandb_log.history(logs[0]) for k, v in row.items()}
    assert logged["eval/test/top1"] == pytest.approx(json.loads(r.stdout)["top1"])
    assert logged["eval/test/samples"] == 24


def test_a_bare_model_folder_reports_to_eval(smoke_run, synthetic_data, tmp_path, monkeypatch):
    model = shutil.copytree(smoke_run / "best", tmp_path / "some-hf-model")  # not inside a run: no config.yaml
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BirdsError, match="no test/ folder"):  # the config default data root is not there
        evaluate(str(model), device="cpu", workers=0)
    result = evaluate(str(model), data_root=synthetic_data, device="cpu", workers=0)
    assert result.out_dir == Path("eval")
    _check_reports(tmp_path / "eval", classes=6, samples=6 * 4)


def test_usage_errors(smoke_run, tmp_path):
    r = run_birds("evaluate", str(smoke_run), "--split", "bogus")
    assert r.returncode == 2 and "unknown split" in r.stderr and "Traceback" not in r.stderr
    r = run_birds("evaluate", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "does not exist" in r.stderr


# ---------------------------------------------------------------- real photos (../shared/data/birds-mini)


@pytest.fixture(scope="module")
def mini_run(birds_mini, tmp_path_factory) -> Path:
    """The smoke model trained for one epoch (3 steps) on the real birds-mini photos, in-process."""
    from birdcli.config import load
    from birdcli.train import train

    runs = tmp_path_factory.mktemp("mini-runs")
    cfg = load(
        "smoke",
        [
            f"data.root={birds_mini}",
            f"runs_dir={runs}",
            "train.epochs=1",
            "data.num_workers=0",
            "tracking.wandb.mode=disabled",
        ],
    )
    return train(cfg, device="cpu", name="mini")


def test_evaluate_a_model_trained_on_real_photos(mini_run, birds_mini, tmp_path):
    result = evaluate(str(mini_run), "test", out_dir=tmp_path / "out", device="cpu", workers=0, batch_size=8)
    metrics = _check_reports(tmp_path / "out", classes=20, samples=20)
    assert result.metrics["left_out"] == 0 and result.metrics["species_missing_in_data"] == 0
    assert metrics["top5"] >= metrics["top1"]
