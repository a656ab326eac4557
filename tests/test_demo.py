"""`deployd demo --approve` plays the whole story and leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_demo_plays_the_rescue_story_and_cleans_up(tmp_path: Path) -> None:
    """The demo deploys, rolls back, rescues after approval, ends pristine, removes its files."""
    # Its own TMPDIR: another demo running on the machine meanwhile is none of its business.
    result = subprocess.run(
        [sys.executable, "-m", "deployd.cli", "demo", "--approve"],
        env={**os.environ, "PYTHONPATH": "daemon", "TMPDIR": str(tmp_path)},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for kind in ("deploy.succeeded", "rollback.succeeded", "quarantine.added", "job.opened",
                 "job.approved", "job.pushed", "job.succeeded"):
        assert kind in out, f"{kind} missing from the demo's timeline:\n{out}"
    assert out.index("quarantine.added") < out.index("job.opened") < out.index("job.succeeded")
    assert "(pristine: True)" in out
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [], "the demo left its files behind"


ROOT = Path(__file__).resolve().parents[1]


def _shell(lines: list[str], call: str) -> str:
    """Run one printed curl call after the printed variable lines; its stdout."""
    script = "\n".join(["set -euo pipefail", *lines, call])
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, (call, result.stdout, result.stderr)
    return result.stdout


async def test_demo_without_approve_prints_working_readme_calls_while_it_waits(
        tmp_path: Path) -> None:
    """Without --approve, the demo prints the README's calls ($DEPLOYD_TOKEN, $H, $D) while
    its daemon runs; each one works as printed, and the printed approve call ends the demo."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (tests/run.sh installs it)")
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deployd.cli", "demo",
        env={**os.environ, "PYTHONPATH": "daemon", "PYTHONUNBUFFERED": "1",
             "TMPDIR": str(tmp_path)},
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert demo.stdout is not None
    out: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not out or "waiting for your approval" not in out[-1]:
                line = await demo.stdout.readline()
                assert line, "the demo ended before waiting:\n" + "".join(out)
                out.append(line.decode())
        start = next(i for i, line in enumerate(out) if "with the README's variables" in line)
        block = [line.strip() for line in out[start + 1:] if line.startswith("    ")]
        setup = [line for line in block if line.startswith(("export DEPLOYD_TOKEN=", "H="))]
        assert len(setup) == 2 and setup[1].startswith(
            'H="Authorization: Bearer $DEPLOYD_TOKEN"; D=http://127.0.0.1:'), block
        calls = [line for line in block if line.startswith("curl ")]
        assert all("$D/" in call for call in calls), calls
        assert all('-H "$H"' in call for call in calls if "/metrics" not in call), calls
        app, events, metrics, job, patch, approve = calls
        assert json.loads(_shell(setup, app))["name"] == "shop"
        assert json.loads(_shell(setup, events))["events"]
        assert "deployd_bake_verdicts_total" in _shell(setup, metrics)
        assert json.loads(_shell(setup, job))["state"] == "pending"
        assert "+rate 0.2" in _shell(setup, patch)
        assert json.loads(_shell(setup, approve))["state"] in ("approved", "running")
        async with asyncio.timeout(60):
            rest, err = await demo.communicate()
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
    assert demo.returncode == 0, "".join(out) + rest.decode() + err.decode()
    assert "job.succeeded" in rest.decode()
    assert not any(line.lstrip().startswith("curl") for line in rest.decode().splitlines()), \
        "curl calls printed after the daemon stopped"
    assert await asyncio.to_thread(os.listdir, tmp_path) == [], "the demo left its files behind"
