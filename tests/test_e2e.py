"""One tiny end-to-end run through the real CLI, in an empty folder: fetch, check, train, evaluate, predict, export."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_birds


def test_fetch_train_evaluate_predict_export(tmp_path: Path):
    over = ["data.root=data/raw", "data.synthetic.num_classes=4", "data.synthetic.train_per_class=12"]
    r = run_birds("data", "fetch", "--source", "synthetic", *over, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_birds("data", "check", "--json", "--root", "data/raw", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["num_species"] == 4

    r = run_birds("train", "--exp", "smoke", "--name", "e2e", "train.epochs=2", "tracking.wandb.mode=disabled",
                  *over, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "smoke" / "e2e"

    r = run_birds("evaluate", "--json", cwd=tmp_path)  # the latest run by default
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["samples"] == 4 * 10
    assert (run / "eval" / "test" / "metrics.json").is_file() and (run / "eval" / "test" / "confusion.png").is_file()

    r = run_birds("predict", "data/raw/test", "--json", "--top-k", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(rows) == 40 and all(len(row["predictions"]) == 2 for row in rows)

    r = run_birds("export", str(run), "--out", "exported", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "exported" / "model.onnx").is_file()
    r = run_birds("predict", "data/raw/test", "--model", "exported", "--json", "--top-k", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    onnx_rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    same = sum(
        a["predictions"][0]["species"] == b["predictions"][0]["species"] for a, b in zip(rows, onnx_rows, strict=True)
    )
    assert same == 40
