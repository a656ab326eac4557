"""Every Prometheus metric deployd exports, defined in one place.

One `Metrics` per daemon instance owns its own `CollectorRegistry`, so tests can run several
daemons in one process and read each one's values with `registry.get_sample_value(...)`.
Labels are bounded: app, host, check result and job state come from the config or a closed
set; the only per-revision label is on the `release_info` info gauge, which holds one
series per app at a time.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from deployd import __version__

PREFIX = "deployd"

# Rollbacks and deploys take between a fraction of a second and many minutes.
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The registry and every metric of one daemon."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        self.deploys_total = Counter(
            "deploys", "Deploys finished, by result: succeeded (switched on every host, not "
            "yet judged: see bake_verdicts_total), failed (a step failed; no host was left "
            "on it), observed (a release another tool made, seen in observe mode).",
            ["app", "result"], namespace=PREFIX, registry=r,
        )
        self.bake_verdicts_total = Counter(
            "bake_verdicts", "Bake windows judged, of deploys and rollbacks, by verdict: good "
            "(healthy through it, now the last good), bad (unhealthy: rolled back, or paused "
            "when it cannot be), no_data (no health data to judge: paused).",
            ["app", "verdict"], namespace=PREFIX, registry=r,
        )
        self.rollbacks_total = Counter(
            "rollbacks", "Rollbacks finished, by trigger (manual, health).",
            ["app", "trigger"], namespace=PREFIX, registry=r,
        )
        self.health_checks_total = Counter(
            "health_checks", "Health probes run, by result (success, failure, no_data).",
            ["app", "host", "result"], namespace=PREFIX, registry=r,
        )
        self.git_fetch_errors_total = Counter(
            "git_fetch_errors", "Failed fetches of an app's git mirror.",
            ["app"], namespace=PREFIX, registry=r,
        )
        self.ssh_errors_total = Counter(
            "ssh_errors", "SSH connection or command failures, by host.",
            ["app", "host"], namespace=PREFIX, registry=r,
        )
        self.deploy_duration_seconds = Histogram(
            "deploy_duration_seconds", "Wall time of a deploy, prepare to last switch.",
            ["app"], namespace=PREFIX, registry=r, buckets=_DURATION_BUCKETS,
        )
        self.rollback_duration_seconds = Histogram(
            "rollback_duration_seconds", "Wall time of a rollback on every host.",
            ["app"], namespace=PREFIX, registry=r, buckets=_DURATION_BUCKETS,
        )
        self.health_check_duration_seconds = Histogram(
            "health_check_duration_seconds", "Time one health probe took.",
            ["app"], namespace=PREFIX, registry=r, buckets=_PROBE_BUCKETS,
        )
        self.git_fetch_duration_seconds = Histogram(
            "git_fetch_duration_seconds", "Time one fetch of an app's mirror took.",
            ["app"], namespace=PREFIX, registry=r, buckets=(*_PROBE_BUCKETS, 30, 60),
        )
        self.transplant_duration_seconds = Histogram(
            "transplant_duration_seconds", "Time a rescue transplant took, approve to push.",
            ["app"], namespace=PREFIX, registry=r, buckets=_DURATION_BUCKETS,
        )
        self.webhooks_total = Counter(
            "webhooks", "Webhook requests by result (accepted, ignored, unauthorized, "
            "too_large, bad_request; forwarded to the node running the app, or "
            "not_forwarded when it could not be).", ["app", "result"], namespace=PREFIX,
            registry=r,
        )
        self.notifications_total = Counter(
            "notifications", "Notification attempts by target and result (sent, retried, "
            "failed: given up).", ["target", "result"], namespace=PREFIX, registry=r,
        )
        self.rollout_step = Gauge(
            "rollout_step", "The step (1-based) the app's rollout is at; 0 when none runs.",
            ["app"], namespace=PREFIX, registry=r,
        )
        self.rollout_hosts = Gauge(
            "rollout_hosts", "Hosts per group of the app's rollout: canary (on the new "
            "release), baseline (still on last good); 0 when none runs.",
            ["app", "group"], namespace=PREFIX, registry=r,
        )
        self.rollout_paused_timestamp_seconds = Gauge(
            "rollout_paused_timestamp_seconds", "When the app's rollout paused (absent "
            "unless it waits for a promote).", ["app"], namespace=PREFIX, registry=r,
        )
        self.analysis_verdicts_total = Counter(
            "analysis_verdicts", "Rollout steps judged canary against baseline, by verdict "
            "(pass, fail, inconclusive).", ["app", "verdict"], namespace=PREFIX, registry=r,
        )
        self.notifications_queued = Gauge(
            "notifications_queued", "Notifications waiting in the outbox, by target.",
            ["target"], namespace=PREFIX, registry=r,
        )
        self.host_healthy = Gauge(
            "host_healthy", "1 when the host passes its health checks, 0 when not.",
            ["app", "host"], namespace=PREFIX, registry=r,
        )
        self.branch_pristine = Gauge(
            "branch_pristine", "1 when the branch head is a revision deployd would deploy.",
            ["app"], namespace=PREFIX, registry=r,
        )
        self.paused = Gauge(
            "paused", "1 when automatic deploys and rollbacks of the app are paused.",
            ["app"], namespace=PREFIX, registry=r,
        )
        self.rescue_jobs = Gauge(
            "rescue_jobs", "Rescue jobs by state.",
            ["app", "state"], namespace=PREFIX, registry=r,
        )
        self.rescue_job_oldest_pending_timestamp_seconds = Gauge(
            "rescue_job_oldest_pending_timestamp_seconds",
            "Creation time of the oldest pending rescue job (absent when none).",
            ["app"], namespace=PREFIX, registry=r,
        )
        self.last_deploy_timestamp_seconds = Gauge(
            "last_deploy_timestamp_seconds", "When the last successful deploy finished.",
            ["app"], namespace=PREFIX, registry=r,
        )
        self.last_rollback_timestamp_seconds = Gauge(
            "last_rollback_timestamp_seconds", "When the last rollback finished.",
            ["app"], namespace=PREFIX, registry=r,
        )
        self.release_info = Gauge(
            "release_info", "1 for the revision live on the app's hosts.",
            ["app", "revision"], namespace=PREFIX, registry=r,
        )
        self.build_info = Gauge(
            "build_info", "deployd's version.", ["version"], namespace=PREFIX, registry=r,
        )
        self.build_info.labels(version=__version__).set(1)
        self.app_owned = Gauge(
            "app_owned", "1 while this daemon owns the app (runs its supervision), else 0. "
            "With several daemons on one database, exactly one should show 1 per app.",
            ["app"], namespace=PREFIX, registry=r,
        )
        self.ownership_changes_total = Counter(
            "ownership_changes", "Times this daemon took or gave up ownership of the app.",
            ["app"], namespace=PREFIX, registry=r,
        )
        self.database_up = Gauge(
            "database_up", "1 while this daemon reaches its PostgreSQL database on its "
            "ownership connection (always 1 with SQLite).",
            namespace=PREFIX, registry=r,
        )
        self.database_up.set(1)
        self._live_revision: dict[str, str] = {}

    def set_live_revision(self, app: str, revision: str) -> None:
        """Point `release_info` at the app's live revision, dropping the previous series."""
        previous = self._live_revision.get(app)
        if previous == revision:
            return
        if previous is not None:
            self.release_info.remove(app, previous)
        self.release_info.labels(app=app, revision=revision).set(1)
        self._live_revision[app] = revision

    def forget_app(self, app: str) -> None:
        """Drop an app's per-app series (after it left the config)."""
        for metric in (self.branch_pristine, self.paused, self.last_deploy_timestamp_seconds,
                       self.last_rollback_timestamp_seconds, self.rollout_step,
                       self.rollout_paused_timestamp_seconds,
                       self.rescue_job_oldest_pending_timestamp_seconds, self.app_owned):
            drop_series(metric, app)
        for group in ("canary", "baseline"):
            drop_series(self.rollout_hosts, app, group)
        previous = self._live_revision.pop(app, None)
        if previous is not None:
            self.release_info.remove(app, previous)


def drop_series(metric: Gauge, *labels: str) -> None:
    """Remove one series, if it exists."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
