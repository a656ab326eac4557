"""`deployd demo --approve` plays the whole story and leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def _story(out: str) -> dict[str, list[str]]:
    """The printed story: each `== heading`'s lines (stripped), by the heading's text."""
    sections: dict[str, list[str]] = {"": []}
    heading = ""
    for line in out.splitlines():
        if line.startswith("== "):
            heading = line[3:]
            sections[heading] = []
        elif line.strip():
            sections[heading].append(line.strip())
    return sections


def _section(story: dict[str, list[str]], start: str) -> list[str]:
    (heading,) = [h for h in story if h.startswith(start)]
    return story[heading]


def _events(lines: list[str], kind: str) -> list[str]:
    """The messages of the timeline lines (`  1.23s  kind  message`) of one kind."""
    return [line.split(None, 2)[2] for line in lines
            if len(line.split(None, 2)) == 3 and line.split(None, 2)[1] == kind]


def test_demo_plays_the_rescue_story_and_cleans_up(tmp_path: Path) -> None:
    """The demo rolls out in steps, rolls back, stops a bad release at the canary, rescues
    after approval, ends pristine, removes its files."""
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
    story = _story(out)
    walks = ["step 1/2 (1): release {} now on web1; 1 of 3 hosts on the new release",
             "step 2/2 (100%): release {} now on web2, web3; 3 of 3 hosts on the new release"]
    for good in ("production is at", "a new commit lands", "approving it"):
        steps = _events(_section(story, good), "rollout.step")
        release = steps[0].split()[4] if steps else "none"
        assert steps == [walk.format(release) for walk in walks], (good, out)
        assert _events(_section(story, good), "rollout.done"), (good, out)
    bad_batch = _section(story, "a bad batch")
    (step,) = _events(bad_batch, "rollout.step")
    assert step.startswith("step 1/2 (1): ") and " now on web1; " in step, out
    (stopped,) = _events(bad_batch, "rollout.rolled_back")
    assert " rolled back at step 1/2: " in stopped, out
    (rolled_back,) = _events(bad_batch, "rollback.succeeded")
    assert " live again on 1 host in " in rolled_back, out
    assert _section(story, "the bad release") == [
        "web1: ran it, judged bad, rolled back on that host alone",
        "web2, web3: never ran it (their revisions.log has no new line)"], out
    head = _section(story, "where things stand")[0].split()[2]
    assert f"on the hosts  web1 {head}, web2 {head}, web3 {head}" in out, out
    assert list(tmp_path.iterdir()) == [], "the demo left its files behind"


ROOT = Path(__file__).resolve().parents[1]


def _shell(lines: list[str], call: str) -> str:
    """Run one printed curl call after the printed variable lines; its stdout."""
    script = "\n".join(["set -euo pipefail", *lines, call])
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, (call, result.stdout, result.stderr)
    return result.stdout


def _assert_stopped_at_the_canary(events: list[dict[str, Any]], tmp: Path) -> None:
    """From the daemon's events and the hosts' own files while the demo waits: the bad
    release's rollout stopped at step 1, and web1 (the canary) alone ever ran it."""
    (failed,) = [e for e in events if e["kind"] == "bake.failed"]
    bad = failed["revision"]
    assert failed["data"]["step"] == 1 and len(failed["data"]["hosts"]) == 1, failed
    assert [e["data"]["step"] for e in events
            if e["kind"] == "rollout.step" and e["revision"] == bad] == [1], events
    (stopped,) = [e for e in events if e["kind"] == "rollout.rolled_back"]
    assert (stopped["revision"], stopped["data"]["step"]) == (bad, 1), stopped
    (root,) = tmp.glob("deployd-demo-*")
    hosts = {name: root / name / "srv" / "shop" for name in ("web1", "web2", "web3")}
    logs = {name: (d / "revisions.log").read_text() for name, d in hosts.items()}
    assert [name for name, log in logs.items() if bad in log] == ["web1"], logs
    live = {name: (d / "current" / "REVISION").read_text().strip() for name, d in hosts.items()}
    assert len(set(live.values())) == 1 and bad not in live.values(), live


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
        _assert_stopped_at_the_canary(json.loads(_shell(setup, events))["events"], tmp_path)
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
