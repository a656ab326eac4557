"""The alert rules and the dashboard read only metrics a running daemon really serves."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemonfixtures import AppSpec, DaemonSpec, start_daemon
from tests.support.gitrepo import OriginRepo
from tests.test_ops import _SUFFIXES, ALERTS, dashboard, dashboard_queries, metric_names_in


async def test_rules_and_dashboard_match_the_live_metrics(tmp_path: Path) -> None:
    """Every deployd_* name in alerts.yml and dashboard.json is served by GET /metrics."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "v1")
    spec = DaemonSpec(state_dir=tmp_path / "state", apps=[AppSpec(
        name="shop", repo=origin.url, local_dirs=[tmp_path / "host"],
        rollback={"grace": "0s", "bake": "100ms"})])
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        await daemon.wait_for_event("shop", "bake.healthy")
        status, text = await daemon.api.call("GET", "/metrics", token=None)
        assert status == 200
    finally:
        await daemon.stop()
    served: set[str] = set()
    for family in text_string_to_metric_families(text):
        served |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
        served |= {sample.name for sample in family.samples}
    used = metric_names_in(ALERTS.read_text())
    for expr in dashboard_queries(dashboard()).values():
        used |= metric_names_in(expr)
    assert used, "no deployd metric found in the rules and the dashboard"
    assert used <= served, sorted(used - served)
