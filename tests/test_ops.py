"""The operations files: systemd unit, alert rules and their tests, dashboard, runbook.

Checked with the real tools: `promtool` (Debian's prometheus package) for rules and every
PromQL expression, `systemd-analyze` for the unit. Metric names are checked against the
registry deployd actually builds, and REST calls in the runbook against the REST contract.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from deployd.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
ALERTS = OPS / "alerts.yml"
ALERT_TESTS = OPS / "alerts.test.yml"
DASHBOARD = OPS / "dashboard.json"
RUNBOOK = OPS / "runbook.md"
UNIT = ROOT / "systemd" / "deployd.service"
RUNBOOK_URL = "https://github.com/deployd/deployd/blob/main/ops/runbook.md#"

# Concrete values for Grafana's built-in variables when checking panel queries.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "__interval_ms": "60000",
}

# The REST contract (DESIGN.md, v1): method and path of every call.
REST_CONTRACT = {
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
    ("GET", "/api/v1/apps"), ("GET", "/api/v1/apps/{app}"), ("GET", "/api/v1/nodes"),
    ("GET", "/api/v1/apps/{app}/events"),
    ("POST", "/api/v1/apps/{app}/deploy"), ("POST", "/api/v1/apps/{app}/rollback"),
    ("POST", "/api/v1/apps/{app}/pause"), ("POST", "/api/v1/apps/{app}/resume"),
    ("POST", "/api/v1/apps/{app}/promote"), ("POST", "/api/v1/apps/{app}/abort"),
    ("GET", "/api/v1/jobs"), ("POST", "/api/v1/apps/{app}/jobs"),
    ("GET", "/api/v1/jobs/{id}"), ("GET", "/api/v1/jobs/{id}/patch"),
    ("PUT", "/api/v1/jobs/{id}/patch"), ("PUT", "/api/v1/jobs/{id}/selection"),
    ("POST", "/api/v1/jobs/{id}/approve"), ("POST", "/api/v1/jobs/{id}/reject"),
}
# JSON fields each call accepts (calls not listed take no JSON body).
REST_BODY_FIELDS = {
    "/api/v1/apps/{app}/deploy": {"revision", "force"},
    "/api/v1/apps/{app}/rollback": {"release", "reason"},
    "/api/v1/apps/{app}/pause": {"reason"},
    "/api/v1/apps/{app}/resume": {"reason"},
    "/api/v1/apps/{app}/abort": {"reason"},
    "/api/v1/apps/{app}/jobs": {"commits", "base"},
    "/api/v1/jobs/{id}/selection": {"commits"},
    "/api/v1/jobs/{id}/approve": {"plan", "comment"},
    "/api/v1/jobs/{id}/reject": {"comment"},
}


def tool(name: str) -> str:
    """The path of a command-line tool, or skip the test when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (tests/run.sh installs it)")
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output as text."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


# --- metric names ----------------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_metrics() -> dict[str, set[str]]:
    """Every family deployd registers, mapped to the sample names Prometheus will see."""
    families: dict[str, set[str]] = {}
    for family in Metrics().registry.collect():
        families[family.name] = {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return families


def metric_names_in(promql: str) -> set[str]:
    """The `deployd_*` metric names a PromQL expression reads (string literals ignored)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)
    return set(re.findall(r"\bdeployd_[A-Za-z0-9_]+\b", without_strings))


def test_metric_families_are_prefixed_and_named_by_type() -> None:
    """The registry holds deployd_* families whose sample names follow Prometheus naming."""
    families = exported_metrics()
    assert families, "no metric families collected"
    for name in families:
        assert name.startswith("deployd_"), name


# --- alert rules -----------------------------------------------------------------------


def alert_blocks() -> dict[str, str]:
    """Each alert rule's text in alerts.yml, by alert name (read without a YAML library)."""
    text = ALERTS.read_text()
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\s*- alert: (\w+)\s*$", text, re.M)]
    blocks: dict[str, str] = {}
    for (start, name), (end, _) in zip(starts, [*starts[1:], (len(text), "")], strict=True):
        assert name not in blocks, f"alert {name} defined twice"
        blocks[name] = text[start:end]
    return blocks


EXPECTED_ALERTS = {
    "DeploydDown", "DeploydRollback", "DeploydBadReleaseLive", "DeploydRescueJobWaiting",
    "DeploydBranchNotPristine", "DeploydHostUnhealthy", "DeploydGitFetchFailing",
    "DeploydSSHFailing", "DeploydPausedTooLong", "DeploydNotificationsFailing",
    "DeploydRolloutPausedTooLong", "DeploydAppUnowned", "DeploydDatabaseDown",
}


def test_promtool_check_rules() -> None:
    """`promtool check rules ops/alerts.yml` accepts the alert rules."""
    result = run(tool("promtool"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    """`promtool test rules ops/alerts.test.yml` passes every unit test."""
    result = run(tool("promtool"), "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_are_the_expected_set_with_labels_and_annotations() -> None:
    """Every alert has a severity, summary, description and a runbook_url into the runbook."""
    blocks = alert_blocks()
    assert set(blocks) == EXPECTED_ALERTS
    for name, block in blocks.items():
        assert re.search(r"^\s+severity: (critical|warning)$", block, re.M), name
        assert re.search(r"^\s+summary: \S", block, re.M), name
        assert re.search(r"^\s+description: \S", block, re.M), name
        url = re.search(r"^\s+runbook_url: (\S+)$", block, re.M)
        assert url is not None, name
        assert url.group(1) == RUNBOOK_URL + name.lower(), name


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    """alerts.test.yml has, for each alert, a case where it fires and one where it does not."""
    text = ALERT_TESTS.read_text()
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in text.split("- eval_time:")[1:]:
        name = re.search(r"alertname: (\w+)", case)
        assert name is not None
        if re.search(r"exp_alerts: \[\]", case):
            quiet.add(name.group(1))
        else:
            assert "exp_annotations:" in case and "exp_labels:" in case, name.group(1)
            fires.add(name.group(1))
    assert fires == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


def test_alert_metric_names_exist() -> None:
    """Every deployd_* name the alert rules read is exported by deployd.metrics."""
    exported = set().union(*exported_metrics().values())
    used = metric_names_in(ALERTS.read_text())
    assert used, "no deployd metrics found in the alert rules"
    assert used <= exported, sorted(used - exported)


# --- dashboard -------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    """The dashboard JSON."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def template_names(board: dict[str, Any]) -> set[str]:
    """The names of the dashboard's template variables."""
    return {var["name"] for var in board["templating"]["list"]}


def substitute(expr: str, variables: set[str]) -> str:
    """A Grafana query with its variables replaced by concrete values.

    Built-in intervals become durations; the dashboard's own variables (used in regex
    matchers such as `app=~"$app"`) become `.*`. An unknown variable is left as it is, so
    promtool rejects the expression.
    """

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        if name in variables:
            return ".*"
        return match.group(0)

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def dashboard_queries(board: dict[str, Any]) -> dict[str, str]:
    """Every PromQL expression in the dashboard, by where it is, variables substituted."""
    variables = template_names(board)
    queries: dict[str, str] = {}
    for panel in all_panels(board["panels"]):
        for target in panel.get("targets", []):
            key = f"panel_{panel['id']}_{target['refId']}"
            queries[key] = substitute(target["expr"], variables)
    for i, annotation in enumerate(board["annotations"]["list"]):
        if "expr" in annotation:
            queries[f"annotation_{i}"] = substitute(annotation["expr"], variables)
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert found is not None, f"variable {var['name']}: unsupported query {query!r}"
        queries[f"variable_{var['name']}"] = substitute(found.group(1), variables)
    return queries


def test_dashboard_structure() -> None:
    """The dashboard parses; every panel has a unique id, a title, a datasource, a target."""
    board = dashboard()
    assert board["title"] and board["uid"]
    assert 36 <= board["schemaVersion"] <= 41
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert "app" in variables
    assert "deployd_" in json.dumps(variables["app"]["query"])
    ids: list[int] = []
    for panel in all_panels(board["panels"]):
        ids.append(panel["id"])
        assert panel.get("title"), panel["id"]
        assert panel.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}", panel["title"]
        assert panel.get("targets"), panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), (panel["title"], target["refId"])
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_dashboard_covers_the_required_views() -> None:
    """The dashboard shows deploys, rollouts, rollbacks, durations, health, rescue, errors."""
    exprs = " ".join(dashboard_queries(dashboard()).values())
    for needle in (
        "deployd_deploys_total", "deployd_bake_verdicts_total", "deployd_rollbacks_total",
        "histogram_quantile(0.9, sum by (app, le) (rate(deployd_deploy_duration_seconds_bucket",
        "deployd_rollback_duration_seconds_bucket", "deployd_host_healthy",
        "deployd_rescue_jobs", "deployd_rescue_job_oldest_pending_timestamp_seconds",
        "deployd_branch_pristine", "deployd_paused", "deployd_health_checks_total",
        "deployd_git_fetch_errors_total", "deployd_ssh_errors_total", "deployd_release_info",
        "deployd_rollout_step", 'deployd_rollout_hosts{', "by (app, group)",
        "sum by (app, verdict) (increase(deployd_analysis_verdicts_total",
        "time() - deployd_rollout_paused_timestamp_seconds",
    ):
        assert needle in exprs, needle


def test_dashboard_promql_is_valid(tmp_path: Path) -> None:
    """Every dashboard query, variables substituted, passes `promtool check rules`."""
    promtool = tool("promtool")
    queries = dashboard_queries(dashboard())
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:{key}", "expr": expr} for key, expr in sorted(queries.items())
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules, indent=2))  # JSON is YAML
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_substitute_leaves_unknown_variables_for_promtool_to_reject() -> None:
    """Known variables are replaced; an unknown one stays, so a typo cannot pass."""
    assert substitute('rate(x{app=~"$app"}[$__rate_interval])', {"app"}) == (
        'rate(x{app=~".*"}[1m])')
    assert substitute('x{app=~"${app}"}[$__range]', {"app"}) == 'x{app=~".*"}[1h]'
    assert "$aap" in substitute('x{app=~"$aap"}', {"app"})


def test_dashboard_metric_names_exist_and_cover_every_family() -> None:
    """Dashboard metric names exist in deployd.metrics, and every family is on it."""
    families = exported_metrics()
    exported = set().union(*families.values())
    used: set[str] = set()
    for expr in dashboard_queries(dashboard()).values():
        used |= metric_names_in(expr)
    assert used <= exported, sorted(used - exported)
    unshown = sorted(name for name, samples in families.items() if not samples & used)
    assert not unshown, f"metric families missing from the dashboard: {unshown}"


# --- runbook ---------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    anchor = heading.strip().lower()
    anchor = re.sub(r"[^\w\- ]", "", anchor)
    return anchor.replace(" ", "-")


def runbook_anchors() -> set[str]:
    """The anchors of every heading in the runbook."""
    text = RUNBOOK.read_text()
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_runbook_has_a_section_per_alert_and_links_resolve() -> None:
    """Each alert's runbook anchor exists, and every in-page link in the runbook resolves."""
    anchors = runbook_anchors()
    for name in EXPECTED_ALERTS:
        assert name.lower() in anchors, name
    text = RUNBOOK.read_text()
    for link in re.findall(r"\]\(#([^)]+)\)", text):
        assert link in anchors, link


def runbook_curl_calls() -> list[str]:
    """Every curl command in the runbook's code blocks, continuation lines joined."""
    text = RUNBOOK.read_text().replace("\\\n", " ")
    calls = []
    for block in re.findall(r"```(?:sh|bash)?\n(.*?)```", text, re.S):
        for line in block.splitlines():
            calls.extend(m.group(0).strip() for m in re.finditer(r"\bcurl\s.*", line))
    return calls


def contract_route(method: str, path: str) -> str | None:
    """The contract's path pattern matching a concrete call, if any."""
    for want_method, pattern in REST_CONTRACT:
        regex = re.sub(r"\\\{\w+\\\}", r"[^/]+", re.escape(pattern))
        if method == want_method and re.fullmatch(regex, path):
            return pattern
    return None


def test_runbook_curl_calls_follow_the_rest_contract() -> None:
    """Every curl call in the runbook uses a contract route, a token and known body fields."""
    calls = [c for c in runbook_curl_calls() if "127.0.0.1:8765" in c]
    assert len(calls) >= 20, calls
    seen: set[str] = set()
    for call in calls:
        url = re.search(r"http://127\.0\.0\.1:8765(/[^\s'\"?]*)", call)
        assert url is not None, call
        method_flag = re.search(r"-X (\w+)", call)
        method = method_flag.group(1) if method_flag else "GET"
        route = contract_route(method, url.group(1))
        assert route is not None, f"not in the REST contract: {method} {url.group(1)}"
        seen.add(route)
        if route.startswith("/api/"):
            assert '-H "Authorization: Bearer $DEPLOYD_TOKEN"' in call, call
        body = re.search(r"-d '([^']*)'|-d \"((?:[^\"\\]|\\.)*)\"", call)
        if body is not None:
            raw = body.group(1) if body.group(1) is not None else body.group(2)
            raw = re.sub(r"\$\w+", "x", raw.replace('\\"', '"'))
            fields_sent = set(json.loads(raw))
            assert fields_sent <= REST_BODY_FIELDS.get(route, set()), (call, fields_sent)
    for needed in ("/api/v1/jobs", "/api/v1/jobs/{id}", "/api/v1/jobs/{id}/approve",
                   "/api/v1/jobs/{id}/reject", "/api/v1/apps/{app}/rollback",
                   "/api/v1/apps/{app}/pause", "/api/v1/apps/{app}/resume",
                   "/api/v1/apps/{app}/events", "/api/v1/apps/{app}/promote",
                   "/api/v1/apps/{app}/abort"):
        assert needed in seen, needed


def test_rollout_events_and_metrics_are_documented() -> None:
    """README names every rollout event kind and metric; the runbook tells a paused rollout."""
    from deployd.vocabulary import EventKind

    readme = (ROOT / "README.md").read_text()
    kinds = [kind.value for kind in EventKind if kind.value.startswith("rollout.")]
    assert kinds
    for kind in kinds:
        assert f"`{kind}`" in readme, kind
    for name in exported_metrics():
        if "rollout" in name or "analysis" in name:
            assert name in readme, name
    anchors = runbook_anchors()
    assert {"a-rollout-is-paused", "a-rollout-was-rolled-back"} <= anchors


# --- systemd unit ----------------------------------------------------------------------


def unit_settings() -> dict[str, dict[str, list[str]]]:
    """The unit file as section -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """A systemd time span such as `90s`, `2min` or `1min 30s`, in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_unit_has_the_required_settings() -> None:
    """Type=notify, watchdog, reload, restart, own user, state dir and the hardening set."""
    service = unit_settings()["Service"]

    def one(key: str) -> str:
        assert key in service, f"{key}= missing"
        return service[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert seconds(one("WatchdogSec")) == 30
    assert one("User") == one("Group") == "deployd"
    assert one("StateDirectory") == "deployd"
    assert one("ConfigurationDirectory") == "deployd"
    assert one("UMask") == "0077"
    assert one("CapabilityBoundingSet") == ""
    assert one("RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    assert one("ProtectSystem") == "strict"
    assert "@system-service" in service["SystemCallFilter"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "RestrictNamespaces", "LockPersonality",
                "MemoryDenyWriteExecute"):
        assert one(key) == "yes", key


def test_unit_stop_timeout_outlasts_the_shutdown_grace() -> None:
    """TimeoutStopSec leaves room after daemon.shutdown_grace for in-flight steps to end."""
    from deployd.config import DaemonConfig

    grace = next(f.default for f in fields(DaemonConfig) if f.name == "shutdown_grace")
    assert isinstance(grace, float)
    stop = seconds(unit_settings()["Service"]["TimeoutStopSec"][-1])
    assert stop >= grace + 30, (stop, grace)


def test_unit_exec_start_is_a_valid_deployd_command_line() -> None:
    """ExecStart runs `deployd run --config /etc/deployd/deployd.toml` as the CLI parses it."""
    from deployd.cli import build_parser

    argv = unit_settings()["Service"]["ExecStart"][-1].split()
    assert Path(argv[0]).name == "deployd"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.config == "/etc/deployd/deployd.toml"
    assert Path(args.config).parent.name == unit_settings()["Service"]["ConfigurationDirectory"][0]


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit copied to a temp dir with ExecStart pointed at an executable that exists.

    `systemd-analyze verify` fails when ExecStart's binary is missing, and deployd is not
    installed at /usr/local/bin on a test machine; every other line stays as shipped.
    """
    text = UNIT.read_text()
    rewritten, count = re.subn(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M)
    assert count == 1
    path = tmp_path / "deployd.service"
    path.write_text(rewritten)
    return path


_OTHER_UNIT = re.compile(
    r"^(?:/\S+/)?(?P<name>[\w@:.\\-]+\.(?:service|socket|target|mount|automount|swap|timer"
    r"|path|slice|scope|device))[:\s]"
)


def own_complaints(stderr: str, unit_name: str) -> list[str]:
    """stderr lines of `systemd-analyze verify` that are about our unit (or about nothing).

    verify also loads the units ours pulls in (network-online.target, multi-user.target and
    what they want), and a machine's own broken units print warnings we do not own. A line
    that starts with another unit's name or path is that noise; every other line, including
    any naming our file, is a complaint about our unit.
    """
    complaints = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        other = _OTHER_UNIT.match(line)
        if other is not None and other.group("name") != unit_name:
            continue
        complaints.append(line)
    return complaints


def test_systemd_analyze_verify_is_clean(verifiable_unit: Path) -> None:
    """`systemd-analyze verify` exits 0 and prints nothing about the unit's own keys."""
    result = run(tool("systemd-analyze"), "verify", str(verifiable_unit))
    complaints = own_complaints(result.stderr, verifiable_unit.name)
    assert result.returncode == 0 and not complaints, result.stderr


def test_verify_check_catches_bad_keys(verifiable_unit: Path) -> None:
    """The stderr filter still reports an unknown key and a bad value in our unit."""
    broken = verifiable_unit.read_text().replace(
        "[Service]\n", "[Service]\nProtectSystm=strict\nRestartSec=soon\n", 1)
    verifiable_unit.write_text(broken)
    result = run(tool("systemd-analyze"), "verify", str(verifiable_unit))
    complaints = own_complaints(result.stderr, verifiable_unit.name)
    assert any("ProtectSystm" in line for line in complaints), result.stderr
    assert any("soon" in line or "RestartSec" in line for line in complaints), result.stderr


def test_systemd_analyze_security_exposure(verifiable_unit: Path) -> None:
    """`systemd-analyze security --offline=yes` rates the unit's exposure at 2.0 or lower."""
    result = run(tool("systemd-analyze"), "security", "--offline=yes", str(verifiable_unit))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    score = float(found.group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= 2.0, result.stdout


# --- MemoryDenyWriteExecute= against deployd's libraries ---------------------------------

# Loads a seccomp filter equivalent to systemd's MemoryDenyWriteExecute=yes (mmap of memory
# both writable and executable, mprotect/pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC
# all fail with EPERM), proves it is active, then exercises what deployd runs: every deployd
# module, pygit2 fetching through its cffi callbacks, cryptography, asyncssh over loopback,
# aiohttp client and server.
_MDWX_SCRIPT = textwrap.dedent('''
    import ctypes, mmap, sys

    lib = ctypes.CDLL(sys.argv[1], use_errno=True)

    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(Cmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ALLOW, EPERM, MASKED_EQ = 0x7FFF0000, 0x00050000 | 1, 7
    PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
    ctx = lib.seccomp_init(ALLOW)
    for name, arg, mask in (("mmap", 2, PROT_WRITE | PROT_EXEC), ("mprotect", 2, PROT_EXEC),
                            ("pkey_mprotect", 2, PROT_EXEC), ("shmat", 2, SHM_EXEC)):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        rule = (Cmp * 1)(Cmp(arg, MASKED_EQ, mask, mask))
        assert lib.seccomp_rule_add_array(ctx, EPERM, nr, 1, rule) == 0
    assert lib.seccomp_load(ctx) == 0
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        raise SystemExit("the filter is not active")

    import asyncio, importlib, pathlib, pkgutil, sqlite3
    import aiohttp, asyncssh, prometheus_client, pygit2, tenacity
    from aiohttp import web
    from cryptography.hazmat.primitives.asymmetric import ed25519
    import deployd

    for module in pkgutil.iter_modules(deployd.__path__):
        try:
            importlib.import_module("deployd." + module.name)
        except ModuleNotFoundError as exc:  # a sibling module not written yet, not a load error
            if not (exc.name or "").startswith("deployd."):
                raise
    sqlite3.connect(":memory:").execute("pragma journal_mode=wal")

    ed25519.Ed25519PrivateKey.generate().sign(b"deployd")

    tmp = pathlib.Path.cwd()  # the test's own tmp_path: nothing left in /tmp
    origin = pygit2.init_repository(str(tmp / "origin"), bare=True)
    sig = pygit2.Signature("deployd", "deployd@example.com")
    tree = origin.TreeBuilder()
    tree.insert("REVISION", origin.create_blob(b"x\\n"), pygit2.GIT_FILEMODE_BLOB)
    commit = origin.create_commit("refs/heads/production", sig, sig, "one", tree.write(), [])
    mirror = pygit2.init_repository(str(tmp / "mirror"), bare=True)
    remote = mirror.remotes.create("origin", str(tmp / "origin"), "+refs/*:refs/*")
    calls = []

    class Callbacks(pygit2.RemoteCallbacks):
        def transfer_progress(self, stats):
            calls.append(stats)

    remote.fetch(callbacks=Callbacks())
    assert mirror.revparse_single("refs/heads/production").id == commit and calls

    async def network():
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")

        async def answer(process):
            process.stdout.write("ok\\n")
            process.exit(0)

        server = await asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[host_key], process_factory=answer,
            authorized_client_keys=asyncssh.import_authorized_keys(
                client_key.export_public_key().decode()))
        port = server.sockets[0].getsockname()[1]
        for cipher in ("chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com"):
            async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="d",
                                        client_keys=[client_key],
                                        encryption_algs=[cipher]) as conn:
                assert (await conn.run("true")).stdout == "ok\\n"
        server.close()
        app = web.Application()
        app.router.add_get("/healthz", lambda request: web.Response(text="ok"))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert await response.text() == "ok"
        await runner.cleanup()

    asyncio.run(network())
    print("MDWX OK")
''')


def test_stack_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """deployd's libraries work under a MemoryDenyWriteExecute-equivalent seccomp filter."""
    libseccomp = ctypes.util.find_library("seccomp")
    if libseccomp is None:
        pytest.skip("libseccomp is not installed (it comes with systemd)")
    script = tmp_path / "mdwx.py"
    script.write_text(_MDWX_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "daemon"), *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, str(script), libseccomp], capture_output=True,
                            text=True, timeout=120, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0 and "MDWX OK" in result.stdout, result.stdout + result.stderr
