"""`deployd demo --approve` plays the whole story and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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
