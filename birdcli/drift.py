"""`birds drift`: has what the model sees moved away from what it was trained on?

Each side (`--reference`, `--current`) is a folder of images or a `birds serve --monitor` store. Three kinds of
check, each with a p-value, Bonferroni-corrected over all checks run:
- image statistics (`birdcli.monitoring.FEATURES`: size, brightness, contrast, saturation, channel means,
  sharpness): two-sample Kolmogorov-Smirnov per feature (`scipy.stats.ks_2samp`);
- predicted species: Jensen-Shannon distance between the two class histograms, permutation p-value (exact enough
  for hundreds of classes and few images, where a chi-square approximation is not);
- the model's embedding (pooled features from torch, class probabilities from ONNX): squared MMD with an RBF kernel
  (median-distance bandwidth), permutation p-value.
Folders need `--model` for the last two. Writes drift.json, drift.png and drift.html.

Why scipy and not Evidently or alibi-detect: scipy is one wheel already in the serve extra, while Evidently brings
~34 packages (pandas, pyarrow, plotly, litestar, nltk, statsmodels, ...) and alibi-detect ~24 (numba, opencv,
scikit-image, its own transformers pin) for the same tests: KS, and MMD with a permutation test, are a few lines.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from birdcli import __version__, images, monitoring
from birdcli.console import err, info, out, progress, warn
from birdcli.errors import BirdsError, UsageError

PERMUTATIONS = 1000
MAX_EMBEDDINGS = 400  # per side, for the MMD test: its cost grows with the square of the count


@dataclass
class Sample:
    """One side of the comparison: feature columns, predicted species and embeddings (where known)."""

    source: str
    kind: str  # folder | store
    stats: dict[str, np.ndarray]
    classes: list[str] | None = None
    embeddings: np.ndarray | None = None
    embedding_kind: str | None = None
    skipped: int = 0
    models: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return max((len(v) for v in self.stats.values()), default=0)


@dataclass
class Check:
    name: str
    group: str  # image | prediction | embedding
    test: str
    statistic: float
    p_value: float
    drift: bool = False
    reference: str = ""  # a short summary of each side, for the table
    current: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- reading a side


def load_sample(path: str, predictor: Any | None, max_images: int, label: str) -> Sample:
    """A store's records, or a folder's images summarised (and predicted, when there is a predictor)."""
    if not Path(path).exists():
        raise BirdsError(f"{label} {path} does not exist", "pass a folder of images or a `birds serve --monitor` store")
    if monitoring.is_store(path):
        return _from_store(path, max_images)
    if not Path(path).is_dir():
        raise UsageError(f"{label} {path} is neither a folder of images nor a store (*.jsonl)")
    return _from_folder(path, predictor, max_images, label)


def _from_store(path: str, max_images: int) -> Sample:
    records, bad = monitoring.read_store(path)
    if bad:
        warn(f"{path}: {bad} unreadable line(s) skipped")
    good = [r for r in records if "error" not in r and all(f in r for f in monitoring.FEATURES)]
    good = good[-max_images:] if max_images else good  # the most recent ones
    if not good:
        raise BirdsError(f"{path} holds no image summaries", "serve with --monitor DIR and send some images first")
    stats = {f: np.array([float(r[f]) for r in good]) for f in monitoring.FEATURES}
    classes = [r["top1"] for r in good] if all("top1" in r for r in good) else None
    kinds = {r.get("embedding_kind") for r in good}
    embeddings, kind = None, None
    if len(kinds) == 1 and None not in kinds:
        vectors = [monitoring.decode_vector(r["embedding"]) for r in good]
        if len({v.shape for v in vectors}) == 1:
            embeddings, kind = np.stack(vectors), kinds.pop()
    models = sorted({f"{r.get('model')}@{r.get('version')}" for r in good})
    return Sample(path, "store", stats, classes, embeddings, kind, len(records) - len(good), models)


def _from_folder(path: str, predictor: Any | None, max_images: int, label: str) -> Sample:
    from concurrent.futures import ThreadPoolExecutor

    from birdcli.predict import batched, collect

    files, _ = collect([path])
    if not files:
        raise BirdsError(f"{label} {path} has no images")
    if max_images and len(files) > max_images:  # evenly spread, so every species of a class-sorted folder is in
        files = [files[i] for i in np.linspace(0, len(files) - 1, max_images).round().astype(int)]
    rows: list[dict[str, Any]] = []
    classes: list[str] = []
    vectors: list[np.ndarray] = []
    embedder = monitoring.Embedder(predictor) if predictor is not None else None
    skipped = 0
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool, progress(transient=True) as bar:
        task = bar.add_task(f"{label} images", total=len(files))
        for chunk in batched(files, 32):
            summaries = list(pool.map(_try_summarize, chunk))
            ok = [f for f, s in zip(chunk, summaries, strict=True) if s is not None]
            skipped += len(chunk) - len(ok)
            if predictor is not None and ok:
                outcomes = predictor.predict(ok)
                emb = embedder.rows(outcomes) if embedder else [None] * len(ok)
                by_file = {o.file: (o, e) for o, e in zip(outcomes, emb, strict=True)}
            for f, s in zip(chunk, summaries, strict=True):
                if s is None:
                    continue
                if predictor is not None:
                    o, e = by_file[f]
                    if o.probs is None:
                        skipped += 1
                        continue
                    classes.append(predictor.labels[int(np.argmax(o.probs))])
                    if e is not None:
                        vectors.append(e)
                rows.append(s)
            bar.advance(task, len(chunk))
    if skipped:
        warn(f"{label} {path}: {skipped} unreadable image(s) skipped")
    if not rows:
        raise BirdsError(f"{label} {path}: no readable images")
    stats = {f: np.array([float(r[f]) for r in rows]) for f in monitoring.FEATURES}
    embeddings = np.stack(vectors) if predictor is not None and len(vectors) == len(rows) else None
    kind = embedder.kind if embedder and embeddings is not None else None
    return Sample(path, "folder", stats, classes if predictor is not None else None, embeddings, kind, skipped)


def _try_summarize(path: str) -> dict[str, Any] | None:
    try:
        return monitoring.summarize(path)
    except images.ImageError as e:
        err.print(f"[yellow]skipped:[/] {path}: {e}", highlight=False, soft_wrap=True)
        return None


# ---------------------------------------------------------------- the tests


def ks_checks(ref: Sample, cur: Sample) -> list[Check]:
    from scipy.stats import ks_2samp

    checks = []
    for f in monitoring.FEATURES:
        a, b = ref.stats[f], cur.stats[f]
        r = ks_2samp(a, b)
        checks.append(
            Check(
                f,
                "image",
                "KS",
                float(r.statistic),
                float(r.pvalue),
                reference=_describe(a),
                current=_describe(b),
                details={"reference": _quantiles(a), "current": _quantiles(b)},
            )  # fmt: skip
        )
    return checks


def _quantiles(x: np.ndarray) -> dict[str, float]:
    q = np.percentile(x, [5, 50, 95])
    return {"mean": float(x.mean()), "p5": float(q[0]), "median": float(q[1]), "p95": float(q[2])}


def _describe(x: np.ndarray) -> str:
    return f"{np.median(x):.3g}"  # the median; drift.json and the plot have the rest


def class_check(ref: list[str], cur: list[str], seed: int = 0) -> Check:
    """Jensen-Shannon distance of the predicted-species histograms; p-value from shuffling the side labels."""
    names = sorted(set(ref) | set(cur))
    index = {n: i for i, n in enumerate(names)}
    codes = np.array([index[c] for c in [*ref, *cur]])
    n_ref = len(ref)

    def jsd(a: np.ndarray, b: np.ndarray) -> float:
        p = np.bincount(a, minlength=len(names)) / len(a)
        q = np.bincount(b, minlength=len(names)) / len(b)
        m = (p + q) / 2

        def kl(x: np.ndarray) -> float:
            nz = x > 0
            return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

        return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))

    observed = jsd(codes[:n_ref], codes[n_ref:])
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(PERMUTATIONS):
        perm = rng.permutation(codes)
        hits += jsd(perm[:n_ref], perm[n_ref:]) >= observed - 1e-12
    p_ref, p_cur = Counter(ref), Counter(cur)
    shares = {n: (p_ref[n] / len(ref), p_cur[n] / len(cur)) for n in names}
    moved = sorted(shares.items(), key=lambda kv: -abs(kv[1][1] - kv[1][0]))[:10]
    changes = [{"species": n, "reference": round(a, 4), "current": round(b, 4)} for n, (a, b) in moved]
    return Check(
        "predicted species", "prediction", "JS perm.", observed, (hits + 1) / (PERMUTATIONS + 1),
        reference=_top(p_ref, len(ref)), current=_top(p_cur, len(cur)),
        details={"classes_seen": len(names), "largest_changes": changes},
    )  # fmt: skip


def _top(counts: Counter, total: int) -> str:
    return f"{len(counts)} species, top {counts.most_common(1)[0][1] / total:.0%}"


def mmd_check(ref: np.ndarray, cur: np.ndarray, kind: str, seed: int = 0) -> Check:
    """Squared maximum mean discrepancy (RBF kernel, median heuristic) with a permutation p-value."""
    rng = np.random.default_rng(seed)
    if len(ref) > MAX_EMBEDDINGS:
        ref = ref[rng.choice(len(ref), MAX_EMBEDDINGS, replace=False)]
    if len(cur) > MAX_EMBEDDINGS:
        cur = cur[rng.choice(len(cur), MAX_EMBEDDINGS, replace=False)]
    x = np.concatenate([ref, cur]).astype(np.float64)
    sq = np.sum(x * x, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)  # (N, N) squared distances
    upper = d2[np.triu_indices(len(x), 1)]
    bandwidth = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    k = np.exp(-d2 / bandwidth)
    n = len(ref)

    def mmd2(idx: np.ndarray) -> float:
        a, b = idx[:n], idx[n:]
        return float(k[np.ix_(a, a)].mean() + k[np.ix_(b, b)].mean() - 2 * k[np.ix_(a, b)].mean())

    order = np.arange(len(x))
    observed = mmd2(order)
    perms = PERMUTATIONS // 2
    hits = sum(mmd2(rng.permutation(order)) >= observed - 1e-12 for _ in range(perms))
    shift = float(np.linalg.norm(cur.mean(axis=0) - ref.mean(axis=0)))
    return Check(
        f"embedding ({kind})", "embedding", "MMD² perm.", observed, (hits + 1) / (perms + 1),
        reference=f"{len(ref)}x{ref.shape[1]}", current=f"{len(cur)}x{cur.shape[1]}",
        details={"mean_shift_l2": shift, "bandwidth": bandwidth, "dims": int(ref.shape[1])},
    )  # fmt: skip


# ---------------------------------------------------------------- the stage


def drift(
    reference: str,
    current: str,
    model: str | None = None,
    out_dir: str | os.PathLike[str] = "drift",
    alpha: float = 0.05,
    max_images: int = 500,
    device: str = "auto",
    runs_dir: str = "runs",
) -> dict[str, Any]:
    """Compare the two sides, print the verdict table, write the report; returns what drift.json holds."""
    if not 0 < alpha < 1:
        raise UsageError(f"--alpha {alpha}: must be between 0 and 1")
    predictor = None
    needs_model = not (monitoring.is_store(reference) and monitoring.is_store(current))
    if model is not None and needs_model:
        from birdcli.model import resolve
        from birdcli.predict import load_predictor

        predictor = load_predictor(resolve(model, runs_dir), device)
    ref = load_sample(reference, predictor, max_images, "reference")
    cur = load_sample(current, predictor, max_images, "current")
    info(f"reference: {ref.n} images ({ref.kind}) | current: {cur.n} images ({cur.kind})")

    checks = ks_checks(ref, cur)
    skipped: list[dict[str, str]] = []
    if ref.classes and cur.classes:
        checks.append(class_check(ref.classes, cur.classes))
    else:
        skipped.append({"check": "predicted species", "reason": _why_not(ref, cur, "predictions")})
    if ref.embeddings is not None and cur.embeddings is not None and ref.embedding_kind == cur.embedding_kind:
        if ref.embeddings.shape[1] == cur.embeddings.shape[1]:
            checks.append(mmd_check(ref.embeddings, cur.embeddings, ref.embedding_kind or "?"))
        else:
            skipped.append({"check": "embedding", "reason": "the two sides come from models of different widths"})
    else:
        reason = _why_not(ref, cur, "embeddings")
        if ref.embedding_kind and cur.embedding_kind and ref.embedding_kind != cur.embedding_kind:
            reason = f"embeddings differ in kind ({ref.embedding_kind} vs {cur.embedding_kind}): use the same backend"
        skipped.append({"check": "embedding", "reason": reason})

    per_test = alpha / len(checks)  # Bonferroni: the chance of any false alarm stays at most alpha
    for c in checks:
        c.drift = c.p_value < per_test
    drifted = [c.name for c in checks if c.drift]
    report = {
        "verdict": "drift" if drifted else "no drift",
        "drifted": drifted,
        "alpha": alpha,
        "alpha_per_check": per_test,
        "reference": _side(ref),
        "current": _side(cur),
        "model": model,
        "checks": [asdict(c) for c in checks],
        "skipped": skipped,
        "created": monitoring.now(),
        "birdcli": __version__,
    }
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "drift.json").write_text(json.dumps(report, indent=2) + "\n")
    png = _plot(ref, cur, checks, out_path / "drift.png")
    (out_path / "drift.html").write_text(_html(report, png))
    report["out"] = str(out_path)
    return report


def _why_not(ref: Sample, cur: Sample, what: str) -> str:
    missing = [s for s in (ref, cur) if (s.classes if what == "predictions" else s.embeddings) is None]
    if any(s.kind == "folder" for s in missing):
        return f"no {what} for a folder without --model"
    return f"the store has no {what} (serve with --monitor{' and --embeddings' if what == 'embeddings' else ''})"


def _side(s: Sample) -> dict[str, Any]:
    return {"source": s.source, "kind": s.kind, "images": s.n, "skipped": s.skipped, "models": s.models}


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    for col, justify in [("check", "left"), ("test", "left"), ("statistic", "right"), ("p-value", "right")]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    table.add_column("reference", overflow="fold")
    table.add_column("current", overflow="fold")
    table.add_column("verdict")
    for c in report["checks"]:
        verdict = "[bold red]drift[/]" if c["drift"] else "[green]ok[/]"
        table.add_row(
            c["name"], c["test"], f"{c['statistic']:.4g}", f"{c['p_value']:.2g}", c["reference"], c["current"], verdict
        )
    out.print(table)
    for s in report["skipped"]:
        out.print(f"[dim]skipped {s['check']}: {s['reason']}[/]", highlight=False)
    colour = "red" if report["drifted"] else "green"
    why = f": {', '.join(report['drifted'])}" if report["drifted"] else ""
    out.print(
        f"[bold {colour}]{report['verdict']}[/]{why} (alpha {report['alpha']}, {report['alpha_per_check']:.2g} per "
        f"check) | report {report['out']}/drift.html, drift.json",
        highlight=False,
    )


# ---------------------------------------------------------------- the report files


def _plot(ref: Sample, cur: Sample, checks: Sequence[Check], path: Path) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {c.name: c for c in checks}
    panels = len(monitoring.FEATURES) + (1 if ref.classes and cur.classes else 0)
    cols = 4
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, f in zip(axes.flat, monitoring.FEATURES, strict=False):
        a, b = ref.stats[f], cur.stats[f]
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
        ax.hist(a, bins=bins, alpha=0.55, density=True, label="reference", color="tab:blue")
        ax.hist(b, bins=bins, alpha=0.55, density=True, label="current", color="tab:orange")
        c = by_name[f]
        ax.set_title(f"{f}: {'DRIFT' if c.drift else 'ok'} (p={c.p_value:.2g})", color="red" if c.drift else "black")
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    if ref.classes and cur.classes:
        ax = axes.flat[len(monitoring.FEATURES)]
        c = by_name["predicted species"]
        top = c.details["largest_changes"][:8]
        y = np.arange(len(top))
        ax.barh(y - 0.2, [t["reference"] for t in top], 0.4, label="reference", color="tab:blue")
        ax.barh(y + 0.2, [t["current"] for t in top], 0.4, label="current", color="tab:orange")
        ax.set_yticks(y, [t["species"][:22] for t in top], fontsize=6)
        ax.invert_yaxis()
        ax.set_title(f"species share: {'DRIFT' if c.drift else 'ok'}", color="red" if c.drift else "black")
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _html(report: dict[str, Any], png: bytes) -> str:
    e = html.escape
    rows = "".join(
        f"<tr class='{'drift' if c['drift'] else 'ok'}'><td>{e(c['name'])}</td><td>{e(c['test'])}</td>"
        f"<td>{c['statistic']:.4g}</td><td>{c['p_value']:.2g}</td><td>{e(c['reference'])}</td>"
        f"<td>{e(c['current'])}</td><td>{'drift' if c['drift'] else 'ok'}</td></tr>"
        for c in report["checks"]
    )
    skipped = "".join(f"<li>{e(s['check'])}: {e(s['reason'])}</li>" for s in report["skipped"])
    ref, cur = report["reference"], report["current"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>birds drift: {e(report["verdict"])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px}} tr.drift td{{background:#fdd}}
h1 .drift{{color:#b00}} h1 .ok{{color:#070}}</style></head><body>
<h1>birds drift: <span class="{"drift" if report["drifted"] else "ok"}">{e(report["verdict"])}</span></h1>
<p>reference: {e(ref["source"])} ({ref["kind"]}, {ref["images"]} images) &middot;
current: {e(cur["source"])} ({cur["kind"]}, {cur["images"]} images) &middot;
alpha {report["alpha"]} ({report["alpha_per_check"]:.2g} per check, Bonferroni) &middot; {e(report["created"])}</p>
<table><tr><th>check</th><th>test</th><th>statistic</th><th>p-value</th><th>reference</th><th>current</th>
<th>verdict</th></tr>{rows}</table>
{f"<p>Skipped:</p><ul>{skipped}</ul>" if skipped else ""}
<p><img alt="distributions" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>
</body></html>
"""
