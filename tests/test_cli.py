"""The command surface: help that stays light, version, one-line errors with the right exit codes."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.conftest import REPO, run_birds

HEAVY = ("torch", "torchvision", "transformers", "wandb", "dvc")


def test_help_imports_nothing_heavy():
    code = (
        "import sys, runpy\n"
        "sys.argv = ['birds', '--help']\n"
        "try:\n    runpy.run_module('birdcli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY:\n" in out.stdout or out.stdout.rstrip().endswith("HEAVY:"), out.stdout[-300:]


def test_every_command_has_help():
    for args in (["--help"], ["-h"], ["train", "-h"], ["data", "fetch", "-h"], ["data", "check", "-h"],
                 ["config", "show", "-h"], ["config", "list", "-h"]):  # fmt: skip
        r = run_birds(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert "Usage" in r.stdout


def test_help_is_fast_enough_to_feel_instant():
    """Not a benchmark: a guard against a heavy import sneaking in (budget far above the ~0.2 s measured)."""
    t0 = time.perf_counter()
    r = run_birds("--help")
    assert r.returncode == 0
    assert time.perf_counter() - t0 < 3.0


def test_version():
    from birdcli import __version__

    for flag in ("--version", "-V"):
        r = run_birds(flag)
        assert r.returncode == 0 and r.stdout.strip() == f"birds {__version__}"


def test_usage_errors_exit_2_without_traceback():
    r = run_birds("train", "--no-such-flag")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_birds("config", "show", "optimizer.lrr=1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert "optimizer.lr" in r.stderr and "Traceback" not in r.stderr


def test_debug_env_shows_the_traceback(tmp_path):
    r = run_birds("data", "check", "--root", str(tmp_path / "missing"), env={"BIRDS_DEBUG": "1"})
    assert r.returncode == 1  # a report, not an exception: still no traceback needed
    r = run_birds("config", "show", "optimizer.lrr=1", env={"BIRDS_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "birdcli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("birds ")
