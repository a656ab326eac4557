"""The OpenAPI 3 description of deployd's REST API, served at `/api/v1/openapi.json`.

A test checks that every route the server registers is described here and nothing else, so
the document cannot drift from the code; the closed sets of words (event kinds, job and
deploy states...) are listed from `deployd.vocabulary`, for the same reason.
"""

from __future__ import annotations

import enum
from typing import Any

from deployd import __version__
from deployd.vocabulary import (
    BakeState,
    DeployKind,
    DeployState,
    EventKind,
    JobState,
    JobStep,
    Trigger,
)


def _words(words: type[enum.StrEnum], *, nullable: bool = False) -> dict[str, Any]:
    """A string schema allowing exactly `words` (and null, if `nullable`)."""
    values: list[str | None] = [word.value for word in words]
    if nullable:
        # OpenAPI 3.0.3: with `nullable`, an `enum` must list null itself to allow it.
        return {"type": "string", "nullable": True, "enum": [*values, None]}
    return {"type": "string", "enum": values}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    meaning = {400: "body is not valid JSON", 401: "no or bad bearer token",
               403: "the token lacks the role, or a rule forbids this actor",
               404: "unknown app or job",
               409: "state conflict (busy, stale plan, not pending), or the app is run by "
                    "another node (code not_owner; the message names it and its URL)",
               408: "body not sent within the client timeout",
               413: "body over its size limit", 422: "missing or mistyped fields",
               502: "forwarded to the node that runs the app, which did not answer "
                    "(code owner_unreachable)",
               503: "not ready"}
    return {str(code): {"description": meaning[code], **_json(_ref("Error"))} for code in codes}


def _op(summary: str, role: str | None, ok: int, schema: dict[str, Any] | None,
        *errors: int, body: dict[str, Any] | None = None,
        parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {str(ok): {"description": "OK", **(_json(schema) if schema else {})},
                      **_errors(*errors)},
    }
    if role is None:
        operation["security"] = []
    else:
        operation["x-deployd-role"] = role
        operation["description"] = f"Needs a token with the `{role}` role."
    if role in ("deploy", "approve"):  # an action: carried out by the node running the app
        operation["responses"].update(_errors(502))
    if body is not None:
        operation["requestBody"] = body
        operation["responses"].update(_errors(408, 413))
    if parameters:
        operation["parameters"] = parameters
    return operation


_APP = {"name": "app", "in": "path", "required": True, "schema": {"type": "string"}}
_JOB = {"name": "job", "in": "path", "required": True, "schema": {"type": "integer"}}
_CANDIDATE_PAGE = [  # the other calls answering with a Job take them too
    {"name": "candidates_offset", "in": "query", "description": "first candidate listed",
     "schema": {"type": "integer", "minimum": 0, "default": 0}},
    {"name": "candidates_limit", "in": "query", "description": "candidates listed at most",
     "schema": {"type": "integer", "minimum": 1, "maximum": 5000, "default": 500}}]
_OBJECT = {"type": "object", "additionalProperties": True}


def _json_body(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": False}
    if required:
        schema["required"] = required
    return {"required": bool(required), **_json(schema)}


def _paths() -> dict[str, Any]:
    string = {"type": "string"}
    # What the server checks, said in the schema: free text up to 1 KiB, a required value
    # not blank, commit ids non-empty, a revision in the characters a ref name may use.
    text = {"type": "string", "maxLength": 1024}
    filled = {"type": "string", "minLength": 1, "maxLength": 1024, "pattern": r"\S"}
    optional = {**filled, "nullable": True}  # null reads as absent
    commits = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 1024}}
    revision = {"type": "string", "pattern": r"^[A-Za-z0-9._/\-]{1,200}$"}
    filled_diff = {"type": "string", "pattern": r"\S"}
    return {
        "/healthz": {"get": _op("Liveness", None, 200, _OBJECT)},
        "/readyz": {"get": _op("Readiness: config, store, mirrors fetched", None, 200,
                               _OBJECT, 503)},
        "/metrics": {"get": {"summary": "Prometheus metrics (text format)", "security": [],
                             "responses": {"200": {"description": "OK", "content": {
                                 "text/plain": {"schema": string}}}}}},
        "/api/v1/openapi.json": {"get": _op("This document", None, 200, _OBJECT)},
        "/api/v1/nodes": {"get": _op(
            "The daemons sharing this one's database and the apps each owns (with SQLite, "
            "this daemon alone, owning every app)", "read", 200,
            {"type": "object", "properties": {"nodes": {"type": "array", "items": {
                "type": "object", "properties": {
                    "name": string, "advertise": {"type": "string", "nullable": True},
                    "last_seen": {"type": "number", "description": "Unix time"},
                    "live": {"type": "boolean", "description":
                             "seen within the failover time"},
                    "apps": {"type": "array", "items": string}}}}}},
            401, 403)},
        "/api/v1/apps": {"get": _op("Every app: head, live, last good, pristine, health, "
                                    "paused", "read", 200,
                                    {"type": "object", "properties": {
                                        "apps": {"type": "array", "items": _ref("App")}}},
                                    401, 403)},
        "/api/v1/apps/{app}": {"get": _op("One app with each host's release and health",
                                          "read", 200, _ref("App"), 401, 403, 404,
                                          parameters=[_APP])},
        "/api/v1/apps/{app}/events": {"get": _op(
            "The app's timeline", "read", 200,
            {"type": "object", "properties": {
                "events": {"type": "array", "items": _ref("Event")}, "next": string}},
            401, 403, 404, 422, parameters=[
                _APP,
                {"name": "since", "in": "query", "schema": string,
                 "description": "an event id, or an ISO time like 2026-11-26T10:00:00Z"},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 5000}}])},
        "/api/v1/apps/{app}/deploy": {"post": _op(
            "Deploy a revision now", "deploy", 202, _started("deploy"),
            400, 401, 403, 404, 409, 422,
            body=_json_body({
                "revision": {**revision, "description":
                             "a full sha, an unambiguous abbreviation (4+ hex digits, never a "
                             "ref), a full ref name (refs/...) or a branch or tag name"},
                "force": {"type": "boolean", "default": False, "description":
                          "needed to deploy a quarantined revision, or one not on the "
                          "watched branch; recorded on the deploy as `forced`"}},
                ["revision"]), parameters=[_APP])},
        "/api/v1/apps/{app}/rollback": {"post": _op(
            "Roll back to the previous (or a named) release", "deploy", 202,
            _started("rollback"), 400, 401, 403, 404, 409, 422,
            body=_json_body({"release": {"type": "string", "pattern": "^[0-9]{14}$",
                                         "nullable": True},
                             "reason": optional}), parameters=[_APP])},
        "/api/v1/apps/{app}/pause": {"post": _op(
            "Stop automatic deploys and rollbacks", "deploy", 200, _ref("App"),
            400, 401, 403, 404, 422, body=_json_body({"reason": optional}), parameters=[_APP])},
        "/api/v1/apps/{app}/resume": {"post": _op(
            "Restart automatic deploys and rollbacks", "deploy", 200, _ref("App"),
            400, 401, 403, 404, 422, body=_json_body({"reason": optional}), parameters=[_APP])},
        "/api/v1/apps/{app}/promote": {"post": _op(
            "Continue the rollout: past a pause step, or end the step's bake early (a step "
            "that failed to switch is retried)", "deploy", 200, _ref("App"),
            400, 401, 403, 404, 409, 422, body=_json_body({}), parameters=[_APP])},
        "/api/v1/apps/{app}/abort": {"post": _op(
            "Stop the rollout: its new hosts go back to last good, the revision is "
            "quarantined", "deploy", 202, _ref("App"),
            400, 401, 403, 404, 409, 422, body=_json_body({"reason": optional}),
            parameters=[_APP])},
        "/api/v1/apps/{app}/jobs": {"post": _op(
            "Open a rescue job by hand", "deploy", 201, _ref("Job"), 400, 401, 403, 404, 409,
            422, body=_json_body({"commits": {**commits, "minItems": 1}, "base": optional},
                                ["commits"]),
            parameters=[_APP])},
        "/api/v1/jobs": {"get": _op(
            "Rescue jobs", "read", 200,
            {"type": "object", "properties": {"jobs": {"type": "array", "items": {
                "type": "object", "additionalProperties": True,
                "properties": {"state": _ref("JobState")}}}}},
            401, 403, 404, 422, parameters=[
                {"name": "state", "in": "query", "schema": _ref("JobState")},
                {"name": "app", "in": "query", "schema": string}])},
        "/api/v1/jobs/{job}": {"get": _op(
            "One rescue job, its candidates a page at a time", "read", 200, _ref("Job"),
            401, 403, 404, 422, parameters=[_JOB, *_CANDIDATE_PAGE])},
        "/api/v1/jobs/{job}/patch": {
            "get": {"summary": "The combined change that would land, as a unified diff",
                    "x-deployd-role": "read", "parameters": [_JOB],
                    "responses": {"200": {"description": "OK", "content": {
                        "text/x-diff": {"schema": string}}}, **_errors(401, 403, 404)}},
            "put": _op("Upload a hand-resolved unified diff (curl --data-binary @fix.patch)",
                       "approve", 200, _ref("Job"), 400, 401, 403, 404, 409, 422,
                       body={"required": True, "content": {"text/x-diff": {"schema": filled_diff}}},
                       parameters=[_JOB]),
        },
        "/api/v1/jobs/{job}/selection": {"put": _op(
            "Choose which candidates to transplant", "approve", 200, _ref("Job"),
            400, 401, 403, 404, 409, 422, body=_json_body({"commits": commits}, ["commits"]),
            parameters=[_JOB])},
        "/api/v1/jobs/{job}/approve": {"post": _op(
            "Start the transplant of exactly this plan", "approve", 202, _ref("Job"),
            400, 401, 403, 404, 409, 422,
            body=_json_body({"plan": filled, "comment": text}, ["plan"]),
            parameters=[_JOB])},
        "/api/v1/jobs/{job}/reject": {"post": _op(
            "End the job without transplanting", "approve", 200, _ref("Job"),
            400, 401, 403, 404, 409, 422, body=_json_body({"comment": text}),
            parameters=[_JOB])},
    }


def _started(name: str) -> dict[str, Any]:
    """The answer to a deploy or rollback request: the record just started, and links."""
    return {"type": "object", "properties": {name: _ref("Deploy"), "links": _OBJECT}}


def _deploy(*, nullable: bool = False) -> dict[str, Any]:
    """A deploy record (a deploy, a rollback or an observed release)."""
    string, text = {"type": "string"}, {"type": "string", "nullable": True}
    schema: dict[str, Any] = {"type": "object", "additionalProperties": True, "properties": {
        "id": {"type": "integer"}, "kind": _words(DeployKind), "revision": string,
        "release": text, "previous_release": text, "previous_revision": text,
        "state": _words(DeployState), "trigger": _words(Trigger), "actor": string,
        "started_at": string, "finished_at": text, "error": text,
        "bake_state": _words(BakeState, nullable=True), "bake_until": text, "forced": text}}
    if nullable:
        schema["nullable"] = True
    return schema


def _schemas() -> dict[str, Any]:
    string, nullable = {"type": "string"}, {"type": "string", "nullable": True}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": string, "message": string}}}},
        "App": {"type": "object", "additionalProperties": True, "properties": {
            "name": string, "mode": {"type": "string", "enum": ["deploy", "observe"]},
            "branch": string, "head": nullable, "pristine": {"type": "boolean"},
            "deployed": {"type": "object", "nullable": True},
            "last_good": {"type": "object"}, "paused": {"type": "object", "nullable": True},
            "health": {"type": "object"}, "latest": _deploy(nullable=True),
            "links": {"type": "object"},
            "rollout": {**_ref("Rollout"), "nullable": True}}},
        "Deploy": _deploy(),
        "Rollout": {"type": "object", "additionalProperties": True, "properties": {
            "deploy": {"type": "integer"}, "revision": string, "release": nullable,
            "step": {"type": "integer", "description": "1-based"},
            "steps": {"type": "integer"},
            "state": {"type": "string", "enum": ["running", "paused", "baking", "done",
                                                 "aborted", "rolled_back"]},
            "reason": nullable,
            "hosts": {"type": "object", "description": "canary: on the new release; "
                      "baseline: still on last good (both empty once it is over)"},
            "plan": {"type": "array", "items": {"type": "object"}},
            "analysis": {"type": "object", "nullable": True, "description":
                         "the compare judge's work: per check and measure the two groups' "
                         "figures, the test, its p-value and verdict (pass, fail, "
                         "inconclusive)"},
            "compare": {"type": "boolean"}}},
        "Event": {"type": "object", "properties": {
            "id": {"type": "integer"}, "at": string, "actor": string,
            "kind": {**_words(EventKind), "description": "what happened; `[[notify]] events` "
                     "patterns match these"},
            "revision": nullable, "message": string, "data": {
                "type": "object",
                "description": "Depends on the kind. deploy.succeeded and rollback.succeeded "
                               "carry `output`: host -> hook -> the last lines the hook "
                               "printed, when it printed any."}}},
        "JobState": _words(JobState),
        "Job": {"type": "object", "additionalProperties": True, "properties": {
            "id": {"type": "integer"}, "app": string, "state": _ref("JobState"),
            "base": {"type": "object"}, "bad_head": string, "plan": nullable,
            "ready": {"type": "boolean"}, "blocked_by": nullable,
            "candidates_total": {"type": "integer"}, "candidates_offset": {"type": "integer"},
            "selection": {"type": "array", "items": string},
            "candidates": {"type": "array", "items": {"type": "object", "properties": {
                "sha": string, "summary": string, "author": string,
                "selected": {"type": "boolean"}, "applies_cleanly": {"type": "boolean"},
                "conflicting_paths": {"type": "array", "items": string},
                "applies_on": {"type": "string", "enum": ["base", "selection"],
                               "description": "base: tried alone on the base (unselected); "
                                              "selection: after the selected commits before "
                                              "it"}}}},
            "step": {**_words(JobStep, nullable=True),
                     "description": "how far an approved job's transplant got"},
            "requester": string, "changed_by": string, "resolved_patch": {"type": "boolean"},
            "resolved_by": nullable,
            "extra_paths": {"type": "array", "items": string,
                            "description": "paths the resolved patch touches that the "
                                           "selected commits do not"},
            "beyond_commits": {"type": "boolean",
                               "description": "the resolved patch brings in content the "
                                              "selected commits do not contain"},
            "approvals": {"type": "array", "items": {"type": "object"}},
            "log": {"type": "array", "items": _ref("Event")}, "links": {"type": "object"}}},
    }


def document(server_url: str = "http://127.0.0.1:8765") -> dict[str, Any]:
    """The whole OpenAPI 3.0 document, naming `server_url` as the server."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "deployd", "version": __version__,
                 "description": "Deploys, rollbacks and approved rescue jobs. JSON in and out; "
                                "errors are {\"error\": {\"code\", \"message\"}}."},
        "servers": [{"url": server_url}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
        },
    }
