"""The `birds` command line. Thin on purpose: parse, load the config, import the stage lazily, call it.

Nothing heavy (torch, transformers, wandb, dvc) is imported at module level, so `birds --help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from birdcli import __version__
from birdcli.errors import BirdsError

CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    name="birds",
    help="Train, evaluate and ship a bird-species image classifier (Hugging Face transformers, ViT by default).",
    context_settings=CONTEXT,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Get and check datasets in the Kaggle BIRDS 525 SPECIES layout.", no_args_is_help=True)
config_app = typer.Typer(help="Show the resolved configuration and the shipped experiments.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

# Options shared by the commands that read the config.
Exp = Annotated[str | None, typer.Option("--exp", "-e", help="Experiment from configs/experiment/, e.g. smoke.")]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Config overrides as key=value, e.g. train.epochs=5 model=vit-tiny."),
]
ConfigDir = Annotated[
    Path | None,
    typer.Option("--config-dir", help="Folder with config.yaml (default: ./configs, then the shipped one)."),
]
Device = Annotated[str, typer.Option("--device", "-d", help="auto | cpu | cuda | cuda:N | mps (auto: cuda, mps, cpu).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; one log line per epoch.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"birds {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Train, evaluate and ship a bird-species image classifier.

    Start offline in two commands: [bold]birds train --exp smoke[/] (fetches a synthetic dataset itself), then
    [bold]birds evaluate[/]. Real data: [bold]birds data fetch --source kaggle[/].
    """


def _load(exp: str | None, overrides: list[str] | None, config_dir: Path | None):  # -> DictConfig
    from birdcli.config import load

    return load(exp, overrides or [], str(config_dir) if config_dir else None)


# ---------------------------------------------------------------- config


@config_app.command("show")
def config_show(exp: Exp = None, overrides: Overrides = None, config_dir: ConfigDir = None) -> None:
    """Print the resolved config as YAML.

    Example: [bold]birds config show --exp exp2 optimizer.lr=0.001[/]
    """
    from birdcli.config import to_yaml

    typer.echo(to_yaml(_load(exp, overrides, config_dir)), nl=False)


@config_app.command("list")
def config_list(config_dir: ConfigDir = None) -> None:
    """List the experiments, models and optimizers the config folder holds."""
    from birdcli.config import find_config_dir, list_names

    root = find_config_dir(str(config_dir) if config_dir else None)
    typer.echo(f"configs: {root}")
    for group in ("experiment", "model", "optimizer"):
        typer.echo(f"{group}: {', '.join(list_names(root, group))}")


# ---------------------------------------------------------------- data


@data_app.command("fetch")
def data_fetch(
    source: Annotated[
        str | None,
        typer.Option("--source", "-s", help="synthetic | dir | url | hf | kaggle | dvc (default: config)."),
    ] = None,
    root: Annotated[Path | None, typer.Option("--root", help="Where the dataset goes (default: data.root).")] = None,
    path: Annotated[str | None, typer.Option("--path", help="--source dir: the folder to copy from.")] = None,
    link: Annotated[bool, typer.Option("--link", help="--source dir: symlink instead of copying.")] = False,
    url: Annotated[str | None, typer.Option("--url", help="--source url: a .zip or .tar.gz to download.")] = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="--source url: expected checksum.")] = None,
    hf_repo: Annotated[str | None, typer.Option("--hf-repo", help="--source hf: dataset repository id.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even if the data is there.")] = False,
    dvc_add: Annotated[bool, typer.Option("--dvc-add", help="Track the result with `dvc add` afterwards.")] = False,
    exp: Exp = None,
    overrides: Overrides = None,
    config_dir: ConfigDir = None,
) -> None:
    """Get a dataset in the Kaggle BIRDS 525 layout into data/raw (or --root).

    Examples:
      [bold]birds data fetch --source synthetic[/]                      offline, seeded, learnable
      [bold]birds data fetch --source dir --path ../shared/data/birds-485[/]
      [bold]birds data fetch --source kaggle[/]                         needs ~/.kaggle/kaggle.json
      [bold]birds data fetch --source url --url https://host/birds.zip --sha256 HEX[/]
    """
    from omegaconf import OmegaConf

    from birdcli.data.fetch import dvc_add as track
    from birdcli.data.fetch import fetch

    cfg = _load(exp, overrides, config_dir)
    d = cfg.data
    src = source or d.source
    out = fetch(
        src,
        Path(root or d.root),
        path=path or d.path,
        link=link or d.link,
        url=url or d.url,
        sha256=sha256 or d.sha256,
        hf_repo=hf_repo or d.hf_repo,
        kaggle_dataset=d.kaggle_dataset,
        synthetic=OmegaConf.to_container(d.synthetic),  # type: ignore[arg-type]
        max_extract_bytes=int(d.max_extract_gb * 2**30),
        force=force,
    )
    if dvc_add:
        track(out)


@data_app.command("check")
def data_check(
    root: Annotated[Path | None, typer.Option("--root", help="Dataset folder (default: data.root).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    no_decode: Annotated[bool, typer.Option("--no-decode", help="Read headers only (faster).")] = False,
    exp: Exp = None,
    overrides: Overrides = None,
    config_dir: ConfigDir = None,
) -> None:
    """Check a dataset: counts per split and species, gaps, unreadable files, odd images, birds.csv.

    Exits 1 when it finds errors. Example: [bold]birds data check --json[/]
    """
    from dataclasses import asdict

    from birdcli.data.check import check, print_check

    cfg = _load(exp, overrides, config_dir)
    report = check(Path(root or cfg.data.root), decode=not no_decode)
    if as_json:
        typer.echo(json.dumps({**asdict(report), "num_species": report.num_species, "ok": report.ok}, indent=2))
    else:
        print_check(report)
    if not report.ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------- train


@app.command(context_settings={**CONTEXT, "allow_extra_args": False})
def train(
    exp: Exp = None,
    overrides: Overrides = None,
    device: Device = "auto",
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Continue a run: 'auto' (latest run of the experiment) or a run folder."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Run name (default: a timestamp).")] = None,
    quiet: Quiet = False,
    config_dir: ConfigDir = None,
) -> None:
    """Fine-tune or train a classifier; writes runs/<exp>/<run>/ with best/, last/, checkpoint/, history.csv.

    Examples:
      [bold]birds train --exp smoke[/]                                 offline, under a minute on 2 cores
      [bold]birds train --exp exp2 --device cuda[/]
      [bold]birds train --exp smoke --resume auto[/]                   continue the latest smoke run
      [bold]torchrun --nproc_per_node=4 -m birdcli train --exp exp2[/]
    """
    if quiet:
        os.environ["BIRDS_QUIET"] = "1"
    cfg = _load(exp, overrides, config_dir)
    from birdcli.train import train as run_train

    run_train(cfg, device=device, resume=resume, name=name)


# ---------------------------------------------------------------- evaluate and predict

ModelArg = Annotated[
    str | None,
    typer.Argument(help="A run folder or any HF image-classification folder (default: the latest run's best/)."),
]
Precision = Annotated[str, typer.Option("--precision", help="auto | fp32 | bf16 | fp16 (auto: bf16 where fast).")]


@app.command("evaluate")
def evaluate_cmd(
    model: ModelArg = None,
    split: Annotated[str, typer.Option("--split", "-s", help="test | valid | train.")] = "test",
    data_root: Annotated[
        Path | None, typer.Option("--data-root", help="Dataset folder (default: the run's data.root, else config).")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Report folder (default: <run>/eval/<split>/, else eval/).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON instead of tables.")] = False,
    device: Device = "auto",
    precision: Precision = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option("--workers", help="Decoding processes (-1: from the CPU cores).")] = -1,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log to the run's W&B run if it had one.")] = True,
    quiet: Quiet = False,
    config_dir: ConfigDir = None,
) -> None:
    """Top-1/top-5, macro P/R/F1, per-class accuracy, confusions, calibration; reports in <run>/eval/<split>/.

    Examples:
      [bold]birds evaluate[/]                                          latest run, test split
      [bold]birds evaluate runs/smoke/20250101-120000 --split valid --json[/]
      [bold]birds evaluate path/to/hf-model --data-root ../shared/data/birds-mini --out eval/mini[/]
    """
    if quiet:
        os.environ["BIRDS_QUIET"] = "1"
    cfg = _load(None, None, config_dir)
    from birdcli.evaluate import evaluate, print_summary

    result = evaluate(
        model, split, data_root, out_dir, device, precision, batch_size, workers,
        runs_dir=cfg.runs_dir, default_data_root=cfg.data.root, track=track,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps({**result.metrics, "most_confused": result.pairs, "out": str(result.out_dir)}, indent=2))
    else:
        print_summary(result)


@app.command("predict")
def predict_cmd(
    paths: Annotated[
        list[str], typer.Argument(metavar="PATH", help="Image files, folders (searched recursively) or globs.")
    ],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Run or model folder (default: the latest run's best/).")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Species per image.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines: one object per file, in input order.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV: file,rank,species,probability,error.")] = False,
    device: Device = "auto",
    precision: Precision = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 32,
    quiet: Quiet = False,
    config_dir: ConfigDir = None,
) -> None:
    """Top-k species for images; unreadable files are named with the reason and skipped.

    Exit code 0 when every file was predicted, 1 when some failed, 2 on usage errors.
    Examples:
      [bold]birds predict photo.jpg[/]
      [bold]birds predict photos/ 'more/**/*.png' --top-k 3 --json[/]
      [bold]birds predict photos/ --model runs/exp2/20250101-120000 --csv > predictions.csv[/]
    """
    from birdcli.errors import UsageError

    if as_json and as_csv:
        raise UsageError("--json and --csv exclude each other", "pick one")
    if quiet:
        os.environ["BIRDS_QUIET"] = "1"
    # The config only says where runs live: with --model given it is not needed, and a cold prediction is mostly
    # start-up time (about 0.15 s of the ONNX path's half second went to loading it).
    runs_dir = _load(None, None, config_dir).runs_dir if model is None else "runs"
    from birdcli.predict import predict

    fmt = "json" if as_json else "csv" if as_csv else "table"
    _, failed = predict(paths, model, runs_dir, top_k, fmt, batch_size, device, precision)
    if failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------- profile


@app.command("profile")
def profile_cmd(
    exp: Exp = None,
    overrides: Overrides = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps timed, then profiled.")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps first.")] = 3,
    device: Device = "auto",
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default: profiles/<exp>-<timestamp>/).")
    ] = None,
    inference: Annotated[
        bool, typer.Option("--inference/--no-inference", help="Also profile an eval-mode forward pass.")
    ] = True,
    open_viewer: Annotated[bool, typer.Option("--open", help="Open profile.prof in snakeviz afterwards.")] = False,
    config_dir: ConfigDir = None,
) -> None:
    """Profile real training steps: profile.prof (cProfile), trace.json (torch.profiler) and a summary.

    Splits step time into data wait, forward, backward and optimizer, and reports images/s and FLOP utilisation.
    Examples:
      [bold]birds profile --exp smoke[/]                               about a minute on 2 CPU cores
      [bold]birds profile --exp exp2 --device cuda --steps 20 train.batch_size=64[/]
    """
    if steps < 1 or warmup < 0:
        from birdcli.errors import UsageError

        raise UsageError("--steps must be at least 1 and --warmup at least 0")
    cfg = _load(exp, overrides, config_dir)
    from birdcli.profiling import open_snakeviz, print_summary, profile

    summary = profile(cfg, device=device, steps=steps, warmup=warmup, out_dir=out_dir, inference=inference)
    print_summary(summary)
    if open_viewer:
        open_snakeviz(Path(summary["profile"]))


# ---------------------------------------------------------------- export


@app.command("export")
def export_cmd(
    model: Annotated[
        str | None, typer.Argument(help="A run folder or HF model folder (default: the latest run's best/).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="Export format (onnx).")] = "onnx",
    quantize: Annotated[str, typer.Option("--quantize", "-q", help="none | int8 (dynamic quantization).")] = "none",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version.")] = 18,
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Export folder (default: <run>/onnx-fp32 or onnx-int8).")
    ] = None,
    check_images: Annotated[
        list[str] | None,
        typer.Option("--check-images", help="Images or folders to verify on (default: the run's validation split)."),
    ] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option("--min-agreement", help="Top-1 agreement with PyTorch required (default 1.0 fp32, 0.9 int8)."),
    ] = None,
    max_check_images: Annotated[
        int, typer.Option("--max-check-images", help="Verify on at most this many images, spread over the split.")
    ] = 256,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Time PyTorch vs ONNX Runtime.")] = True,
    config_dir: ConfigDir = None,
) -> None:
    """Export a model to ONNX (one file, dynamic batch) with labels and preprocessing; verify it against PyTorch.

    The folder is all a consumer needs: [bold]birds predict IMG --model FOLDER[/] then runs without torch.
    Fails (exit 1) when top-1 agreement with PyTorch on the check images is below --min-agreement.
    Examples:
      [bold]birds export[/]                                            latest run -> <run>/onnx-fp32/
      [bold]birds export runs/smoke/20250101-120000 --quantize int8[/]
      [bold]birds export path/to/hf-model --check-images photos/ --out exports/vit[/]
    """
    cfg = _load(None, None, config_dir)
    from birdcli.export import export

    export(
        model, fmt, quantize, opset, out_dir, check_images, min_agreement, max_check_images, bench,
        runs_dir=cfg.runs_dir,
    )  # fmt: skip


# ---------------------------------------------------------------- serve and drift


def _model_folder(model: str | None, runs_dir: str) -> str:
    """An ONNX export folder as given, else what `model.resolve` makes of a run/model folder (or the latest run)."""
    from birdcli.model import resolve

    if model is not None and (Path(model) / "model.onnx").is_file():
        return model
    return str(resolve(model, runs_dir))


@app.command("serve")
def serve_cmd(
    model: Annotated[
        str | None,
        typer.Argument(help="A run folder, HF model folder or ONNX export folder (default: the latest run's best/)."),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0 for every interface, e.g. in Docker).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Server processes, each loading the model once.")] = 1,
    device: Device = "auto",
    precision: Precision = "auto",
    backend: Annotated[
        str, typer.Option("--backend", help="auto | torch | onnx (auto: onnx for a folder holding model.onnx).")
    ] = "auto",
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Species per image unless a request asks (?top_k=).")] = 5,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body (413 above it).")] = 10.0,
    max_files: Annotated[int, typer.Option("--max-files", help="Most images in one /predict/batch request.")] = 32,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most images per forward pass across requests.")] = 16,
    threads: Annotated[
        int, typer.Option("--threads", help="Intra-op threads per worker for the model (0: one per core).")
    ] = 0,
    monitor: Annotated[
        Path | None, typer.Option("--monitor", help="Record a summary of each input here (for birds drift).")
    ] = None,
    monitor_max_mb: Annotated[float, typer.Option("--monitor-max-mb", help="Rotate the store at this size.")] = 50.0,
    monitor_backups: Annotated[int, typer.Option("--monitor-backups", help="Rotated store files kept.")] = 5,
    monitor_images: Annotated[
        bool, typer.Option("--monitor-images", help="Also keep the uploaded images (off: summaries only).")
    ] = False,
    embeddings: Annotated[
        bool, typer.Option("--embeddings/--no-embeddings", help="Record the model's embedding with --monitor.")
    ] = True,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="One log line per request.")] = True,
    config_dir: ConfigDir = None,
) -> None:
    """Serve a model over HTTP: POST /predict, /predict/batch; GET /health, /ready, /labels, /metrics, /docs.

    Needs the serve extra: pip install 'birdcli\\[serve]'. An ONNX export folder is served without torch.
    Examples:
      [bold]birds serve[/]                                             latest run, http://127.0.0.1:8000
      [bold]curl -F image=@bird.jpg http://127.0.0.1:8000/predict[/]
      [bold]birds serve runs/smoke/20250101-120000/onnx-fp32 --host 0.0.0.0 --workers 2 --monitor monitor/[/]
    """
    cfg = _load(None, None, config_dir)
    folder = _model_folder(model, cfg.runs_dir)
    try:
        from birdcli.serve import Settings, serve
    except ImportError as e:
        raise BirdsError(f"birds serve needs {e.name}", "pip install 'birdcli[serve]'") from e

    settings = Settings(
        model=folder, device=device, precision=precision, backend=backend, top_k=top_k, max_body_mb=max_body_mb,
        max_files=max_files, max_batch=max_batch, threads=threads, monitor=str(monitor) if monitor else None,
        monitor_max_mb=monitor_max_mb, monitor_backups=monitor_backups, monitor_images=monitor_images,
        embeddings=embeddings,
    )  # fmt: skip
    serve(settings, host, port, workers, access_log=access_log)


@app.command("drift")
def drift_cmd(
    current: Annotated[
        str, typer.Option("--current", "-c", help="A folder of images, or a store written by birds serve --monitor.")
    ],
    reference: Annotated[
        str | None,
        typer.Option("--reference", "-r", help="Folder or store to compare with (default: <data.root>/train)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model for predictions/embeddings of image folders (run, HF or ONNX)."),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where drift.json/.png/.html go.")] = Path("drift"),
    alpha: Annotated[float, typer.Option("--alpha", help="Chance of a false alarm over all checks.")] = 0.05,
    max_images: Annotated[
        int, typer.Option("--max-images", help="Images per side (folders: evenly spread; stores: the latest).")
    ] = 500,
    device: Device = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print drift.json instead of the table.")] = False,
    config_dir: ConfigDir = None,
) -> None:
    """Compare what the model sees now with a reference: image statistics, predicted species, embeddings.

    Exit code 1 when drift is found (like data check), 0 when not. Needs the serve extra (scipy).
    Examples:
      [bold]birds drift --reference data/raw/train --current monitor/ --model runs/smoke/20250101-120000[/]
      [bold]birds drift --reference data/raw/train --current photos/from/the/field/ --json[/]
    """
    cfg = _load(None, None, config_dir)
    try:
        import scipy  # noqa: F401
    except ImportError as e:
        raise BirdsError("birds drift needs scipy", "pip install 'birdcli[serve]'") from e
    from birdcli.drift import drift, print_report

    ref = reference or str(Path(cfg.data.root) / "train")
    folder = _model_folder(model, cfg.runs_dir) if model else None
    report = drift(ref, current, folder, out_dir, alpha, max_images, device, cfg.runs_dir)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report)
    if report["drifted"]:
        raise typer.Exit(1)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and an exit code."""
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            sys.exit(code)  # without standalone mode, click returns typer.Exit(n)'s code instead of exiting
    except BirdsError as e:
        _fail(str(e), e.exit_code, e)
    except KeyboardInterrupt:
        _fail("interrupted", 130, None)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and anything unexpected
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        try:  # recent typer vendors click: its usage errors are not click's own classes
            from typer._click.exceptions import ClickException as TyperClickException
        except ImportError:
            TyperClickException = click.ClickException
        if isinstance(e, (click.ClickException, TyperClickException)):
            if os.environ.get("BIRDS_DEBUG") == "1":
                raise
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":  # click's or typer's vendored copy (Ctrl-C at a prompt)
            _fail("aborted", 1, None)
        _fail(
            f"unexpected error: {type(e).__name__}: {e}",
            1,
            e,
            hint="rerun with BIRDS_DEBUG=1 for the traceback",
        )


def _fail(message: str, code: int, exc: BaseException | None, hint: str | None = None) -> None:
    if exc is not None and os.environ.get("BIRDS_DEBUG") == "1":
        raise exc
    from rich.console import Console
    from rich.markup import escape

    lines = message.strip().splitlines() or ["failed"]
    # An error raised in a DataLoader worker arrives wrapped with the worker's traceback: its last line is the error.
    line = lines[-1].split(": ", 1)[-1] if "Original Traceback" in message else lines[0]
    Console(stderr=True, highlight=False, soft_wrap=True).print(  # escaped: "pip install 'birdcli[serve]'" stays whole
        f"[bold red]error:[/] {escape(line)}" + (f" ({escape(hint)})" if hint else "")
    )
    sys.exit(code)
