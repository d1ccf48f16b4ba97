"""Config composition, every shipped YAML, and every error path (one line naming the key, exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from birdcli.config import GROUPS, Config, find_config_dir, list_names, load
from birdcli.errors import UsageError
from tests.conftest import REPO, run_birds

CONFIGS = REPO / "configs"


def test_every_shipped_yaml_loads_and_validates():
    root = find_config_dir(str(CONFIGS))
    for exp in list_names(root, "experiment"):
        cfg = load(exp, config_dir=str(CONFIGS))
        assert cfg.exp == exp
        OmegaConf.to_object(cfg)  # validates against the dataclass schema
    for group in GROUPS:
        for name in list_names(root, group):
            load(None, [f"{group}={name}"], config_dir=str(CONFIGS))
    assert {"exp1", "exp2", "smoke"} <= set(list_names(root, "experiment"))
    assert {"adamw", "sgd"} <= set(list_names(root, "optimizer"))
    assert {"vit-base", "vit-tiny", "vit-micro"} <= set(list_names(root, "model"))


def test_every_shipped_yaml_starts_with_its_command():
    for path in sorted(CONFIGS.rglob("*.yaml")):
        head = path.read_text().splitlines()[:4]
        assert head[0].startswith("#"), path
        assert any("birds " in line for line in head), f"{path} does not show the command that uses it"


def test_every_default_has_a_comment():
    for line in (CONFIGS / "config.yaml").read_text().splitlines():
        if line.strip() and not line.strip().startswith("#") and not line.strip().startswith("- "):
            assert "#" in line, f"no hint for: {line}"


def test_experiments_merge_over_defaults():
    base = load(None, config_dir=str(CONFIGS))
    exp1 = load("exp1", config_dir=str(CONFIGS))
    exp2 = load("exp2", config_dir=str(CONFIGS))
    smoke = load("smoke", config_dir=str(CONFIGS))
    assert exp1.model.name_or_path == "google/vit-base-patch16-224-in21k" and exp1.model.pretrained
    assert exp1.optimizer.name == "adamw" and exp1.optimizer.lr == 2e-5 and exp1.train.batch_size == 32
    assert exp1.scheduler.warmup_ratio > 0
    assert exp2.train.batch_size > exp1.train.batch_size and exp2.scheduler.name == "cosine"
    assert exp2.train.label_smoothing > 0 and exp2.augment.enabled
    assert smoke.model.name_or_path == "vit-micro" and not smoke.model.pretrained
    assert smoke.data.source == "synthetic" and smoke.data.auto_fetch
    assert base.exp == "default" and base.data.root == "data/raw"


def test_overrides_win_and_groups_can_be_picked():
    cfg = load("exp2", ["optimizer.lr=0.001", "train.epochs=7", "optimizer=sgd", "model=vit-tiny"], str(CONFIGS))
    assert cfg.optimizer.lr == 0.001 and cfg.train.epochs == 7
    assert cfg.optimizer.name == "sgd" and cfg.model.name_or_path == "vit-tiny"
    assert cfg.model.architecture.hidden_size == 192


@pytest.mark.parametrize(
    "overrides, exp, needle",
    [
        (["optimizer.lrr=1"], None, "optimizer.lr"),
        (["trian.epochs=1"], None, "train"),
        (["train.epochs=abc"], None, "train.epochs"),
        (["train.epochs"], None, "key=value"),
        (["=3"], None, "key=value"),
        ([], "exp3", "exp2"),
        (["model=vit-tinny"], None, "vit-tiny"),
        (["optimizer=adamm"], None, "adamw"),
        (["train.precision=bf61"], None, "bf16"),
        (["scheduler.name=cosin"], None, "cosine"),
        (["tracking.wandb.mode=onlin"], None, "online"),
    ],
)
def test_config_errors_are_one_line_with_a_suggestion(overrides, exp, needle):
    with pytest.raises(UsageError) as err:
        load(exp, overrides, str(CONFIGS))
    text = str(err.value)
    assert needle in text and "\n" not in text


def test_cli_config_show_and_errors():
    r = run_birds("config", "show", "--exp", "exp2", "optimizer.lr=0.001")
    assert r.returncode == 0 and "lr: 0.001" in r.stdout and "exp: exp2" in r.stdout
    r = run_birds("config", "show", "optimizer.lrr=1")
    assert r.returncode == 2 and "optimizer.lr" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_birds("config", "show", "--exp", "nope")
    assert r.returncode == 2 and "unknown experiment" in r.stderr
    r = run_birds("config", "list")
    assert r.returncode == 0 and "exp1" in r.stdout and "smoke" in r.stdout


def test_configs_found_from_any_directory_and_config_dir_wins(tmp_path: Path):
    r = run_birds("config", "show", "--exp", "smoke", cwd=tmp_path)  # packaged copy
    assert r.returncode == 0 and "vit-micro" in r.stdout
    mine = tmp_path / "mine"
    (mine / "experiment").mkdir(parents=True)
    (mine / "config.yaml").write_text((CONFIGS / "config.yaml").read_text().replace("runs_dir: runs", "runs_dir: x"))
    (mine / "experiment" / "mine.yaml").write_text("# birds train --exp mine\ntrain:\n  epochs: 11\n")
    for group in GROUPS:
        (mine / group).symlink_to(CONFIGS / group)
    r = run_birds("config", "show", "--config-dir", str(mine), "--exp", "mine", cwd=tmp_path)
    assert r.returncode == 0 and "runs_dir: x" in r.stdout and "epochs: 11" in r.stdout
    r = run_birds("config", "show", "--config-dir", str(tmp_path / "none"))
    assert r.returncode == 2 and "config.yaml" in r.stderr


def test_schema_and_yaml_agree():
    """config.yaml sets every key the schema has (and no other), so it really holds every default."""
    schema = OmegaConf.structured(Config)
    raw = OmegaConf.load(CONFIGS / "config.yaml")
    raw.pop("defaults")

    def keys(node, prefix=""):
        out = set()
        for k, v in node.items():
            out.add(prefix + k)
            if isinstance(v, dict) and k != "architecture":
                out |= keys(v, f"{prefix}{k}.")
        return out

    assert keys(OmegaConf.to_container(raw)) == keys(OmegaConf.to_container(schema))
