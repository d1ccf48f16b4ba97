"""birds drift: shifted images (darkened, grayscale, other species) are flagged; a held-back sample of the reference
is not; a store written by the server compares like a folder; the report files and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_birds

pytest.importorskip("scipy")
from birdcli import monitoring  # noqa: E402
from birdcli.drift import class_check, drift, mmd_check  # noqa: E402


def held_back(synthetic_data: Path) -> list[Path]:
    """Images the reference (train) never saw, from the same generator: valid and test."""
    return sorted((synthetic_data / "valid").rglob("*.jpg")) + sorted((synthetic_data / "test").rglob("*.jpg"))


def write_set(folder: Path, files: list[Path], change=None) -> Path:
    for i, f in enumerate(files):
        sub = folder / f.parent.name
        sub.mkdir(parents=True, exist_ok=True)
        if change is None:
            shutil.copy(f, sub / f"{i:03d}.jpg")  # the very bytes the generator wrote
        else:
            change(Image.open(f).convert("RGB")).save(sub / f"{i:03d}.jpg", quality=92)  # the generator's quality
    return folder


def darken(im: Image.Image) -> Image.Image:
    return Image.fromarray((np.asarray(im, dtype=np.float32) * 0.35).astype(np.uint8))


def grayscale(im: Image.Image) -> Image.Image:
    return im.convert("L").convert("RGB")


@pytest.fixture(scope="module")
def sets(synthetic_data, tmp_path_factory) -> dict[str, Path]:
    from birdcli.data.fetch import fetch

    root = tmp_path_factory.mktemp("drift-sets")
    held = held_back(synthetic_data)
    # six species the model never saw (the same generator: new colours and shapes on the same backgrounds)
    synth = {"num_classes": 12, "train_per_class": 16, "valid_per_class": 1, "test_per_class": 1, "image_size": 32}
    more = fetch("synthetic", root / "more", synthetic={**synth, "seed": 7})
    known = {p.name for p in (synthetic_data / "train").iterdir()}
    others = sorted(f for d in (more / "train").iterdir() if d.name not in known for f in d.glob("*.jpg"))
    assert len({f.parent.name for f in others}) == 6
    return {
        "held": write_set(root / "held", held),
        "dark": write_set(root / "dark", held, darken),
        "gray": write_set(root / "gray", held, grayscale),
        "others": write_set(root / "others", others),
    }


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_held_back_sample_is_not_drift(synthetic_data, smoke_run, sets, tmp_path):
    report = drift(str(synthetic_data / "train"), str(sets["held"]), str(smoke_run), tmp_path, device="cpu")
    assert report["verdict"] == "no drift", [(c["name"], c["p_value"]) for c in report["checks"]]
    checks = by_name(report)
    assert set(monitoring.FEATURES) | {"predicted species", "embedding (pooled)"} == set(checks)
    assert report["reference"]["images"] == 96 and report["current"]["images"] == 48
    saved = json.loads((tmp_path / "drift.json").read_text())
    assert saved["verdict"] == "no drift" and len(saved["checks"]) == 12
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no drift" in (tmp_path / "drift.html").read_text()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("dark", {"brightness"}), ("gray", {"saturation"}), ("others", set())],
)
def test_shifted_set_is_flagged(synthetic_data, smoke_run, sets, tmp_path, name, expected):
    report = drift(str(synthetic_data / "train"), str(sets[name]), str(smoke_run), tmp_path, device="cpu")
    flagged = set(report["drifted"])
    print(f"\n{name}: flagged {sorted(flagged)}")
    assert report["verdict"] == "drift"
    assert expected <= flagged, [(c["name"], c["p_value"]) for c in report["checks"]]
    assert '<span class="drift">drift</span>' in (tmp_path / "drift.html").read_text()


def test_store_from_the_server_compares_like_a_folder(synthetic_data, smoke_run, sets, tmp_path):
    """Images sent to `birds serve --monitor` are judged on the summaries it stored (stats, classes, embeddings)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from birdcli.serve import Settings, create_app

    for name in ("held", "dark"):
        store = tmp_path / f"store-{name}"
        app = create_app(Settings(model=str(smoke_run / "best"), background_load=False, monitor=str(store)))
        with TestClient(app) as c:
            files = sorted(sets[name].rglob("*.jpg"))
            for i in range(0, len(files), 8):
                chunk = [("images", (f.name, f.read_bytes(), "image/jpeg")) for f in files[i : i + 8]]
                assert c.post("/predict/batch", files=chunk).status_code == 200
        report = drift(str(synthetic_data / "train"), str(store), str(smoke_run), tmp_path / name, device="cpu")
        checks = by_name(report)
        assert report["current"]["kind"] == "store" and report["current"]["images"] == 48
        assert "embedding (pooled)" in checks and "predicted species" in checks  # all three kinds of check ran
        assert report["verdict"] == ("no drift" if name == "held" else "drift"), report["drifted"]


def test_store_vs_store_needs_no_model(tmp_path):
    rng = np.random.default_rng(0)

    def fill(folder: Path, brightness: float) -> None:
        store = monitoring.Store(folder)
        for _ in range(80):
            rec = {f: float(rng.normal(0.5, 0.05)) for f in monitoring.FEATURES}
            rec.update(brightness=float(rng.normal(brightness, 0.05)), ts=monitoring.now(), top1="A")
            store.append(rec)
        store.close()

    fill(tmp_path / "a", 0.5)
    fill(tmp_path / "b", 0.3)
    report = drift(str(tmp_path / "a"), str(tmp_path / "b"), None, tmp_path / "out")
    assert report["drifted"] == ["brightness"]
    assert [s["check"] for s in report["skipped"]] == ["embedding"]


def test_folders_without_a_model_compare_statistics_only(synthetic_data, sets, tmp_path):
    report = drift(str(synthetic_data / "train"), str(sets["gray"]), None, tmp_path)
    assert "saturation" in report["drifted"] and len(report["checks"]) == len(monitoring.FEATURES)
    assert {s["check"] for s in report["skipped"]} == {"predicted species", "embedding"}
    assert all("--model" in s["reason"] for s in report["skipped"])


def test_tests_on_known_distributions():
    rng = np.random.default_rng(1)
    same = mmd_check(rng.normal(size=(100, 8)), rng.normal(size=(100, 8)), "x")
    moved = mmd_check(rng.normal(size=(100, 8)), rng.normal(0.6, 1, size=(100, 8)), "x")
    assert same.p_value > 0.05 and moved.p_value < 0.01
    a = list(rng.choice(["a", "b", "c"], 200))
    assert class_check(a, list(rng.choice(["a", "b", "c"], 100))).p_value > 0.05
    assert class_check(a, list(rng.choice(["a", "b", "c"], 100, p=[0.7, 0.2, 0.1]))).p_value < 0.01


def test_cli_exit_codes_and_table(synthetic_data, smoke_run, sets, tmp_path):
    ok = run_birds(
        "drift", "--reference", str(synthetic_data / "train"), "--current", str(sets["held"]),
        "--model", str(smoke_run), "--device", "cpu", "--out", str(tmp_path / "ok"), cwd=tmp_path,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "no drift" in ok.stdout and "brightness" in ok.stdout and "predicted" in ok.stdout
    bad = run_birds("drift", "-r", str(synthetic_data / "train"), "-c", str(sets["dark"]), "--json", cwd=tmp_path)
    assert bad.returncode == 1, bad.stderr
    assert "brightness" in json.loads(bad.stdout)["drifted"]
    assert (tmp_path / "drift" / "drift.json").is_file()  # the default --out
    missing = run_birds("drift", "-c", str(tmp_path / "nowhere"), "-r", str(sets["held"]), cwd=tmp_path)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr


def test_unreadable_images_are_skipped(synthetic_data, sets, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(sets["held"], folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    report = drift(str(synthetic_data / "train"), str(folder), None, tmp_path / "out")
    assert report["current"]["images"] == 48 and report["current"]["skipped"] == 1


def test_real_photos_held_back_passes_and_darkened_is_flagged(birds_mini, tmp_path):
    """Real bird photos (birds-mini: 20 species): the valid and test splits against train, image statistics only."""
    held = held_back(birds_mini)
    ok = drift(str(birds_mini / "train"), str(write_set(tmp_path / "held", held)), None, tmp_path / "ok")
    assert ok["verdict"] == "no drift", [(c["name"], c["p_value"]) for c in ok["checks"]]
    dark = drift(str(birds_mini / "train"), str(write_set(tmp_path / "dark", held, darken)), None, tmp_path / "dark")
    assert {"brightness", "red", "green", "blue"} <= set(dark["drifted"])
