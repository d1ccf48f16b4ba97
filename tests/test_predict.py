"""birds predict: the inputs people have, the bad files they also have, and one preprocessing contract with training."""

from __future__ import annotations

import csv
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from birdcli import images
from birdcli.predict import collect, predict, top_k
from tests.conftest import SHARED_DATA, run_birds

GOOD = ["one_pixel.png", "cmyk.jpg", "sixteen_bit.png", "rgba.png", "animated.gif", "sub/exif_rotated.jpg",
        "gray.webp", "palette.bmp", "photo.jpg"]  # fmt: skip
BAD = {
    "truncated.jpg": "truncated",
    "zero_bytes.jpg": "empty file",
    "text.jpg": "not an image",
    "bomb.png": "decompression bomb",
}


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _two_colour(width: int = 60, height: int = 40) -> Image.Image:
    """Left half red, right half blue: shows which way a rotation went."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2] = (255, 0, 0)
    a[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def make_inputs(folder: Path, photo: Path) -> Path:
    """Every kind of good and bad file the issue lists, generated from one real photo."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir()
    data = photo.read_bytes()
    base = Image.open(photo).convert("RGB")
    (folder / "photo.jpg").write_bytes(data)
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture of a bird\n")
    (folder / "bomb.png").write_bytes(_png_declaring(60000, 60000))
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one_pixel.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    ramp = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "sixteen_bit.png")
    base.convert("RGBA").save(folder / "rgba.png")
    frames = [Image.new("RGB", (40, 30), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _two_colour().save(folder / "sub" / "exif_rotated.jpg", exif=exif, quality=95)
    base.convert("L").save(folder / "gray.webp")
    base.convert("P").save(folder / "palette.bmp")
    (folder / "notes.txt").write_text("not an image extension: ignored when walking a folder\n")
    (folder / ".hidden.jpg").write_text("hidden files are ignored too\n")
    return folder


def _photo(synthetic_data: Path) -> Path:
    """A real photo from ../shared/data/birds-mini when present, else a synthetic image."""
    real = sorted((SHARED_DATA / "birds-mini" / "test").glob("*/*.jpg"))
    return real[0] if real else sorted((synthetic_data / "test").glob("*/*.jpg"))[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synthetic_data) -> Path:
    return make_inputs(tmp_path_factory.mktemp("inputs") / "mixed", _photo(synthetic_data))


# ---------------------------------------------------------------- torch-free parts


def test_importing_predict_and_images_needs_no_torch():
    code = "import sys, birdcli.predict, birdcli.images; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_collect_is_deterministic_recursive_and_names_what_it_cannot_use(inputs, tmp_path):
    empty = tmp_path / "empty"
    (empty / "deeper").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    files, failed = collect([str(inputs), str(inputs / "photo.jpg"), str(empty), str(tmp_path / "missing.jpg"),
                             str(tmp_path / "nothing" / "*.png"), str(inputs / "*.gif")])  # fmt: skip
    names = [Path(f).relative_to(inputs).as_posix() for f in files]
    assert names == sorted(GOOD + list(BAD), key=lambda n: (n.count("/"), n))  # files first, then sub/, sorted
    assert "notes.txt" not in names and ".hidden.jpg" not in names  # and duplicates (photo, gif) counted once
    reasons = {Path(o.file).name: o.error for o in failed}
    assert reasons == {
        "empty": reasons["empty"],
        "missing.jpg": "no such file or folder",
        "*.png": "no image matches this pattern",
    }
    assert reasons["empty"].startswith("folder has no images")
    assert collect([str(inputs)]) == collect([str(inputs)])


def test_loader_reads_every_good_format(inputs):
    for name in GOOD:
        rgb = images.load_rgb(inputs / name)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, name
    assert images.load_rgb(inputs / "one_pixel.png").shape == (1, 1, 3)
    assert images.load_rgb(inputs / "animated.gif")[0, 0].tolist() == [255, 0, 0]  # the first frame
    sixteen = images.load_rgb(inputs / "sixteen_bit.png")
    assert sixteen[0, 0].tolist() == [0, 0, 0] and sixteen[-1, -1].tolist() == [255, 255, 255]  # scaled, not clipped
    rotated = images.load_rgb(inputs / "sub" / "exif_rotated.jpg")
    assert rotated.shape == (60, 40, 3)  # EXIF orientation applied: portrait
    assert rotated[5, 20, 0] > 200 and rotated[55, 20, 2] > 200  # red half on top, blue below


def test_bad_files_get_one_short_reason(inputs):
    for name, reason in BAD.items():
        with pytest.raises(images.ImageError, match=reason):
            images.load_rgb(inputs / name)
    with pytest.raises(images.ImageError, match="60000x60000|3,600,000,000 pixels"):
        images.probe(inputs / "bomb.png")
    with pytest.raises(images.ImageError, match="is a folder"):
        images.probe(inputs / "sub")


def test_top_k_is_ordered_and_stable():
    probs = np.array([0.1, 0.4, 0.1, 0.4], dtype=np.float32)
    assert top_k(probs, list("abcd"), 3) == [("b", pytest.approx(0.4)), ("d", pytest.approx(0.4)),
                                             ("a", pytest.approx(0.1))]  # fmt: skip


# ---------------------------------------------------------------- one preprocessing contract


def test_train_eval_transform_and_predict_transform_give_identical_tensors(smoke_run, synthetic_data, inputs):
    import torch

    from birdcli.data.dataset import BirdImages, eval_transform, normalize
    from birdcli.inference import loader_for
    from birdcli.predict import load_predictor

    predictor = load_predictor(smoke_run / "best", device="cpu", precision="fp32")
    prep = predictor.preprocess
    files = [_photo(synthetic_data), *(inputs / n for n in ["cmyk.jpg", "sixteen_bit.png", "sub/exif_rotated.jpg"])]
    train_time = BirdImages([(f, 0) for f in files], eval_transform(prep.size))  # what training evaluates on
    batch = next(iter(loader_for([(f, 0) for f in files], prep.size, len(files), 0)))[0]
    for i, f in enumerate(files):
        at_predict = predictor.load(str(f))
        assert at_predict.dtype == torch.uint8 and tuple(at_predict.shape) == (3, *prep.size)
        assert torch.equal(train_time[i][0], at_predict), f
        assert torch.equal(batch[i], at_predict), f
        # the torch-free path (for ONNX) agrees to within one grey level
        numpy_path = images.resize(images.load_rgb(f), prep.size).transpose(2, 0, 1).astype(int)
        assert np.abs(numpy_path - at_predict.numpy().astype(int)).max() <= 1, f
    x = normalize(batch, prep.mean, prep.std)
    assert np.allclose(images.normalize(batch.permute(0, 2, 3, 1).numpy(), prep.mean, prep.std), x.numpy(), atol=1e-6)
    with torch.no_grad():
        expected = torch.softmax(predictor.net(pixel_values=x).logits, dim=-1).numpy()
    got = np.stack([o.probs for o in predictor.predict([str(f) for f in files])])
    assert np.allclose(got, expected, atol=1e-5)


def test_predict_is_deterministic_and_batch_size_does_not_matter(smoke_run, inputs, capsys):
    runs = []
    for batch_size in (2, 64):
        done, failed = predict([str(inputs)], str(smoke_run), fmt="json", batch_size=batch_size, device="cpu",
                               precision="fp32")  # fmt: skip
        assert (done, failed) == (len(GOOD), len(BAD))
        runs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert [r["file"] for r in runs[0]] == [r["file"] for r in runs[1]]
    for a, b in zip(*runs, strict=True):
        assert ("error" in a) == ("error" in b)
        if "predictions" in a:
            assert [p["species"] for p in a["predictions"]] == [p["species"] for p in b["predictions"]]
            assert [p["probability"] for p in a["predictions"]] == pytest.approx(
                [p["probability"] for p in b["predictions"]], abs=1e-5
            )


# ---------------------------------------------------------------- the real CLI


def test_cli_bad_inputs_are_named_and_the_rest_predicted(smoke_run, inputs, tmp_path):
    empty = tmp_path / "no-images-here"
    empty.mkdir()
    r = run_birds("predict", str(inputs), str(empty), "--model", str(smoke_run), "--json", "--top-k", "3",
                  "--batch-size", "4", "--device", "cpu")  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[0] == {"file": str(empty), "error": lines[0]["error"]}  # argument-level failures come first
    by_file = {Path(o["file"]).relative_to(inputs).as_posix(): o for o in lines[1:]}
    assert len(by_file) == len(lines) - 1 == len(GOOD) + len(BAD)
    for name in GOOD:
        preds = by_file[name]["predictions"]
        assert len(preds) == 3 and all(0.0 <= p["probability"] <= 1.0 for p in preds), name
        assert [p["probability"] for p in preds] == sorted((p["probability"] for p in preds), reverse=True)
    failure_lines = [line for line in r.stderr.splitlines() if line.startswith("failed:")]
    assert len(failure_lines) == len(BAD) + 1  # one line per bad file, one for the empty folder
    for name, reason in BAD.items():
        assert reason in by_file[name]["error"]
        assert sum(name in line and reason in line for line in failure_lines) == 1, name
    assert any(str(empty) in line and "folder has no images" in line for line in failure_lines)
    assert f"{len(GOOD)} predicted, {len(BAD) + 1} failed" in r.stderr

    table = run_birds("predict", str(inputs), "--model", str(smoke_run), "--device", "cpu")
    assert table.returncode == 1 and "Traceback" not in table.stdout + table.stderr
    for name in GOOD:
        assert Path(name).name in table.stdout


def test_cli_all_good_exits_0_with_csv(smoke_run, inputs):
    good = [str(inputs / n) for n in GOOD]
    r = run_birds("predict", *good, "--model", str(smoke_run), "--csv", "-k", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["file"] for row in rows] == [f for f in good for _ in range(2)]
    assert [row["rank"] for row in rows] == ["1", "2"] * len(good)
    assert all(row["error"] == "" and 0.0 <= float(row["probability"]) <= 1.0 for row in rows)


def test_cli_usage_errors_exit_2(smoke_run, inputs):
    photo = str(inputs / "photo.jpg")
    for args in (["--json", "--csv"], ["--top-k", "0"], ["--batch-size", "0"], ["--top-k", "many"]):
        r = run_birds("predict", photo, "--model", str(smoke_run), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert run_birds("predict").returncode == 2  # no PATH
