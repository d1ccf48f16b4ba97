"""The typed config schema and `load()`: defaults YAML, model/optimizer groups, an experiment, then `key=value`.

Composition order (later wins):
    schema (dataclasses) < config.yaml < model/<name>.yaml < optimizer/<name>.yaml < experiment/<exp>.yaml < overrides
The groups are picked by `defaults:` in config.yaml, then in the experiment, then by `model=NAME` /
`optimizer=NAME` on the command line.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from birdcli.errors import UsageError

GROUPS = ("model", "optimizer")


@dataclass
class SyntheticConfig:
    num_classes: int = 10
    train_per_class: int = 40
    valid_per_class: int = 10
    test_per_class: int = 10
    image_size: int = 32
    seed: int = 0


@dataclass
class DataConfig:
    root: str = "data/raw"
    source: str = "synthetic"
    path: str | None = None
    link: bool = False
    url: str | None = None
    sha256: str | None = None
    hf_repo: str | None = None
    kaggle_dataset: str = "gpiosenka/100-bird-species"
    max_extract_gb: float = 20.0
    auto_fetch: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    num_workers: int = -1
    cache: bool = False
    cache_dir: str = "data/cache"
    max_bad_in_row: int = 20


@dataclass
class ModelConfig:
    name_or_path: str = "google/vit-base-patch16-224-in21k"
    pretrained: bool = True
    architecture: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    attn_implementation: str = "eager"


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 2e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    nesterov: bool = True


@dataclass
class SchedulerConfig:
    name: str = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0


@dataclass
class AugmentConfig:
    enabled: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.7, 1.0])
    hflip: float = 0.5
    color_jitter: float = 0.0
    rand_augment: bool = False


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int | None = None
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    precision: str = "auto"
    compile: bool = False
    seed: int = 42
    deterministic: bool = False
    early_stopping_patience: int | None = None
    log_every: int = 10
    checkpoint_every: int = 200
    max_train_samples: int | None = None


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "birdcli"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    log_model: bool = True


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    exp: str = "default"
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def config_dirs(config_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Search path: --config-dir, then ./configs, then the copy shipped in the package."""
    dirs = [Path(config_dir)] if config_dir else []
    dirs += [Path("configs"), Path(__file__).parent / "configs"]
    return dirs


def find_config_dir(config_dir: str | os.PathLike[str] | None = None) -> Path:
    if config_dir and not (Path(config_dir) / "config.yaml").is_file():
        raise UsageError(f"no config.yaml in --config-dir {config_dir}", "point it at a folder like configs/")
    for d in config_dirs(config_dir):
        if (d / "config.yaml").is_file():
            return d
    raise UsageError("no configs found", "reinstall birdcli or pass --config-dir")


def list_names(root: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def _read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise UsageError(f"{path} must hold a mapping")
    return cfg


def _pick(root: Path, group: str, name: str) -> Path:
    path = root / group / f"{name}.yaml"
    if not path.is_file():
        names = list_names(root, group)
        near = difflib.get_close_matches(name, names, n=3) or names
        raise UsageError(f"unknown {group} '{name}'", f"choose one of: {', '.join(near)}")
    return path


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k!s}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig) and not _is_free_dict(full):
                keys += _all_keys(child, full + ".")
    return keys


def _is_free_dict(key: str) -> bool:
    """Keys whose values are free-form mappings (passed through to a library)."""
    return key == "model.architecture"


def _check_key(key: str, valid: list[str]) -> None:
    if key in valid or any(key.startswith(f"{free}.") for free in valid if _is_free_dict(free)):
        return
    same_depth = [k for k in valid if k.count(".") == key.count(".")]
    near = difflib.get_close_matches(key, same_depth, n=2, cutoff=0.6) or difflib.get_close_matches(key, valid, n=2)
    hint = f"did you mean {' or '.join(near)}?" if near else "run `birds config show` to see every key"
    raise UsageError(f"unknown config key '{key}'", hint)


def _check_mapping(cfg: DictConfig, valid: list[str], where: str) -> None:
    for key in _all_keys(cfg):
        try:
            _check_key(key, valid)
        except UsageError as e:
            raise UsageError(f"{e.message} in {where}", e.hint) from None


def _parse_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split `model=NAME`/`optimizer=NAME` group picks from dotted `key=value` overrides."""
    groups, dotlist = {}, []
    for token in overrides:
        key, sep, value = token.partition("=")
        if not sep or not key.strip() or " " in key.strip():
            raise UsageError(f"malformed override '{token}'", "write overrides as key=value, e.g. train.epochs=5")
        if key in GROUPS:
            groups[key] = value
        else:
            dotlist.append(token)
    return groups, dotlist


def load(exp: str | None = None, overrides: list[str] | None = None, config_dir: str | None = None) -> DictConfig:
    """Resolve the full config; every mistake becomes one `UsageError` line naming the key."""
    root = find_config_dir(config_dir)
    group_picks, dotlist = _parse_overrides(list(overrides or []))
    schema = OmegaConf.structured(Config)
    valid = _all_keys(schema)

    base = _read_yaml(root / "config.yaml")
    defaults = dict(base.pop("defaults", {}) or {})
    layers: list[tuple[str, DictConfig]] = [("config.yaml", base)]

    experiment = None
    if exp:
        experiment = _read_yaml(_pick(root, "experiment", exp))
        defaults.update(experiment.pop("defaults", {}) or {})
    defaults.update(group_picks)
    for group in GROUPS:
        if group in defaults:
            node = _read_yaml(_pick(root, group, str(defaults[group])))
            layers.append((f"{group}/{defaults[group]}.yaml", OmegaConf.create({group: node})))
    if experiment is not None:
        layers.append((f"experiment/{exp}.yaml", experiment))

    try:
        cli = OmegaConf.from_dotlist(dotlist)
    except OmegaConfBaseException as e:
        raise UsageError(f"malformed override: {e}", "write overrides as key=value") from None
    layers.append(("the command line", cli))

    cfg = schema
    for where, layer in layers:
        _check_mapping(layer, valid, where)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise UsageError(f"bad value for '{key}' in {where}: {_short(e)}") from None
    if exp:
        cfg.exp = exp
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise UsageError(f"cannot resolve config: {_short(e)}") from None
    _validate_choices(cfg)
    return cfg  # type: ignore[return-value]


_CHOICES = {
    "data.source": ("synthetic", "dir", "url", "hf", "kaggle", "dvc"),
    "optimizer.name": ("adamw", "sgd"),
    "scheduler.name": ("cosine", "linear", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "model.attn_implementation": ("sdpa", "eager"),
    "tracking.wandb.mode": ("offline", "online", "disabled"),
}


def _validate_choices(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            near = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean {near[0]}?" if near else f"choose one of: {', '.join(choices)}"
            raise UsageError(f"bad value '{value}' for '{key}'", hint)


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def to_yaml(cfg: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(cfg)
