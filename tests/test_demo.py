"""`deployd demo --approve` plays the whole story and leaves nothing behind."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def test_demo_plays_the_rescue_story_and_cleans_up() -> None:
    """The demo deploys, rolls back, rescues after approval, ends pristine, removes its files."""
    pattern = os.path.join(tempfile.gettempdir(), "deployd-demo-*")
    before = set(glob.glob(pattern))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "deployd.cli", "demo", "--approve"],
        env={**os.environ, "PYTHONPATH": "daemon"}, cwd=Path(__file__).resolve().parents[1],
        capture_output=True, text=True, timeout=120,
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for kind in ("deploy.succeeded", "rollback.succeeded", "quarantine.added", "job.opened",
                 "job.approved", "job.pushed", "job.succeeded"):
        assert kind in out, f"{kind} missing from the demo's timeline:\n{out}"
    assert out.index("quarantine.added") < out.index("job.opened") < out.index("job.succeeded")
    assert "(pristine: True)" in out
    assert "Traceback" not in result.stderr
    assert took < 60, f"the demo took {took:.1f}s"
    assert set(glob.glob(pattern)) == before, "the demo left its files behind"
