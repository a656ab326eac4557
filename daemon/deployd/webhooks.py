"""Pushes announced by the git server: `POST /hooks/{app}` makes the app fetch now.

No bearer token: the request proves itself with the app's shared secret, as GitHub and Gitea
sign (`X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`, Gitea's older
`X-Gitea-Signature: <hex>`) or as GitLab sends it (`X-Gitlab-Token`). Everything is checked
before the body is trusted: the app and its webhook (one 404 for both, so names cannot be
probed), the size (413 without reading further), the signature (401), and only then the JSON.

A push to the watched branch answers 202 and asks the supervisor for a fetch; requests that
arrive while one is pending or running coalesce into the next one, so a burst costs a
fetch or two, never one per request. Polling stays as the safety net.

With several daemons on one database the push may reach a node that does not run the app.
That node checks the signature itself and forwards only a verified push to the watched
branch, body and signature as they came, to the owner's `advertise` URL (marked
`X-Deployd-Forwarded-By`, as forwarded REST calls are); the owner checks it again, fetches at
once, and its answer goes back to the git server. A forwarded push is never forwarded again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

from aiohttp import ClientPayloadError, web

from deployd.api import CONTEXT, FORWARDED_BY, ApiError, forward, read_body
from deployd.config import WebhookConfig
from deployd.errors import StoreError
from deployd.metrics import Metrics
from deployd.supervisor import AppSupervisor

log = logging.getLogger("deployd.webhooks")

_EVENT_HEADERS = ("X-GitHub-Event", "X-Gitea-Event", "X-Gogs-Event", "X-Gitlab-Event")
_PUSH_EVENTS = frozenset({"push", "Push Hook"})
# What the owner needs to check and read a forwarded push as the git server sent it.
_FORWARDED_HEADERS = ("Content-Type", "X-Hub-Signature-256", "X-Gitea-Signature",
                      "X-Gitlab-Token", *_EVENT_HEADERS)


class WebhookRefused(Exception):
    """A request answered with an error; `result` is its label in the metrics."""

    def __init__(self, status: int, code: str, message: str, result: str, *,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.result = status, code, message, result
        self.close = close  # a body left unread: the connection cannot carry on


def signature_ok(config: WebhookConfig, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether the request carries a valid signature or token for `body` (constant time)."""
    digest = hmac.new(config.secret, body, hashlib.sha256).hexdigest().encode()
    github = headers.get("X-Hub-Signature-256")
    if github is not None:
        scheme, _, given = github.partition("=")
        return scheme == "sha256" and hmac.compare_digest(_bytes(given.strip().lower()), digest)
    gitea = headers.get("X-Gitea-Signature")
    if gitea is not None:
        return hmac.compare_digest(_bytes(gitea.strip().lower()), digest)
    gitlab = headers.get("X-Gitlab-Token")
    if gitlab is not None:
        return hmac.compare_digest(_bytes(gitlab), config.secret)
    return False


def _bytes(header: str) -> bytes:
    # compare_digest refuses str with non-ASCII characters; a header may hold any.
    return header.encode("utf-8", "surrogateescape")


def pushed_ref(headers: Mapping[str, str], body: bytes) -> tuple[str | None, str]:
    """(the pushed ref, or None when this is not a push; the event's name)."""
    event = next((headers[name] for name in _EVENT_HEADERS if name in headers), "push")
    if event not in _PUSH_EVENTS:
        return None, event
    payload = _payload(headers, body)
    ref = payload.get("ref")
    if not isinstance(ref, str):
        raise WebhookRefused(422, "invalid", "push payload without a \"ref\" string",
                             "bad_request")
    return ref, event


def _payload(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    text = body
    if headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
        # GitHub's form delivery: the JSON document is the `payload` field.
        form = parse_qs(body.decode("utf-8", "replace"))
        text = form.get("payload", [""])[0].encode()
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        raise WebhookRefused(400, "bad_json", "request body is not valid JSON",
                             "bad_request") from None
    if not isinstance(payload, dict):
        raise WebhookRefused(422, "invalid", "request body must be a JSON object", "bad_request")
    return payload


def handler(supervisors: Mapping[str, AppSupervisor], metrics: Metrics
            ) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The `POST /hooks/{app}` handler over the daemon's live supervisors."""

    async def receive(request: web.Request) -> web.Response:
        sup = supervisors.get(request.match_info["app"])
        config = sup.app.webhook if sup is not None else None
        if sup is None or config is None:
            return _error(404, "not_found", "no webhook here")
        try:
            response, result = await _receive(request, sup, config)
        except WebhookRefused as exc:
            metrics.webhooks_total.labels(app=sup.name, result=exc.result).inc()
            if exc.result in ("unauthorized", "not_forwarded"):
                log.warning("%s: webhook %s: %s", sup.name,
                            "refused" if exc.result == "unauthorized" else "not forwarded",
                            exc.message)
            response = _error(exc.status, exc.code, exc.message)
            if exc.close:
                response.force_close()
            return response
        metrics.webhooks_total.labels(app=sup.name, result=result).inc()
        return response

    return receive


async def _receive(request: web.Request, sup: AppSupervisor,
                   config: WebhookConfig) -> tuple[web.Response, str]:
    """The answer, and its result for the metrics."""
    try:
        body = await read_body(request, config.max_body, "webhook body")
    except ApiError as exc:  # 413 or 408, the connection closed: counted, then answered
        result = "too_large" if exc.status == 413 else "bad_request"
        raise WebhookRefused(exc.status, exc.code, exc.message, result, close=True) from None
    except (ConnectionError, EOFError, ClientPayloadError):
        raise WebhookRefused(400, "bad_request", "the request body was cut off", "bad_request",
                             close=True) from None
    if not signature_ok(config, request.headers, body):
        raise WebhookRefused(401, "unauthorized", "bad or missing signature", "unauthorized")
    ref, event = pushed_ref(request.headers, body)
    if ref is None:
        return web.json_response({"ignored": f"{event} event"}), "ignored"
    watched = f"refs/heads/{sup.app.branch}"
    if ref != watched:
        return web.json_response({"ignored": f"push to {ref}, not {watched}"}), "ignored"
    answer = await _owner_answer(request, sup.name, body)
    if answer is not None:
        return answer, "forwarded"
    sup.request_fetch()
    return web.json_response({"accepted": f"fetching {sup.app.branch}"}, status=202), "accepted"


async def _owner_answer(request: web.Request, app: str, body: bytes) -> web.Response | None:
    """None if this node runs the app; else the answer of the node that does, to the push
    forwarded there (WebhookRefused, `not_forwarded`, when it cannot be)."""
    context = request.app[CONTEXT]
    try:
        elsewhere = await context.owner_elsewhere(app)
    except StoreError as exc:
        raise WebhookRefused(503, "unavailable", f"cannot tell which node runs {app}: {exc}",
                             "not_forwarded") from None
    if elsewhere is None:
        return None
    node, advertise = elsewhere
    if not node:
        raise WebhookRefused(409, "not_owner", f"{app} is owned by no node right now; the "
                             "node that takes it over fetches first", "not_forwarded")
    if context.session is None or not advertise or FORWARDED_BY in request.headers:
        raise WebhookRefused(409, "not_owner", f"{app} is run by node {node} (at "
                             f"{advertise or 'no advertised URL'}); it finds the push at its "
                             "next poll", "not_forwarded")
    try:
        return await forward(request, context, app, node, advertise, body,
                             passed=_FORWARDED_HEADERS)
    except ApiError as exc:  # 502 owner_unreachable
        raise WebhookRefused(exc.status, exc.code, exc.message, "not_forwarded") from None


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def add_routes(app: web.Application, supervisors: Mapping[str, AppSupervisor],
               metrics: Metrics) -> None:
    app.router.add_post("/hooks/{app}", handler(supervisors, metrics))
