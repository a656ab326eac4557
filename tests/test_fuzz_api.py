"""The REST API fuzzed by schemathesis, from the daemon's own /api/v1/openapi.json.

For every role's token, schemathesis generates requests for every operation (examples,
coverage and fuzzing phases, a bounded number of cases, deterministic generation) against
the real daemon with one app on a local host and a pending rescue job, and checks every
answer: never a 5xx, a status and a body the document describes, content types and headers
as documented (405 with Allow), invalid input refused, and auth enforced (the same request
without or with a wrong token is refused). Deploys and rollbacks really run on the local host.
A last run leaves the path parameters free, so unknown apps and jobs are fuzzed too.

Not checked: `positive_data_acceptance`, since the schema cannot say which strings name a
commit or a valid moment; the server answers those with a 404 or 422 by design.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from deployd import openapi
from tests.support.daemonfixtures import (
    QUICK_BAKE,
    TOKENS,
    one_local_app,
    start_daemon,
)
from tests.support.gitrepo import OriginRepo

APP = "shop"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CHECKS = ("not_a_server_error,status_code_conformance,response_schema_conformance,"
          "content_type_conformance,response_headers_conformance,negative_data_rejection,"
          "ignored_auth,unsupported_method,missing_required_header")
# Every operation but GET /api/v1/openapi.json, which schemathesis leaves out when it loads
# the document from that URL.
OPERATIONS = sum(len(methods) for methods in openapi.document()["paths"].values()) - 1


async def fuzz(tmp_path: Path, token: str, *, fixed_paths: bool) -> str:
    """Start a fresh daemon, run schemathesis on it with `token`; its output (exit 0)."""
    origin = OriginRepo(tmp_path / "origin.git")
    base = origin.commit({"index.html": "v1\n"}, "first")
    spec = one_local_app(tmp_path, origin.path, name=APP, rollback=QUICK_BAKE)
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        await daemon.wait_for_event(APP, "deploy.succeeded")
        second = origin.commit({"index.html": "v2\n"}, "second")
        status, job = await daemon.api.call("POST", f"/api/v1/apps/{APP}/jobs",
                                            json_body={"commits": [second], "base": base})
        assert status == 201, job
        settings = tmp_path / "schemathesis.toml"
        settings.write_text(f'[parameters]\n"path.app" = "{APP}"\n"path.job" = {job["id"]}\n'
                            if fixed_paths else "")
        process = await asyncio.create_subprocess_exec(
            str(SCHEMATHESIS), "--config-file", str(settings), "run",
            f"{daemon.base}/api/v1/openapi.json", "--url", daemon.base,
            "-H", f"Authorization: Bearer {TOKENS[token][0]}", "--checks", CHECKS,
            "--phases", "examples,coverage,fuzzing", "--max-examples", "25",
            "--generation-deterministic", "--workers", "1", "--request-timeout", "10",
            "--no-color", cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        async with asyncio.timeout(100):
            out, _ = await process.communicate()
    finally:
        await daemon.stop()
    text = out.decode(errors="replace")
    assert process.returncode == 0, text[-8000:]
    return text


def forbidden_for(token: str) -> set[str]:
    """`METHOD /path` of every operation needing a role this token lacks."""
    roles = TOKENS[token][1]
    return {f"{method.upper()} {path}"
            for path, methods in openapi.document()["paths"].items()
            for method, operation in methods.items()
            if operation.get("x-deployd-role", "read") not in roles}


def only_forbidden(text: str) -> set[str]:
    """The operations schemathesis reports as answering nothing but 403."""
    found: set[str] = set()
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("403 Forbidden ("):
            for item in lines:
                if not item.startswith("  - "):
                    break
                found.add(item.removeprefix("  - "))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("token", ["reader", "deployer", "approver", "admin"])
async def test_schemathesis_finds_nothing_for_any_role(tmp_path: Path, token: str) -> None:
    """Every operation, fuzzed with this role's token, conforms and never fails; exactly the
    operations needing a role the token lacks answer nothing but 403."""
    text = await fuzz(tmp_path, token, fixed_paths=True)
    assert f"Tested: {OPERATIONS}" in text, text[-3000:]
    assert only_forbidden(text) == forbidden_for(token), text[-3000:]


@pytest.mark.slow
async def test_schemathesis_on_unknown_apps_and_jobs(tmp_path: Path) -> None:
    """With the path parameters free, unknown apps and jobs conform too (404 as documented)."""
    text = await fuzz(tmp_path, "admin", fixed_paths=False)
    assert f"Tested: {OPERATIONS}" in text, text[-3000:]
