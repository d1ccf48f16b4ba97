"""Dataset loading and `birds data check` on real photos (../shared) and on generated edge cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from birdcli.data import layout
from birdcli.data.check import check
from birdcli.data.dataset import BirdImages, class_names, collate, decode, eval_transform, normalize, samples
from birdcli.errors import BirdsError
from tests.conftest import run_birds


def test_birds_485_loads_with_its_quirks(birds_485: Path):
    classes = class_names(birds_485)
    assert len(classes) == 485 and classes == sorted(classes)
    items = samples(birds_485, "train", classes)
    assert len(items) == 1935
    odd = [(p, y) for p, y in items if classes[y] == "PLUSH CRESTED JAY"]
    sizes = {Image.open(p).size for p, _ in odd}
    assert sizes != {(224, 224)}, "the README promises non-224 images here"
    ds = BirdImages(odd, eval_transform((224, 224)))
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch[0].shape == (len(odd), 3, 224, 224) and batch[0].dtype == torch.uint8
    x = normalize(batch[0], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0


def test_cli_fetch_dir_then_check_reports_485_species(tmp_path: Path, birds_485: Path):
    r = run_birds(
        "data", "fetch", "--source", "dir", "--path", str(birds_485), "--link", "--root", "data/raw", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    r = run_birds("data", "check", "--json", "--no-decode", "--root", "data/raw", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    report = json.loads(r.stdout)
    assert report["num_species"] == 485 and report["ok"]
    assert sum(report["counts"]["train"].values()) == 1935
    assert any("PLUSH CRESTED JAY" in f for f in report["odd_sizes"])
    r = run_birds("data", "check", "--root", "data/raw", "--no-decode", cwd=tmp_path)
    assert r.returncode == 0 and "485" in r.stdout


@pytest.fixture
def quirky(tmp_path: Path, synthetic_data: Path) -> Path:
    """A copy of the synthetic set with a double-space species, a corrupt file and a non-RGB image."""
    root = tmp_path / "quirky"
    shutil.copytree(synthetic_data, root)
    first = layout.species_dirs(root, "train")[0]
    for split in layout.SPLITS:
        (root / split / first).rename(root / split / "COCK OF THE  ROCK")
    csv = (root / "birds.csv").read_text().replace(first, "COCK OF THE  ROCK")
    (root / "birds.csv").write_text(csv)
    return root


def test_double_space_names_survive(quirky: Path):
    classes = class_names(quirky)
    assert "COCK OF THE  ROCK" in classes
    assert check(quirky).ok


def test_check_finds_corrupt_files_and_csv_disagreement(quirky: Path):
    bad = next((quirky / "train").rglob("*.jpg"))
    bad.write_bytes(bad.read_bytes()[:100])
    gray = next((quirky / "valid").rglob("*.jpg"))
    Image.open(gray).convert("L").save(gray)
    (quirky / "birds.csv").write_text((quirky / "birds.csv").read_text() + "0.0,train/NOPE/1.jpg,NOPE,train,X\n")
    (quirky / "test" / "STRANGER").mkdir()
    Image.new("RGB", (8, 8)).save(quirky / "test" / "STRANGER" / "1.jpg")
    report = check(quirky)
    assert not report.ok
    assert [u["file"] for u in report.unreadable] == [bad.relative_to(quirky).as_posix()]
    assert gray.relative_to(quirky).as_posix() in report.non_rgb
    assert report.csv["num_not_on_disk"] == 1 and report.csv["num_not_in_csv"] == 1
    assert report.extra["test"] == ["STRANGER"]
    r = run_birds("data", "check", "--root", str(quirky), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False


def test_unreadable_images_are_skipped_then_fail_when_many(tmp_path: Path, synthetic_data: Path, capsys):
    items = samples(synthetic_data, "train", class_names(synthetic_data))[:6]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    ds = BirdImages([items[0], (broken, 0), items[1]], eval_transform((32, 32)), max_bad_in_row=3)
    images, labels, idx = collate([ds[i] for i in range(3)])
    assert images.shape[0] == 2 and idx.tolist() == [0, 2]
    assert "broken.jpg" in capsys.readouterr().err
    ds = BirdImages([(broken, 0)] * 3, eval_transform((32, 32)), max_bad_in_row=3)
    ds[0], ds[1]
    with pytest.raises(BirdsError, match="in a row"):
        ds[2]


def test_decode_handles_what_people_have(tmp_path: Path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cases = {
        "a.png": Image.fromarray(rgb).convert("RGBA"),
        "b.png": Image.fromarray(rgb).convert("P"),
        "c.jpg": Image.fromarray(rgb).convert("CMYK"),
        "d.bmp": Image.fromarray(rgb),
        "e.webp": Image.fromarray(rgb),
        "f.gif": Image.fromarray(rgb).convert("P"),
        "g.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 256).convert("I;16"),
        "h.jpg": Image.fromarray(rgb).convert("L"),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = decode(tmp_path / name)
        assert out.shape == (3, 20, 30) and out.dtype == torch.uint8, name


def test_decode_applies_exif_orientation(tmp_path: Path):
    im = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert decode(tmp_path / "rot.jpg").shape == (3, 40, 20)


def test_decode_refuses_bombs(tmp_path: Path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
    (tmp_path / "bomb.png").write_bytes(png + chunk(b"IEND", b""))
    with pytest.raises(Exception, match="(?i)bomb|pixels"):
        decode(tmp_path / "bomb.png")


def test_resize_is_skipped_at_target_size(synthetic_data: Path):
    path = next((synthetic_data / "train").rglob("*.jpg"))
    img = decode(path)
    assert eval_transform(tuple(img.shape[-2:]))(img) is img
    assert eval_transform((16, 16))(img).shape == (3, 16, 16)


def test_decoded_cache_gives_the_same_batches(tmp_path: Path, birds_mini: Path):
    from birdcli.data.cache import DecodedCache

    items = samples(birds_mini, "valid", class_names(birds_mini))[:8]
    plain = BirdImages(items, eval_transform((64, 64)))
    cache = DecodedCache(tmp_path, [p for p, _ in items], (64, 64))
    cached = BirdImages(items, eval_transform((64, 64)), cache=cache)
    first = collate([cached[i] for i in range(8)])[0]  # fills the cache
    assert cache.filled == 8
    second = collate([cached[i] for i in range(8)])[0]  # served from it
    expected = collate([plain[i] for i in range(8)])[0]
    assert torch.equal(first, expected) and torch.equal(second, expected)
    again = DecodedCache(tmp_path, [p for p, _ in items], (64, 64))
    assert again.filled == 8 and again.pixels_path == cache.pixels_path
    assert DecodedCache(tmp_path, [p for p, _ in items[:4]], (64, 64)).filled == 0  # other files, other cache


def test_normalize_matches_the_formula():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x, mean, std), expected)
