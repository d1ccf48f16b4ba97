"""Predicting from an ONNX export folder: no torch, torchvision or transformers imported; same answers as torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HEAVY = ("torch", "torchvision", "transformers")

# Runs the real CLI in a fresh interpreter and reports which heavy packages got imported. With BLOCK=1 those imports
# raise, as on a machine where only onnxruntime, numpy, pillow, typer and rich are installed.
SCRIPT = """
import importlib.abc, json, sys
HEAVY = {heavy!r}
if {block!r}:
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, Block())
sys.argv = ["birds", *{args!r}]
from birdcli.cli import main
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print("RESULT " + json.dumps({{"code": code, "loaded": loaded}}), file=sys.stderr)
"""


def run_cli(args: list[str], block: bool) -> tuple[int, list[str], str, str]:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(heavy=HEAVY, block=block, args=args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BIRDS_QUIET": "1", "COLUMNS": "200"},
    )
    line = [x for x in r.stderr.splitlines() if x.startswith("RESULT ")]
    assert line, r.stderr
    result = json.loads(line[-1][len("RESULT ") :])
    return result["code"], result["loaded"], r.stdout, r.stderr


@pytest.fixture(scope="module")
def onnx_dir(smoke_run, tmp_path_factory) -> Path:
    from birdcli.export import export

    out = tmp_path_factory.mktemp("onnx") / "export"
    export(str(smoke_run), out_dir=out, bench=False)
    return out


@pytest.fixture(scope="module")
def images(synthetic_data, tmp_path_factory) -> list[str]:
    """Real synthetic photos plus the awkward cases the preprocessing must treat like the torch path."""
    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    photo.save(d / "wide.jpg", quality=90)  # needs resizing, not square
    exif = photo.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    photo.save(d / "rotated.jpg", exif=exif)
    photo.convert("L").save(d / "gray.png")
    Image.fromarray(rng.integers(0, 255, (50, 40, 4), dtype=np.uint8), "RGBA").save(d / "alpha.png")
    photo.convert("P").save(d / "palette.gif")
    real = sorted(str(p) for p in (synthetic_data / "test").rglob("*.jpg"))[::3]
    return real + [str(d / n) for n in ("wide.jpg", "rotated.jpg", "gray.png", "alpha.png", "palette.gif")]


def torch_probs(smoke_run: Path, files: list[str]) -> np.ndarray:
    from birdcli.predict import TorchPredictor

    predictor = TorchPredictor(smoke_run / "best", "cpu", "fp32")
    return np.stack([o.probs for o in predictor.predict(files)])


@pytest.mark.parametrize("block", [False, True], ids=["imports-checked", "torch-unavailable"])
def test_predict_from_export_imports_no_torch(onnx_dir, images, block):
    code, loaded, stdout, stderr = run_cli(["predict", *images[:4], "--model", str(onnx_dir), "--json"], block)
    assert code == 0, stderr
    assert loaded == []
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["file"] for r in rows] == images[:4]
    assert all(len(r["predictions"]) == 5 for r in rows)


def test_onnx_and_torch_agree_on_top1_and_probabilities(onnx_dir, images, smoke_run):
    code, _, stdout, stderr = run_cli(["predict", *images, "--model", str(onnx_dir), "--json", "-k", "6"], False)
    assert code == 0, stderr
    labels = json.loads((onnx_dir / "labels.json").read_text())
    onnx = np.zeros((len(images), len(labels)))
    for i, line in enumerate(stdout.splitlines()):
        for p in json.loads(line)["predictions"]:
            onnx[i, labels.index(p["species"])] = p["probability"]
    ref = torch_probs(smoke_run, images)
    assert (onnx.argmax(1) == ref.argmax(1)).all()
    # Decoding is bit-identical; Pillow's and torchvision's antialiased resize round a few pixels differently by
    # one level (about 0.2% of pixels at 300x200 -> 32x32), which moves probabilities by a few 1e-4.
    np.testing.assert_allclose(onnx, ref, atol=2e-3)
    np.testing.assert_allclose(onnx[:8], ref[:8], atol=1e-5)  # 32 px photos: no resize, same to JSON's 6 decimals


def test_onnx_predictor_in_process_matches_torch_on_real_photos(onnx_dir, smoke_run, birds_mini):
    from birdcli.onnx_backend import OnnxPredictor

    files = sorted(str(p) for p in (birds_mini / "valid").rglob("*.jpg"))[:40]  # 224 px photos resized to 32
    ours = np.stack([o.probs for o in OnnxPredictor(onnx_dir).predict(files)])
    ref = torch_probs(smoke_run, files)
    assert (ours.argmax(1) == ref.argmax(1)).all()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_bad_files_are_named_and_the_rest_predicted(onnx_dir, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    code, loaded, stdout, stderr = run_cli(["predict", images[0], str(broken), "--model", str(onnx_dir)], False)
    assert code == 1 and loaded == []
    assert "broken.jpg" in stderr and "1 predicted, 1 failed" in stderr
    assert Path(images[0]).name in stdout


def test_export_folder_without_birdcli_files_falls_back_to_hf_configs(onnx_dir, tmp_path):
    from birdcli.onnx_backend import read_export

    bare = tmp_path / "bare"
    shutil.copytree(onnx_dir, bare)
    (bare / "labels.json").unlink()
    (bare / "preprocess.json").unlink()
    assert read_export(bare) == read_export(onnx_dir)


def test_corrupt_model_is_one_clear_error(onnx_dir, images, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(onnx_dir, bad)
    (bad / "model.onnx").write_bytes(b"\x00garbage")
    code, loaded, _, stderr = run_cli(["predict", images[0], "--model", str(bad)], False)
    assert code == 1 and loaded == []
    assert "cannot load" in stderr and "model.onnx" in stderr


def test_evaluate_an_export_without_torch_matches_torch(onnx_dir, smoke_run, synthetic_data, tmp_path):
    from birdcli.evaluate import evaluate

    args = ["evaluate", str(onnx_dir), "--data-root", str(synthetic_data), "--out", str(tmp_path / "onnx"), "--json"]
    code, loaded, stdout, stderr = run_cli(args, True)
    assert code == 0, stderr
    assert loaded == []
    ours = json.loads(stdout)
    ref = evaluate(smoke_run, "test", synthetic_data, tmp_path / "torch", "cpu", "fp32", track=False).metrics
    assert ours["samples"] == ref["samples"] == 24
    assert ours["top1"] == ref["top1"] and ours["top5"] == ref["top5"]
    assert abs(ours["loss"] - ref["loss"]) < 1e-4
    assert (tmp_path / "onnx" / "metrics.json").is_file() and (tmp_path / "onnx" / "confusion.png").is_file()
