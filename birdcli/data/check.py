"""`birds data check`: is this folder a usable dataset? Counts, gaps, unreadable files, odd images, birds.csv."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from birdcli.console import progress
from birdcli.data import layout


@dataclass
class CheckReport:
    root: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> species -> images
    missing: dict[str, list[str]] = field(default_factory=dict)  # split -> species in train but not there
    extra: dict[str, list[str]] = field(default_factory=dict)  # split -> species not in train
    unreadable: list[dict[str, str]] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    non_rgb: list[str] = field(default_factory=list)
    odd_sizes: list[str] = field(default_factory=list)
    csv: dict[str, object] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_species(self) -> int:
        return len(self.counts.get("train", {}))

    @property
    def ok(self) -> bool:
        return not self.errors


def check(root: Path, decode: bool = True) -> CheckReport:
    """Inspect every image (decoding it unless `decode` is off) and compare birds.csv with the files."""
    root = Path(root)
    report = CheckReport(root=str(root))
    if not root.is_dir():
        report.errors.append(f"{root} does not exist")
        return report
    if not (root / "train").is_dir():
        report.errors.append("no train/ folder")
    train_species = set(layout.species_dirs(root, "train"))
    files: list[tuple[Path, str, str]] = []
    for split in layout.SPLITS:
        if not (root / split).is_dir():
            report.warnings.append(f"no {split}/ folder")
            continue
        pairs = layout.split_files(root, split)
        counts = Counter(s for _, s in pairs)
        report.counts[split] = {s: counts.get(s, 0) for s in layout.species_dirs(root, split)}
        here = set(report.counts[split])
        report.missing[split] = sorted(s for s in train_species - here)
        report.extra[split] = sorted(here - train_species)
        empty = [s for s, n in report.counts[split].items() if n == 0]
        if empty:
            report.warnings.append(f"{split}: {len(empty)} species folders without images (e.g. {empty[0]})")
        if report.missing[split]:
            report.warnings.append(f"{split}: {len(report.missing[split])} species missing")
        if report.extra[split]:
            report.errors.append(f"{split}: {len(report.extra[split])} species that train/ does not have")
        files += [(p, s, split) for p, s in pairs]

    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    with progress() as bar:
        task = bar.add_task("checking images", total=len(files))
        for path, _, _ in files:
            rel = path.relative_to(root).as_posix()
            try:
                with Image.open(path) as im:
                    if decode:
                        im.load()
                    modes[im.mode] += 1
                    sizes[f"{im.width}x{im.height}"] += 1
                    if im.mode != "RGB":
                        report.non_rgb.append(rel)
                    if (im.width, im.height) != (224, 224):
                        report.odd_sizes.append(rel)
            except Exception as e:  # PIL raises many types for bad files
                report.unreadable.append({"file": rel, "reason": f"{type(e).__name__}: {e}"})
            bar.advance(task)
    report.modes, report.sizes = dict(modes), dict(sizes.most_common(10))
    if report.unreadable:
        report.errors.append(f"{len(report.unreadable)} unreadable images")
    _check_csv(root, files, report)
    return report


def _check_csv(root: Path, files: list[tuple[Path, str, str]], report: CheckReport) -> None:
    try:
        rows = layout.read_csv(root)
    except (ValueError, KeyError) as e:
        report.errors.append(f"birds.csv: {e}")
        return
    if rows is None:
        report.warnings.append("no birds.csv")
        return
    on_disk = {p.relative_to(root).as_posix(): (s, split) for p, s, split in files}
    in_csv = {r.filepath.replace("\\", "/"): r for r in rows}
    not_on_disk = sorted(set(in_csv) - set(on_disk))
    not_in_csv = sorted(set(on_disk) - set(in_csv))
    wrong = sorted(f for f, r in in_csv.items() if f in on_disk and (r.label, r.split) != on_disk[f])
    report.csv = {
        "rows": len(rows),
        "not_on_disk": not_on_disk[:20],
        "not_in_csv": not_in_csv[:20],
        "label_mismatch": wrong[:20],
        "num_not_on_disk": len(not_on_disk),
        "num_not_in_csv": len(not_in_csv),
        "num_label_mismatch": len(wrong),
    }
    if not_on_disk:
        report.errors.append(f"birds.csv lists {len(not_on_disk)} files that do not exist")
    if wrong:
        report.errors.append(f"birds.csv gives another species or split for {len(wrong)} files")
    if not_in_csv:
        report.warnings.append(f"{len(not_in_csv)} images are not listed in birds.csv")


def print_check(report: CheckReport) -> None:
    from rich.table import Table

    from birdcli.console import out

    table = Table(title=f"dataset {report.root}")
    for col in ("split", "species", "images", "min/species", "max/species", "missing species"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, counts in report.counts.items():
        n = list(counts.values()) or [0]
        table.add_row(split, str(len(counts)), str(sum(n)), str(min(n)), str(max(n)), str(len(report.missing[split])))
    out.print(table)
    out.print(f"species: [bold]{report.num_species}[/]   image modes: {report.modes}   sizes: {report.sizes}")
    if report.odd_sizes:
        out.print(f"{len(report.odd_sizes)} images are not 224x224 (e.g. {report.odd_sizes[0]})")
    if report.non_rgb:
        out.print(f"{len(report.non_rgb)} images are not RGB (e.g. {report.non_rgb[0]})")
    for bad in report.unreadable[:10]:
        out.print(f"[red]unreadable[/] {bad['file']}: {bad['reason']}")
    if report.csv:
        out.print(f"birds.csv: {report.csv['rows']} rows")
    for w in report.warnings:
        out.print(f"[yellow]warning:[/] {w}")
    for e in report.errors:
        out.print(f"[red]error:[/] {e}")
    out.print("[green]ok[/]" if report.ok else f"[red]{len(report.errors)} error(s)[/]")
