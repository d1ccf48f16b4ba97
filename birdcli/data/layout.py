"""The Kaggle BIRDS 525 SPECIES layout: `train/ valid/ test/` of `SPECIES/*.jpg`, plus `birds.csv`.

Pure filesystem code (no torch), shared by fetch, check and the Dataset.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "valid", "test")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CSV_COLUMNS = ["class id", "filepaths", "labels", "data set", "scientific name"]


@dataclass(frozen=True)
class CsvRow:
    class_id: float
    filepath: str
    label: str
    split: str
    scientific_name: str


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and path.is_file()


def species_dirs(root: Path, split: str) -> list[str]:
    """Species folder names of a split, sorted: the class index is their position in train/."""
    d = root / split
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_files(root: Path, split: str) -> list[tuple[Path, str]]:
    """(image path, species) pairs of one split in a stable order."""
    out = []
    for species in species_dirs(root, split):
        for p in sorted((root / split / species).iterdir()):
            if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
                out.append((p, species))
    return out


def looks_complete(root: Path) -> bool:
    """A dataset is there if train/ has species folders with images and valid/ or test/ exists."""
    if not (root / "train").is_dir():
        return False
    if not any((root / s).is_dir() for s in ("valid", "test")):
        return False
    for species in species_dirs(root, "train"):
        if any(p.suffix.lower() in IMAGE_EXTS for p in (root / "train" / species).iterdir()):
            return True
    return False


def find_layout_root(top: Path, max_depth: int = 3) -> Path | None:
    """Archives often wrap the dataset in a folder or two: find where train/ lives."""
    frontier = [top]
    for _ in range(max_depth + 1):
        nxt = []
        for d in frontier:
            if looks_complete(d):
                return d
            nxt += sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink())
        frontier = nxt
    return None


def read_csv(root: Path) -> list[CsvRow] | None:
    path = root / "birds.csv"
    if not path.is_file():
        return None
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"birds.csv lacks columns: {', '.join(missing)}")
        for r in reader:
            rows.append(
                CsvRow(
                    class_id=float(r["class id"]),
                    filepath=r["filepaths"],
                    label=r["labels"],
                    split=r["data set"],
                    scientific_name=r["scientific name"],
                )
            )
    return rows


def write_csv(root: Path, rows: list[CsvRow]) -> None:
    with (root / "birds.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([f"{r.class_id:.1f}", r.filepath, r.label, r.split, r.scientific_name])


def fingerprint(root: Path) -> str:
    """Cheap, stable identity of a dataset: relative paths and sizes of every image (not contents)."""
    h = hashlib.sha256()
    for split in SPLITS:
        for path, _ in split_files(root, split):
            h.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]
