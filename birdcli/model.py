"""Build a model for training, load a saved one for later stages, and the preprocessing that travels with it.

A model artifact is a plain Hugging Face folder (config.json with id2label, model.safetensors,
preprocessor_config.json): whatever evaluate, predict, export or serve need is inside it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from birdcli.errors import BirdsError

OFFLINE_HINT = (
    "no network here? point model.name_or_path at a local model folder, or train from scratch with model=vit-tiny"
)


@dataclass(frozen=True)
class Preprocess:
    """What an image must become before the model sees it (derived from the image processor)."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)


def preprocess_of(processor: Any) -> Preprocess:
    size = dict(getattr(processor, "crop_size", None) or {}) or dict(processor.size)
    if "height" in size:
        h, w = int(size["height"]), int(size["width"])
    elif "shortest_edge" in size:
        h = w = int(size["shortest_edge"])
    else:
        raise BirdsError(f"cannot read the input size from the image processor: {size}")
    mean = tuple(float(x) for x in (processor.image_mean or (0.5, 0.5, 0.5)))
    std = tuple(float(x) for x in (processor.image_std or (0.5, 0.5, 0.5)))
    return Preprocess(h, w, mean, std)  # type: ignore[arg-type]


def build(
    name_or_path: str,
    labels: Sequence[str],
    pretrained: bool,
    architecture: dict[str, Any] | None = None,
    attn_implementation: str = "eager",
    image_size: int | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> tuple[Any, Any]:
    """(model, image processor) for `labels`: pretrained weights with a new head, or a fresh model from config."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageClassification,
        ViTImageProcessor,
    )

    _quiet_transformers()
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    if pretrained:
        try:
            model = AutoModelForImageClassification.from_pretrained(
                name_or_path,
                num_labels=len(labels),
                id2label=id2label,
                label2id=label2id,
                ignore_mismatched_sizes=True,
                attn_implementation=attn_implementation,
            )
            processor = AutoImageProcessor.from_pretrained(name_or_path)
        except OSError as e:
            raise BirdsError(f"cannot load pretrained model '{name_or_path}': {_first_line(e)}", OFFLINE_HINT) from e
    else:
        arch = dict(architecture or {})
        model_type = arch.pop("model_type", "vit")
        if image_size:
            arch["image_size"] = image_size
        config = AutoConfig.for_model(model_type, num_labels=len(labels), id2label=id2label, label2id=label2id, **arch)
        model = AutoModelForImageClassification.from_config(config, attn_implementation=attn_implementation)
        side = int(getattr(config, "image_size", 224))
        processor = ViTImageProcessor(size={"height": side, "width": side})
    if image_size:
        processor.size = {"height": image_size, "width": image_size}
    if image_mean is not None:
        processor.image_mean = list(image_mean)
    if image_std is not None:
        processor.image_std = list(image_std)
    return model, processor


def _quiet_transformers() -> None:
    """No "Loading weights" / "Writing model shards" bars: our own progress and log lines are enough."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve(path: str | os.PathLike[str] | None, runs_dir: str | os.PathLike[str] = "runs") -> Path:
    """A model folder from: a model folder, a run folder (its best/, else last/), or None (the latest run's best/)."""
    if path is None:
        runs = sorted(Path(runs_dir).glob("*/*/config.yaml"), key=lambda p: p.stat().st_mtime)
        runs = [r.parent for r in runs if (r.parent / "best" / "config.json").is_file()]
        if not runs:
            raise BirdsError(f"no trained model found under {runs_dir}/", "train one first: birds train --exp smoke")
        return runs[-1] / "best"
    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return p
    for sub in ("best", "last"):
        if (p / sub / "config.json").is_file():
            return p / sub
    if not p.exists():
        raise BirdsError(f"model {p} does not exist", "pass a run folder, a model folder, or nothing for the latest")
    raise BirdsError(f"{p} is not a model folder (no config.json)", "pass a run folder or its best/ folder")


def load(folder: str | os.PathLike[str], attn_implementation: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, image processor) from a Hugging Face folder; weights from safetensors only."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    _quiet_transformers()
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageClassification.from_pretrained(str(folder), **kwargs)
        processor = AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise BirdsError(f"cannot load model from {folder}: {_first_line(e)}") from e
    return model.eval(), processor


def labels_of(model: Any) -> list[str]:
    id2label = model.config.id2label
    return [id2label[i] for i in range(len(id2label))]


def save(model: Any, processor: Any, folder: Path) -> None:
    """save_pretrained both, atomically: the folder is replaced whole or not at all."""
    from birdcli.checkpoint import atomic_dir

    _quiet_transformers()
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
