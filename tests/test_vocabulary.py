"""deployd's words: one closed set each, the same everywhere they are written or shown.

The enums replace bare strings without changing a byte of what is stored or served; the
OpenAPI document lists them from the enums; and every event kind the package records is one
of them (read from the source, so a kind added in any module without its enum member fails).
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

from aiohttp import web

import deployd
from deployd import vocabulary
from deployd.openapi import document
from deployd.store import Deploy, Store
from deployd.timefmt import iso_time
from deployd.vocabulary import (
    BakeState,
    DeployKind,
    DeployState,
    EventKind,
    JobState,
    JobStep,
    Trigger,
)

PACKAGE = Path(deployd.__file__).parent


# The store's parameters that take a word, and their annotations: the enums, no bare-string
# copies. `deploys(kind=)` alone also takes the word (checked at run time): recovery passes one.
STORE_WORDS = {
    ("add_event", "kind"): "EventKind",
    ("start_deploy", "kind"): "DeployKind",
    ("start_deploy", "trigger"): "Trigger",
    ("start_deploy", "state"): "DeployState",
    ("update_deploy", "state"): "DeployState | Unset",
    ("update_deploy", "bake_state"): "BakeState | Unset | None",
    ("deploys", "kind"): "DeployKind | None",
    ("deploys", "state"): "DeployState | None",
}


def test_the_store_takes_the_enums() -> None:
    """Store methods are typed to take deployd's words as enums (mypy checks the callers)."""
    found = {(method, name): inspect.signature(getattr(Store, method)).parameters[name].annotation
             for method, name in STORE_WORDS}
    assert found == STORE_WORDS
    assert not any(name.endswith("Name") for name in dir(vocabulary))  # no Literal copies


def test_the_contract_values() -> None:
    """The stored and served values, as DESIGN.md fixes them."""
    assert [*DeployKind] == ["deploy", "rollback", "observed"]
    assert [*DeployState] == ["running", "succeeded", "failed", "interrupted"]
    assert [*BakeState] == ["grace", "baking", "good", "bad", "skipped"]
    assert [*Trigger] == ["branch", "manual", "health", "rescue", "observed"]
    assert [*JobState] == ["pending", "approved", "running", "succeeded", "failed",
                           "rejected", "expired", "superseded"]
    assert [*JobStep] == ["started", "committed", "backed_up", "pushed"]
    assert [state for state in DeployState if state.finished] == [
        "succeeded", "failed", "interrupted"]
    assert [state for state in JobState if state.in_flight] == ["approved", "running"]


def test_every_ending_job_state_has_its_event() -> None:
    """A job ending in any state records `job.<state>`."""
    for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED, JobState.EXPIRED,
                  JobState.SUPERSEDED):
        assert EventKind.job_ended(state) == f"job.{state.value}"


def _record(**words: str) -> Deploy:
    return Deploy(id=7, app="shop", revision="abc", release="20260101000000",
                  previous_release=None, previous_revision=None, actor="ann",
                  started_at=1_700_000_000.25, finished_at=None, error=None,
                  bake_started_at=None, bake_until=None, **words)


async def test_json_is_byte_identical_to_the_bare_words() -> None:
    """json.dumps and aiohttp's json_response write an enum exactly as its bare string."""
    words = {"kind": "rollback", "state": "succeeded", "trigger": "health",
             "bake_state": "grace"}
    bare = _record(**words).to_json()
    typed = _record(kind=DeployKind.ROLLBACK, state=DeployState.SUCCEEDED,
                    trigger=Trigger.HEALTH, bake_state=BakeState.GRACE).to_json()
    assert isinstance(typed["state"], DeployState)
    assert json.dumps(typed) == json.dumps(bare)
    assert json.dumps(typed, sort_keys=True, indent=1) == json.dumps(bare, sort_keys=True,
                                                                     indent=1)
    assert web.json_response(typed).body == web.json_response(bare).body
    assert f"job.{JobState.EXPIRED}" == "job.expired" and str(EventKind.BAKE_FAILED) == (
        "bake.failed")


def test_iso_time() -> None:
    """REST times: UTC, milliseconds, a trailing Z; None stays None."""
    assert iso_time(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"
    assert iso_time(1_700_000_000.0) == "2023-11-14T22:13:20.000Z"
    assert iso_time(None) is None


def test_one_time_helper() -> None:
    """No module but timefmt writes its own REST time format (releases.py writes on-host
    files, whose format is the on-host layout's)."""
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("timefmt.py", "releases.py"):
            continue
        assert "def _iso" not in path.read_text(), path


# -- the OpenAPI document lists the words from the enums --------------------------------------

def test_openapi_lists_every_event_kind() -> None:
    """The Event schema's `kind` allows exactly the EventKind values."""
    kind = document()["components"]["schemas"]["Event"]["properties"]["kind"]
    assert kind["enum"] == [word.value for word in EventKind]
    assert all(type(value) is str for value in kind["enum"])  # plain data, not enum members


def test_openapi_lists_job_and_deploy_words() -> None:
    """Job states and steps, deploy kinds, states, triggers and bake states come from the
    enums; a nullable one lists null too (OpenAPI 3.0.3)."""
    schemas = document()["components"]["schemas"]
    assert schemas["JobState"]["enum"] == [*JobState]
    assert schemas["Job"]["properties"]["step"]["enum"] == [*JobStep, None]
    deploy = schemas["Deploy"]["properties"]
    assert deploy["kind"]["enum"] == [*DeployKind]
    assert deploy["state"]["enum"] == [*DeployState]
    assert deploy["trigger"]["enum"] == [*Trigger]
    assert deploy["bake_state"]["enum"] == [*BakeState, None]
    paths = document()["paths"]
    for path, name in (("deploy", "deploy"), ("rollback", "rollback")):
        answer = paths[f"/api/v1/apps/{{app}}/{path}"]["post"]["responses"]["202"]
        schema = answer["content"]["application/json"]["schema"]
        assert schema["properties"][name] == {"$ref": "#/components/schemas/Deploy"}


# -- every kind the package records is an EventKind --------------------------------------------

# Where each recording call takes its kind: Store.add_event(app, kind, ...) and an app's
# AppContext.event(kind, ...).
RECORDERS = {"add_event": 1, "event": 0}


def _kind_argument(call: ast.Call, position: int) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == "kind":
            return keyword.value
    return call.args[position] if len(call.args) > position else None


def _kind_problem(kind: ast.expr, function: ast.AsyncFunctionDef | ast.FunctionDef | None
                  ) -> str | None:
    """Why `kind` (an add_event argument) is not certainly an EventKind, or None."""
    if isinstance(kind, ast.Constant) and isinstance(kind.value, str):
        return None if kind.value in set(EventKind) else f"{kind.value!r} is no EventKind"
    if isinstance(kind, ast.Attribute) and isinstance(kind.value, ast.Name) \
            and kind.value.id == "EventKind":
        return None if kind.attr in EventKind.__members__ else f"no EventKind.{kind.attr}"
    if isinstance(kind, ast.Call) and isinstance(kind.func, ast.Name) \
            and kind.func.id == "EventKind":
        return None  # EventKind(word) raises for a word that is not one
    if isinstance(kind, ast.Name) and function is not None:
        # A parameter typed EventKind: mypy checks what its callers pass.
        for arg in [*function.args.args, *function.args.kwonlyargs]:
            if arg.arg == kind.id and arg.annotation is not None \
                    and ast.unparse(arg.annotation) == "EventKind":
                return None
    return f"{ast.unparse(kind)} is not certainly an EventKind"


def recorded_kinds(source: str) -> tuple[list[str], list[str]]:
    """The literal kinds passed to `add_event(...)` or `event(...)` in `source`, and the
    problems found."""
    kinds: list[str] = []
    problems: list[str] = []

    def visit(node: ast.AST, function: ast.AsyncFunctionDef | ast.FunctionDef | None) -> None:
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            function = node
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in RECORDERS:
            kind = _kind_argument(node, RECORDERS[node.func.attr])
            if kind is None:
                problems.append(f"line {node.lineno}: {node.func.attr} without a kind")
            else:
                if isinstance(kind, ast.Constant):
                    kinds.append(str(kind.value))
                problem = _kind_problem(kind, function)
                if problem is not None:
                    problems.append(f"line {node.lineno}: {problem}")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(source), None)
    return kinds, problems


def test_every_recorded_kind_is_an_event_kind() -> None:
    """Every `add_event` call in the package (supervisor included) passes an EventKind
    value: a literal that is one, an `EventKind.X`, or a parameter typed EventKind."""
    calls = 0
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        calls += source.count(".add_event(") + source.count(".event(")
        _, found = recorded_kinds(source)
        problems += [f"{path.relative_to(PACKAGE)} {problem}" for problem in found]
    assert calls > 30  # the scan really reads the package
    assert problems == []


def test_the_kind_scan_catches_what_it_must() -> None:
    """The source scan flags a misspelt literal, an unknown member, an f-string and an
    untyped variable, and accepts the three sure forms."""
    source = '''
async def f(store, kind: EventKind, other: str, state) -> None:
    await store.add_event("shop", "deploy.started", "ok")
    await store.add_event("shop", EventKind.BAKE_FAILED, "ok")
    await store.add_event("shop", kind, "ok")
    await store.add_event("shop", kind="app.paused", message="ok")
    await store.add_event("shop", "deploy.strated", "typo")
    await store.add_event("shop", EventKind.BAKE_FAILD, "typo")
    await store.add_event("shop", f"job.{state}", "built")
    await store.add_event("shop", other, "untyped")
'''
    kinds, problems = recorded_kinds(source)
    assert kinds == ["deploy.started", "app.paused", "deploy.strated"]
    assert problems == [
        "line 7: 'deploy.strated' is no EventKind",
        "line 8: no EventKind.BAKE_FAILD",
        "line 9: f'job.{state}' is not certainly an EventKind",
        "line 10: other is not certainly an EventKind",
    ]
