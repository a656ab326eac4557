"""The shell deployd runs on hosts: package files that dash parses and shellcheck accepts.

Each step runs as lib.sh followed by the step's script (see `deployd.releases._script`), so
that is what is checked; values reach the scripts as quoted assignments, never as script text.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from deployd import releases

SH_DIR = Path(releases.__file__).parent / "sh"
STEPS = [name for name in releases.SCRIPTS if name != "lib"]


def assembled(tmp_path: Path, step: str) -> Path:
    path = tmp_path / f"{step}.sh"
    path.write_text("#!/bin/sh\n" + (SH_DIR / "lib.sh").read_text()
                    + (SH_DIR / f"{step}.sh").read_text())
    return path


def test_every_script_is_a_package_file() -> None:
    """The shell lives in sh/*.sh, one file per step, nothing else there."""
    assert sorted(p.name for p in SH_DIR.iterdir()) == sorted(f"{n}.sh" for n in releases.SCRIPTS)


@pytest.mark.parametrize("step", STEPS)
def test_dash_parses_each_step(tmp_path: Path, step: str) -> None:
    """`sh -n` (dash, what Debian hosts run) accepts lib.sh plus the step."""
    result = subprocess.run(["sh", "-n", str(assembled(tmp_path, step))], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("step", STEPS)
def test_shellcheck_accepts_each_step(tmp_path: Path, step: str) -> None:
    """shellcheck (as dash) finds nothing in lib.sh plus the step."""
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (tests/run.sh installs it)")
    result = subprocess.run([shellcheck, "--severity=style", str(assembled(tmp_path, step))],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_values_stay_values(tmp_path: Path) -> None:
    """A value full of shell syntax reaches the script as the same bytes and runs nothing."""
    canary = tmp_path / "ran"
    hostile = f"$(touch {canary})`touch {canary}`'\"; touch {canary} #\n$dt"
    script = releases._script("test", 'printf %s "$value"\n', value=hostile,
                              dt=str(tmp_path))
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == hostile
    assert not canary.exists()
