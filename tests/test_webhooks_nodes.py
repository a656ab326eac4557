"""A push webhook that reaches the node not running the app (behind a load balancer, any node
may get it): that node checks it and forwards it to the owner, which deploys at once.

Two real daemons on one throwaway PostgreSQL database, each listening where it advertises.
The app polls every 10 minutes, so a deploy within seconds can only come from the forward.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemonfixtures import RunningDaemon
from tests.support.gitrepo import OriginRepo
from tests.support.net import free_port
from tests.support.nodespecs import local_apps, node_spec, start_node, wait_owners
from tests.support.postgres import Database

pytestmark = pytest.mark.slow

SECRET = b"webhook-secret-3f9a0c7e5d1b"
WATCHED = "refs/heads/production"


async def post(node: RunningDaemon, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with node.session.post(f"{node.base}/hooks/alpha", data=body,
                                 headers=headers) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


def github(body: bytes, secret: bytes = SECRET) -> dict[str, str]:
    digest = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return {"X-GitHub-Event": "push", "X-Hub-Signature-256": f"sha256={digest}",
            "Content-Type": "application/json"}


def webhooks(node: RunningDaemon) -> dict[str, float]:
    """deployd_webhooks_total{app="alpha"} by result (those not zero)."""
    counts = {}
    for family in node.daemon.metrics.registry.collect():
        for found in family.samples:
            if found.name == "deployd_webhooks_total" and found.labels["app"] == "alpha" \
                    and found.value:
                counts[found.labels["result"]] = found.value
    return counts


async def test_a_push_sent_to_the_other_node_is_deployed_by_the_owner_at_once(
        tmp_path: Path, pg_database: Database) -> None:
    """node-a runs the app, node-b does not. A signed GitHub push and then a GitLab one sent
    to node-b are checked there, forwarded and deployed by node-a within seconds (the app
    polls every 10 minutes); the answer is node-a's 202. A bad signature is refused by node-b
    and never forwarded; a push already forwarded once is not forwarded again; another ref
    is ignored by node-b itself. webhooks_total counts forwarded and not_forwarded."""
    origin = OriginRepo(tmp_path / "origin.git")
    first = origin.commit({"index.html": "v1\n"}, "first")
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    apps = local_apps(tmp_path, origin, ["alpha"], settings={"poll_interval": "10m"},
                      webhook={"secret_file": str(secret_file)})
    ports = {"node-a": free_port(), "node-b": free_port()}
    nodes: list[RunningDaemon] = []
    try:
        for name, port in ports.items():
            spec = node_spec(tmp_path, name, pg_database, apps, port=port)
            nodes.append(await start_node(spec.write(tmp_path / f"{name}.toml"), port))
            if name == "node-a":
                await wait_owners(nodes[0].api, {"node-a": ["alpha"]}, within=10)
        owner, other = nodes
        await owner.wait_for_event("alpha", "deploy.succeeded")
        assert (await owner.events("alpha"))[-1]["revision"] == first

        second = origin.commit({"index.html": "v2\n"}, "second")
        body = json.dumps({"ref": WATCHED, "after": second}).encode()
        status, answer = await post(other, body, github(body))
        assert (status, answer) == (202, {"accepted": "fetching production"})
        deployed = await owner.wait_for_event("alpha", "deploy.succeeded", count=2,
                                              timeout=30)
        assert deployed["revision"] == second

        third = origin.commit({"index.html": "v3\n"}, "third")
        body = json.dumps({"ref": WATCHED, "after": third}).encode()
        status, answer = await post(other, body, {
            "X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRET.decode(),
            "Content-Type": "application/json"})
        assert status == 202, answer
        deployed = await owner.wait_for_event("alpha", "deploy.succeeded", count=3,
                                              timeout=30)
        assert deployed["revision"] == third

        status, answer = await post(other, body, github(body, secret=b"wrong-secret-0123456"))
        assert status == 401, answer
        status, answer = await post(other, body,
                                    {**github(body), "X-Deployd-Forwarded-By": "node-c"})
        assert status == 409 and answer["error"]["code"] == "not_owner", answer
        assert f"run by node node-a (at {owner.base})" in answer["error"]["message"]
        other_ref = json.dumps({"ref": "refs/heads/main"}).encode()
        status, answer = await post(other, other_ref, github(other_ref))
        assert status == 200 and "ignored" in answer, answer

        assert webhooks(other) == {"forwarded": 2, "unauthorized": 1, "not_forwarded": 1,
                                   "ignored": 1}
        assert webhooks(owner) == {"accepted": 2}
        kinds = [event["kind"] for event in await owner.events("alpha")]
        assert kinds.count("deploy.succeeded") == 3
    finally:
        for node in nodes:
            await node.stop()
