"""The REST server: JSON in and out, bearer tokens with roles, errors as JSON.

Errors always look like `{"error": {"code": "...", "message": "..."}}`: 400 for a body that
is not JSON, 422 for JSON with missing or mistyped fields, 401 without a valid token, 403
without the role, 404 for unknown names, 409 for a state conflict, 413 for a body over its
limit and 408 for one that does not arrive in time (the rest is never read). deployd's own
exceptions are mapped to statuses in one middleware; anything unexpected is logged and
answered with a 500 that reveals nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deployd import openapi
from deployd.config import Token
from deployd.errors import (
    Conflict,
    DeploydError,
    Forbidden,
    GitError,
    Invalid,
    LockHeld,
    NotFound,
    ReleaseError,
)
from deployd.git import check_patch_sizes
from deployd.metrics import Metrics
from deployd.rescue_preview import DEFAULT_CANDIDATES_LIMIT, MAX_CANDIDATES_LIMIT
from deployd.store import Deploy, Job, JobStore, Store
from deployd.supervisor import AppSupervisor
from deployd.vocabulary import JobState

log = logging.getLogger("deployd.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Bounds on what a client may send: the daemon holds every body in memory and a resolved
# patch under the app's mirror lock.
MAX_PATCH_BYTES = 4 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024
MAX_TEXT_CHARS = 1024


@dataclass
class ApiContext:
    """What the REST layer reads and asks to act; filled in by the daemon."""

    store: Store
    metrics: Metrics
    tokens: tuple[Token, ...]
    supervisors: Mapping[str, AppSupervisor]
    metrics_auth: bool = False
    client_timeout: float = 15.0  # to send a request body, once its headers are in
    ready: Callable[[], dict[str, bool]] = field(default=lambda: {"started": True})
    listen: tuple[str, int] = ("127.0.0.1", 8765)
    public_url: str | None = None
    # Several daemons: None if this node runs the app, else (owner node, its advertise URL).
    owner_elsewhere: Callable[[str], Awaitable[tuple[str, str | None] | None]] = field(
        default=lambda name: _runs_here(name))
    # Several daemons: every node on record (GET /api/v1/nodes).
    nodes: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None
    # Several daemons: this node's name, and the session an action for an app another node
    # runs is forwarded with (None: answer 409 instead).
    node: str = ""
    session: aiohttp.ClientSession | None = None


async def _runs_here(name: str) -> tuple[str, str | None] | None:
    return None


CONTEXT = web.AppKey("context", ApiContext)


class ApiError(Exception):
    """An HTTP error with a JSON body."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.close = close  # the connection cannot carry on (a body left unread)


def error_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers=headers)


_DEPLOYD_ERRORS: tuple[tuple[type[DeploydError], int, str], ...] = (
    (NotFound, 404, "not_found"),
    (Forbidden, 403, "forbidden"),
    (LockHeld, 409, "lock_held"),
    (Conflict, 409, "conflict"),
    (Invalid, 422, "invalid"),
    (ReleaseError, 409, "release_conflict"),
    (GitError, 502, "git_error"),
)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error with the right status."""
    try:
        return await handler(request)
    except Forwarded as forwarded:
        return forwarded.response
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message, exc.headers)
        if exc.close:
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"),
                              exc.text or exc.reason, allow)
    except DeploydError as exc:
        for kind, status, code in _DEPLOYD_ERRORS:
            if isinstance(exc, kind):
                return error_response(status, code, str(exc))
        return error_response(502, "failed", str(exc))
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; see the daemon's log")


# -- auth ---------------------------------------------------------------------------------


def authenticate(context: ApiContext, request: web.Request) -> Token:
    """The token presented as `Authorization: Bearer ...`, or a 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "unauthorized", "missing bearer token",
                       {"WWW-Authenticate": 'Bearer realm="deployd"'})
    # aiohttp keeps header bytes that are not UTF-8 as surrogate escapes: hash them as sent.
    digest = hashlib.sha256(secret.strip().encode("utf-8", "surrogateescape")).hexdigest()
    found: Token | None = None
    # Compare against every token, always, so timing says nothing about which matched.
    for token in context.tokens:
        if hmac.compare_digest(digest, token.sha256):
            found = token
    if found is None:
        raise ApiError(401, "unauthorized", "invalid token",
                       {"WWW-Authenticate": 'Bearer realm="deployd", error="invalid_token"'})
    return found


def require(request: web.Request, role: str) -> Token:
    """Authenticate and check the token has `role`; 401 or 403 otherwise."""
    token = authenticate(request.app[CONTEXT], request)
    if role not in token.roles:
        raise ApiError(403, "forbidden", f"token {token.name!r} lacks the {role!r} role")
    return token


# -- request helpers ----------------------------------------------------------------------


async def read_body(request: web.Request, limit: int, what: str) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `limit` bytes, or a 408
    when it takes longer than the client timeout; the rest is never read (the connection is
    closed instead)."""
    too_large = ApiError(413, "too_large", f"{what} is larger than {limit} bytes",
                         close=True)
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    timeout = request.app[CONTEXT].client_timeout
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.read(min(64 * 1024, limit + 1 - size)):
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, "request_timeout", f"{what} did not arrive within {timeout:g}s",
                       close=True) from None
    return b"".join(chunks)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object: empty body is {}, bad JSON 400, non-object 422."""
    raw = await read_body(request, MAX_JSON_BYTES, "the JSON body")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid", "request body must be a JSON object")
    return body


def field_str(body: Mapping[str, Any], name: str, *, required: bool = False,
              pattern: str | None = None) -> str | None:
    """A string field of a JSON body, or a 422 naming the field."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(422, "invalid", f"field {name!r} is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, "invalid", f"field {name!r} must be a non-empty string")
    check_length(name, value)
    if pattern is not None and not re.fullmatch(pattern, value):
        raise ApiError(422, "invalid", f"field {name!r} has an unexpected form: {value!r}")
    return value


def check_length(name: str, value: str) -> None:
    """Text fields end up in events, logs and hook environments: 422 beyond the limit, or
    for text that is not Unicode (JSON's "\\udc80" escapes: a lone surrogate cannot be stored)."""
    if len(value) > MAX_TEXT_CHARS:
        raise ApiError(422, "invalid", f"field {name!r} is longer than {MAX_TEXT_CHARS} "
                       "characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ApiError(422, "invalid", f"field {name!r} is not valid Unicode text "
                       "(a lone surrogate)") from None


def text_field(body: Mapping[str, Any], name: str) -> str:
    """An optional free-text field (a comment): a string, maybe empty, within the limit."""
    value = body.get(name, "")
    if not isinstance(value, str):
        raise ApiError(422, "invalid", f"field {name!r} must be a string")
    check_length(name, value)
    return value


def reject_unknown(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(422, "invalid", f"unknown field(s): {', '.join(unknown)}")


def supervisor(request: web.Request) -> AppSupervisor:
    name = request.match_info["app"]
    found = request.app[CONTEXT].supervisors.get(name)
    if found is None:
        raise ApiError(404, "not_found", f"no app named {name!r}")
    return found


def app_links(name: str) -> dict[str, str]:
    base = f"/api/v1/apps/{name}"
    return {"self": base, "events": f"{base}/events", "deploy": f"{base}/deploy",
            "rollback": f"{base}/rollback", "jobs": f"/api/v1/jobs?app={name}"}


# -- handlers -----------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks = request.app[CONTEXT].ready()
    ready = all(checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    if context.metrics_auth:
        require(request, "read")
    return web.Response(body=generate_latest(context.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(server_url(request)))


_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def server_url(request: web.Request) -> str:
    """The daemon's base URL: `daemon.public_url`, else the `listen` address, where a
    wildcard host or port 0 is taken from the socket this request arrived on."""
    context = request.app[CONTEXT]
    if context.public_url:
        return context.public_url
    host, port = context.listen
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if sockname:
        if host in _ANY_ADDRESS:
            host = str(sockname[0])
        if port == 0:
            port = int(sockname[1])
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def list_nodes(request: web.Request) -> web.Response:
    """The daemons sharing this one's database: name, advertise URL, last seen, whether
    live, apps owned. With SQLite, this daemon alone, owning every app."""
    require(request, "read")
    context = request.app[CONTEXT]
    nodes = [] if context.nodes is None else await context.nodes()
    return web.json_response({"nodes": nodes})


async def list_apps(request: web.Request) -> web.Response:
    require(request, "read")
    apps = []
    for name, sup in sorted(request.app[CONTEXT].supervisors.items()):
        summary = await sup.summary()
        summary["links"] = app_links(name)
        apps.append(summary)
    return web.json_response({"apps": apps})


async def show_app(request: web.Request) -> web.Response:
    require(request, "read")
    sup = supervisor(request)
    # Only the owner probes the app's health and holds connections to its hosts: ask it, and
    # answer from here (the database, this node's mirror) when it cannot be asked.
    with contextlib.suppress(ApiError):
        await check_owner(request, sup.name, b"", within=READ_FORWARD_TIMEOUT)
    detail = await sup.detail()
    detail["links"] = app_links(sup.name)
    return web.json_response(detail)


async def app_events(request: web.Request) -> web.Response:
    require(request, "read")
    sup = supervisor(request)
    since_id, since_time = parse_since(request.query.get("since"))
    limit = parse_limit(request.query.get("limit"))
    events = await request.app[CONTEXT].store.events(sup.name, since_id=since_id,
                                                     since_time=since_time, limit=limit)
    body: dict[str, Any] = {"app": sup.name, "events": [e.to_json() for e in events]}
    # Always a next link, keeping the page size: a client polling by following it must not
    # lose its place when nothing new happened, nor get 500 events after asking for 10.
    query = {"since": str(events[-1].id) if events else request.query.get("since") or "0"}
    if "limit" in request.query:
        query["limit"] = str(limit)
    body["next"] = f"/api/v1/apps/{sup.name}/events?{urlencode(query)}"
    return web.json_response(body)


def decimal(value: str) -> int | None:
    """A non-negative number in ASCII digits that SQLite can hold, else None (str.isdigit
    also accepts '²' or '٣', which int() refuses or reads, and huge ids overflow SQLite)."""
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        return None
    return int(value)


def parse_since(value: str | None) -> tuple[int, float | None]:
    """`?since=` is an event id (`42`) or an ISO time (`2026-11-26T10:00:00Z`)."""
    if value is None or value == "":
        return 0, None
    if value.isdigit():
        number = decimal(value)
        if number is None:
            raise ApiError(422, "invalid", "since must be an event id or an ISO time like "
                           "2026-11-26T10:00:00Z")
        return number, None
    try:
        moment = time.strptime(value.rstrip("Z").split(".")[0], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise ApiError(422, "invalid", "since must be an event id or an ISO time like "
                       "2026-11-26T10:00:00Z") from None
    import calendar
    return 0, float(calendar.timegm(moment))


def parse_limit(value: str | None) -> int:
    if value is None:
        return 500
    number = decimal(value)
    if number is None or not 1 <= number <= 5000:
        raise ApiError(422, "invalid", "limit must be a number from 1 to 5000")
    return number


# Marks a call one node forwarded to another: never forwarded again (a 409 instead).
FORWARDED_BY = "X-Deployd-Forwarded-By"
FORWARD_TIMEOUT = 30.0
READ_FORWARD_TIMEOUT = 5.0
# Headers of the owner's answer passed back to the client.
_FORWARDED_ANSWER_HEADERS = ("Content-Type", "Location", "X-Deployd-Plan", "Retry-After")


class Forwarded(Exception):  # not an error: the owner's answer, passed back
    """The answer of the node that runs the app, to send back as it is."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


async def check_owner(request: web.Request, app: str, body: bytes | None = None, *,
                      within: float = FORWARD_TIMEOUT) -> None:
    """Return if this node runs `app`; else carry the call out on the node that does (its
    answer raised as Forwarded), or 409 naming it when it cannot be forwarded. `body` is the
    request body when the handler has read it already."""
    context = request.app[CONTEXT]
    elsewhere = await context.owner_elsewhere(app)
    if elsewhere is None:
        return
    node, advertise = elsewhere
    if not node:
        raise ApiError(409, "not_owner", f"{app} is owned by no node right now (a node "
                       "takes it over within the failover time); retry shortly")
    if context.session is None or not advertise or FORWARDED_BY in request.headers:
        raise ApiError(409, "not_owner", f"{app} is run by node {node}; send this call to "
                       f"{advertise or 'that node'}")
    if body is None:
        body = await read_body(request, MAX_JSON_BYTES, "the JSON body")
    raise Forwarded(await forward(request, context, app, node, advertise, body, within))


async def forward(request: web.Request, context: ApiContext, app: str, node: str,
                  advertise: str, body: bytes, within: float = FORWARD_TIMEOUT, *,
                  passed: Sequence[str] = ("Authorization", "Content-Type")) -> web.Response:
    """The call, with the caller's bearer token (the `passed` headers), answered by `node`
    at `advertise` within `within` seconds."""
    assert context.session is not None
    headers = {FORWARDED_BY: context.node or "deployd"}
    for name in passed:
        if name in request.headers:
            headers[name] = request.headers[name]
    url = advertise.rstrip("/") + request.rel_url.path_qs
    try:
        async with asyncio.timeout(within), context.session.request(
                request.method, url, data=body, headers=headers,
                allow_redirects=False) as answer:
            payload = await answer.read()
            kept = {name: answer.headers[name] for name in _FORWARDED_ANSWER_HEADERS
                    if name in answer.headers}
            return web.Response(status=answer.status, body=payload, headers=kept)
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ApiError(502, "owner_unreachable", f"{app} is run by node {node}, which did "
                       f"not answer at {advertise}: {reason}") from None


async def app_call(request: web.Request, role: str, fields: set[str]
                   ) -> tuple[Token, AppSupervisor, dict[str, Any]]:
    """An app operation's token (with `role`), app and JSON body of only `fields`."""
    token = require(request, role)
    sup = supervisor(request)
    await check_owner(request, sup.name)
    body = await read_json(request)
    reject_unknown(body, fields)
    return token, sup, body


def started(name: str, record: Deploy, sup: AppSupervisor) -> web.Response:
    """202: the deploy or rollback `record` started; its view under `name`."""
    return web.json_response({name: record.to_json(), "links": app_links(sup.name)},
                             status=202)


async def deploy(request: web.Request) -> web.Response:
    token, sup, body = await app_call(request, "deploy", {"revision", "force"})
    revision = field_str(body, "revision", required=True, pattern=r"[A-Za-z0-9._/\-]{1,200}")
    assert revision is not None
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise ApiError(422, "invalid", "field 'force' must be true or false")
    record = await sup.request_deploy(revision, actor=token.name, force=force)
    return started("deploy", record, sup)


async def rollback(request: web.Request) -> web.Response:
    token, sup, body = await app_call(request, "deploy", {"release", "reason"})
    release = field_str(body, "release", pattern=r"\d{14}")
    reason = field_str(body, "reason") or "requested over REST"
    record = await sup.request_rollback(release, actor=token.name, reason=reason)
    return started("rollback", record, sup)


async def pause(request: web.Request) -> web.Response:
    token, sup, body = await app_call(request, "deploy", {"reason"})
    reason = field_str(body, "reason") or "paused over REST"
    await sup.pause(token.name, reason)
    return web.json_response(await sup.summary())


async def resume(request: web.Request) -> web.Response:
    token, sup, body = await app_call(request, "deploy", {"reason"})
    await sup.resume(token.name, field_str(body, "reason") or "")
    return web.json_response(await sup.summary())


async def promote(request: web.Request) -> web.Response:
    """Continue a rollout: past a pause, a step's bake ended early, a failed step retried."""
    token, sup, _ = await app_call(request, "deploy", set())
    return web.json_response(await sup.promote(token.name))


async def abort(request: web.Request) -> web.Response:
    """Roll a rollout's new hosts back now and quarantine its revision."""
    token, sup, body = await app_call(request, "deploy", {"reason"})
    return web.json_response(await sup.abort(token.name, field_str(body, "reason") or ""),
                             status=202)


# -- rescue jobs --------------------------------------------------------------------------

def job_id(request: web.Request) -> int:
    raw = request.match_info["job"]
    number = decimal(raw)
    if number is None:
        raise ApiError(404, "not_found", f"no rescue job {raw!r}")
    return number


async def load_job(request: web.Request) -> tuple[Job, AppSupervisor]:
    """The job named in the path and the supervisor of its app (404 for either)."""
    context = request.app[CONTEXT]
    job = await JobStore(context.store).get(job_id(request))
    sup = context.supervisors.get(job.app)
    if sup is None or sup.rescue is None:
        raise ApiError(404, "not_found", f"rescue job {job.id} belongs to app {job.app!r}, "
                       "which is not in the current config")
    return job, sup


def string_list(body: Mapping[str, Any], name: str, *, required: bool) -> list[str] | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(422, "invalid", f"field {name!r} is required")
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ApiError(422, "invalid", f"field {name!r} must be a list of commit ids")
    for item in value:
        check_length(name, item)
    return list(value)


def candidate_page(request: web.Request) -> tuple[int, int]:
    """`?candidates_offset=&candidates_limit=`: which candidates a job's view lists."""
    offset, limit = 0, DEFAULT_CANDIDATES_LIMIT
    raw_offset = request.query.get("candidates_offset")
    if raw_offset is not None:
        number = decimal(raw_offset)
        if number is None:
            raise ApiError(422, "invalid", "candidates_offset must be a number from 0")
        offset = number
    raw_limit = request.query.get("candidates_limit")
    if raw_limit is not None:
        number = decimal(raw_limit)
        if number is None or not 1 <= number <= MAX_CANDIDATES_LIMIT:
            raise ApiError(422, "invalid", "candidates_limit must be a number from 1 to "
                           f"{MAX_CANDIDATES_LIMIT}")
        limit = number
    return offset, limit


async def describe_job(request: web.Request, sup: AppSupervisor, job: Job) -> dict[str, Any]:
    """The job's view, with the page of candidates the query asks for."""
    assert sup.rescue is not None
    offset, limit = candidate_page(request)
    return await sup.rescue.describe(job, candidates_offset=offset, candidates_limit=limit)


async def list_jobs(request: web.Request) -> web.Response:
    require(request, "read")
    state = parse_job_state(request.query.get("state"))
    app_name = request.query.get("app")
    context = request.app[CONTEXT]
    if app_name is not None and app_name not in context.supervisors:
        raise ApiError(404, "not_found", f"no app named {app_name!r}")
    jobs = await JobStore(context.store).find(app=app_name, state=state)
    listed = []
    for job in jobs:
        listed.append({"id": job.id, "app": job.app, "state": job.state,
                       "bad_head": job.bad_head, "base": job.base, "plan": job.plan,
                       "ready": bool(job.preview.get("ready")),
                       "selected": job.selection, "requester": job.requester,
                       "changed_by": job.last_changed_by,
                       "reason": job.reason, "error": job.error,
                       "links": {"self": f"/api/v1/jobs/{job.id}",
                                 "patch": f"/api/v1/jobs/{job.id}/patch"}})
    return web.json_response({"jobs": listed})


def parse_job_state(value: str | None) -> JobState | None:
    """`?state=` names one job state, or is absent."""
    if value is None:
        return None
    try:
        return JobState(value)
    except ValueError:
        raise ApiError(422, "invalid",
                       f"state must be one of {', '.join(JobState)}") from None


async def open_job(request: web.Request) -> web.Response:
    token, sup, body = await app_call(request, "deploy", {"commits", "base"})
    commits = string_list(body, "commits", required=True)
    assert commits is not None
    if not commits:
        raise ApiError(422, "invalid", "field 'commits' must name at least one commit")
    base = field_str(body, "base")
    job = await sup.open_job(commits=commits, base=base, actor=token.name)
    assert sup.rescue is not None
    return web.json_response(await describe_job(request, sup, job), status=201,
                             headers={"Location": f"/api/v1/jobs/{job.id}"})


async def show_job(request: web.Request) -> web.Response:
    require(request, "read")
    job, sup = await load_job(request)
    assert sup.rescue is not None
    return web.json_response(await describe_job(request, sup, job))


async def job_patch(request: web.Request) -> web.Response:
    require(request, "read")
    job, sup = await load_job(request)
    assert sup.rescue is not None
    text = await sup.rescue.patch(job)
    # A diff is bytes: content that is not UTF-8 goes out exactly as the repository holds it.
    return web.Response(body=text.encode("utf-8", "surrogateescape"),
                        content_type="text/x-diff", headers={"X-Deployd-Plan": job.plan or ""})


async def put_job_patch(request: web.Request) -> web.Response:
    token = require(request, "approve")
    raw = await read_body(request, MAX_PATCH_BYTES, "the patch")
    check_patch_sizes(raw)  # before any of it reaches libgit2
    job, sup = await load_job(request)
    await check_owner(request, sup.name, raw)
    assert sup.rescue is not None
    text = raw.decode("utf-8", "surrogateescape")  # a diff may hold any bytes
    if not text.strip():
        raise ApiError(422, "invalid", "send the resolved unified diff as the request body")
    job = await sup.rescue.set_resolved_patch(job.id, text, actor=token.name)
    return web.json_response(await describe_job(request, sup, job))


async def job_call(request: web.Request, role: str, fields: set[str]
                   ) -> tuple[Token, Job, AppSupervisor, dict[str, Any]]:
    """A job decision's token (with `role`), job, its app and JSON body of only `fields`."""
    token = require(request, role)
    job, sup = await load_job(request)
    await check_owner(request, sup.name)
    body = await read_json(request)
    reject_unknown(body, fields)
    return token, job, sup, body


async def put_job_selection(request: web.Request) -> web.Response:
    token, job, sup, body = await job_call(request, "approve", {"commits"})
    assert sup.rescue is not None
    commits = string_list(body, "commits", required=True)
    assert commits is not None
    job = await sup.rescue.set_selection(job.id, commits, actor=token.name)
    return web.json_response(await describe_job(request, sup, job))


async def approve_job(request: web.Request) -> web.Response:
    token, job, sup, body = await job_call(request, "approve", {"plan", "comment"})
    plan = field_str(body, "plan", required=True)
    assert plan is not None
    comment = text_field(body, "comment")
    job = await sup.approve_job(job, plan=plan, actor=token.name, comment=comment)
    return web.json_response(await describe_job(request, sup, job), status=202)


async def reject_job(request: web.Request) -> web.Response:
    token, job, sup, body = await job_call(request, "approve", {"comment"})
    assert sup.rescue is not None
    comment = text_field(body, "comment")
    job = await sup.rescue.reject(job.id, actor=token.name, comment=comment)
    return web.json_response(await describe_job(request, sup, job))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/openapi.json", openapi_document)
    app.router.add_get("/api/v1/nodes", list_nodes)
    app.router.add_get("/api/v1/apps", list_apps)
    app.router.add_get("/api/v1/apps/{app}", show_app)
    app.router.add_get("/api/v1/apps/{app}/events", app_events)
    app.router.add_post("/api/v1/apps/{app}/deploy", deploy)
    app.router.add_post("/api/v1/apps/{app}/rollback", rollback)
    app.router.add_post("/api/v1/apps/{app}/pause", pause)
    app.router.add_post("/api/v1/apps/{app}/resume", resume)
    app.router.add_post("/api/v1/apps/{app}/promote", promote)
    app.router.add_post("/api/v1/apps/{app}/abort", abort)
    app.router.add_post("/api/v1/apps/{app}/jobs", open_job)
    app.router.add_get("/api/v1/jobs", list_jobs)
    app.router.add_get("/api/v1/jobs/{job}", show_job)
    app.router.add_get("/api/v1/jobs/{job}/patch", job_patch)
    app.router.add_put("/api/v1/jobs/{job}/patch", put_job_patch)
    app.router.add_put("/api/v1/jobs/{job}/selection", put_job_selection)
    app.router.add_post("/api/v1/jobs/{job}/approve", approve_job)
    app.router.add_post("/api/v1/jobs/{job}/reject", reject_job)


def create_app(context: ApiContext) -> web.Application:
    """The aiohttp application serving the REST API, /metrics and the probes."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_PATCH_BYTES)
    app[CONTEXT] = context
    add_routes(app)
    return app
