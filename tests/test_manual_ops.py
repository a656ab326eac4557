"""What a human does over REST: rollbacks quarantine, observe mode deploys nothing."""

from __future__ import annotations

from pathlib import Path

from tests.daemonfixtures import AppSpec, DaemonSpec, start_daemon
from tests.gitrepo import OriginRepo


def spec_for(tmp_path: Path, **settings: object) -> tuple[DaemonSpec, OriginRepo]:
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "v1")
    app = AppSpec(name="shop", repo=origin.url, local_dirs=[tmp_path / "host"],
                  rollback={"grace": "0s", "bake": "100ms"}, settings=dict(settings))
    return DaemonSpec(state_dir=tmp_path / "state", apps=[app]), origin


async def test_manual_rollback_quarantines_the_revision_it_leaves(tmp_path: Path) -> None:
    """After a REST rollback, the revision rolled away from is quarantined and not redeployed."""
    spec, origin = spec_for(tmp_path)
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        await daemon.wait_for_event("shop", "bake.healthy")
        second = origin.commit({"index.html": "v2\n"}, "v2")
        await daemon.wait_for_event("shop", "bake.healthy", count=2)
        status, _ = await daemon.api.call("POST", "/api/v1/apps/shop/rollback",
                                          json_body={"reason": "v2 looks wrong"})
        assert status == 202
        event = await daemon.wait_for_event("shop", "quarantine.added")
        assert event["revision"] == second and "v2 looks wrong" in event["message"]
        await daemon.wait_for_event("shop", "rollback.succeeded")
        app = await daemon.api.get("/api/v1/apps/shop")
        assert [q["revision"] for q in app["quarantined"]] == [second]
        assert app["pristine"] is False
        kinds = [e["kind"] for e in await daemon.events("shop")]
        assert kinds.count("deploy.started") == 2
    finally:
        await daemon.stop()


async def test_observe_mode_refuses_rest_deploys(tmp_path: Path) -> None:
    """An app in observe mode answers 409 to POST deploy: another tool deploys it."""
    spec, origin = spec_for(tmp_path, mode="observe")
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        status, body = await daemon.api.call("POST", "/api/v1/apps/shop/deploy",
                                             json_body={"revision": origin.head()})
        assert status == 409
        assert "observe mode" in body["error"]["message"]
        assert not (tmp_path / "host" / "current").exists()
    finally:
        await daemon.stop()


async def test_failed_build_shows_the_hooks_own_output(tmp_path: Path) -> None:
    """deploy.failed carries what the build hook printed, not only its exit status."""
    spec, _ = spec_for(tmp_path)
    spec.apps[0].hooks = {"build": "echo 'npm ERR! missing script: build' >&2; exit 7"}
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        event = await daemon.wait_for_event("shop", "deploy.failed")
        assert "npm ERR! missing script: build" in event["message"]
        assert "exit 7" in event["message"]
    finally:
        await daemon.stop()
