"""A rescue job's preview and plan, and the job as REST shows it.

The preview tries the selection commit by commit on the base, in memory, and records per
selected commit whether it applies (and on what), which paths conflict, and whether it was
already in the base or had to be adapted; with a hand-resolved patch, the patch's tree and how
far it reaches beyond the selected commits. The `plan` hashes base, bad head, selection (or
patch and its resolver) and the resulting tree: an approval names it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from deployd.errors import GitError, Invalid, NotFound
from deployd.git import Mirror
from deployd.store import Job, JobStore, Store
from deployd.timefmt import iso_time
from deployd.vocabulary import JobState

COMMITTER = ("deployd", "deployd@localhost")
MAX_TRIED_ALONE = 200
"""Candidates tried alone on the base when a job opens; later ones show no such preview."""


def _changed_lines(diff: str) -> list[str]:
    """The lines a diff adds and removes, per file: what "the same change" means here."""
    return [line for line in diff.splitlines() if line.startswith(("+", "-"))]


DEFAULT_CANDIDATES_LIMIT = 500
"""How many candidates a job's REST view lists per page (`candidates_limit` changes it)."""
MAX_CANDIDATES_LIMIT = 5000


@dataclass(frozen=True)
class Preview:
    """What the current selection (or resolved patch) would make of the base.

    `statuses` holds what was found for the selected commits only (keyed by sha): a bad
    range of 10,000 commits is not copied into every preview; `candidates_of` joins them.
    """

    statuses: dict[str, dict[str, Any]]
    tree: str | None
    ready: bool
    blocked_by: str | None
    adaptation: str | None
    plan: str | None
    scope: PatchScope | None = None

    def to_json(self) -> dict[str, Any]:
        return {"statuses": self.statuses, "tree": self.tree, "ready": self.ready,
                "blocked_by": self.blocked_by, "adaptation": self.adaptation,
                "extra_paths": self.scope.extra_paths if self.scope else [],
                "beyond_commits": self.scope.beyond_commits if self.scope else False}


@dataclass(frozen=True)
class PatchScope:
    """How a resolved patch compares with the selected commits' own changes.

    `extra_paths` are paths the patch touches that no selected commit touches;
    `beyond_commits` is true when the patch brings in any path, line, binary content or file
    mode the selected commits do not, or removes more lines from a file than they do (which
    lines may differ: resolving a conflict removes what the base holds, not what the commit's
    parent held). Then the commit is the resolver's, not the originals'.
    """

    extra_paths: list[str]
    beyond_commits: bool


def candidates_of(job: Job, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """The job's candidates `offset`.. (at most `limit`), oldest first, each with `selected`
    and, when selected, what the preview found for it."""
    selected = set(job.selection)
    statuses = _statuses(job.preview)
    end = None if limit is None else offset + limit
    return [{**c, "selected": c["sha"] in selected, **statuses.get(c["sha"], {})}
            for c in job.candidates[offset:end]]


def _statuses(preview: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What a stored preview found per selected commit (also from the older form, which
    kept a full copy of the candidates)."""
    if "statuses" in preview:
        return dict(preview["statuses"])
    keys = ("applies_cleanly", "conflicting_paths", "applies_on", "already_in_base", "adapted")
    return {c["sha"]: {k: c[k] for k in keys if k in c}
            for c in preview.get("candidates", ()) if "applies_cleanly" in c}


class Previewer:
    """What one app's rescue jobs would make of their base, and how REST shows a job."""

    def __init__(self, name: str, *, store: Store, jobs: JobStore, mirror: Mirror) -> None:
        self.name = name
        self.store = store
        self.jobs = jobs
        self.mirror = mirror

    # -- candidates and selection ----------------------------------------------------------

    async def tried_alone(self, base: str, candidates: list[dict[str, Any]]
                         ) -> list[dict[str, Any]]:
        """Candidates with whether each applies alone on the base (shown unless selected)."""
        tried = await self.mirror.conflicts_alone(
            base, [c["sha"] for c in candidates[:MAX_TRIED_ALONE]])
        return [{**c, "applies_cleanly": not tried[c["sha"]],
                 "conflicting_paths": list(tried[c["sha"]]), "applies_on": "base"}
                if c["sha"] in tried else c for c in candidates]

    async def validate_selection(self, candidates: list[dict[str, Any]],
                                 commits: list[str]) -> list[str]:
        """The given commits as full shas, oldest first; Invalid unless each is a candidate."""
        by_sha = {c["sha"]: index for index, c in enumerate(candidates)}
        chosen: set[str] = set()
        for given in commits:
            sha = await known_commit(self.mirror, given, "commit")
            if sha not in by_sha:
                raise Invalid(f"commit {given!r} is not in the bad range (base..bad head, "
                              "merges left out)")
            chosen.add(sha)
        return sorted(chosen, key=by_sha.__getitem__)  # always oldest first

    # -- preview and plan ------------------------------------------------------------------

    async def compute_preview(self, job: Job) -> Preview:
        """Try the selection commit by commit on the base, in memory; compute the plan."""
        head = job.base
        statuses: dict[str, dict[str, Any]] = {}
        original: list[str] = []
        landing: list[str] = []
        for sha in job.selection:
            result = await self.mirror.cherry_pick(head, [sha], committer_name=COMMITTER[0],
                                                   committer_email=COMMITTER[1])
            info = await self.mirror.commit_info(sha)
            before = info.parents[0] if info.parents else None
            change = _changed_lines(await self.mirror.diff(before, sha)) if before else []
            original += change
            if not result.clean:
                statuses[sha] = {"applies_cleanly": False, "applies_on": "selection",
                                 "conflicting_paths": list(result.conflict_paths)}
                continue
            landed = _changed_lines(await self.mirror.diff(head, result.head))
            landing += landed
            statuses[sha] = {"applies_cleanly": True, "conflicting_paths": [],
                             "applies_on": "selection",
                             "already_in_base": sha in result.skipped,
                             "adapted": landed != change and sha not in result.skipped}
            head = result.head
        tree: str | None
        blocked: str | None = None
        scope = None
        if job.resolved_patch is not None:
            tree = await self.mirror.apply_patch(job.base, job.resolved_patch)
            landing = _changed_lines(await self.mirror.diff(job.base, tree))
            scope = await self.patch_scope(job, tree)
        else:
            tree = (await self.mirror.commit_info(head)).tree
            conflicting = [s[:12] for s, st in statuses.items() if not st["applies_cleanly"]]
            if conflicting:
                blocked = (f"{', '.join(conflicting)} do(es) not apply cleanly on the base: "
                           "upload a resolved patch (PUT .../patch) or change the selection")
        if not job.selection:
            blocked = "nothing selected: choose commits with PUT .../selection"
        adaptation = None
        if landing != original:
            adaptation = "".join(difflib.unified_diff(
                [line + "\n" for line in original], [line + "\n" for line in landing],
                "the selected commits' own change", "what would land"))
        plan = None if blocked else _plan(job, tree)
        return Preview(statuses, tree, blocked is None, blocked, adaptation, plan, scope)

    async def patch_scope(self, job: Job, tree: str) -> PatchScope:
        """Compare what the resolved patch (giving `tree`) adds with what the commits add."""
        own: dict[str, Counter[str]] = {}
        for sha in job.selection:
            info = await self.mirror.commit_info(sha)
            before = info.parents[0] if info.parents else None
            for path, added in (await self.mirror.changes(before, sha)).items():
                own.setdefault(path, Counter()).update(added)
        patched = await self.mirror.changes(job.base, tree)
        extra = sorted(path for path in patched if path not in own)
        beyond = bool(extra) or any(added - own[path] for path, added in patched.items()
                                    if path in own)
        return PatchScope(extra, beyond)

    async def patch(self, job: Job) -> str:
        """The combined change that would land on the base, as a unified diff."""
        tree = job.preview.get("tree")
        if tree is None:
            return ""
        return await self.mirror.diff(job.base, str(tree))

    # -- what REST shows -------------------------------------------------------------------

    async def describe(self, job: Job, *, candidates_offset: int = 0,
                       candidates_limit: int = DEFAULT_CANDIDATES_LIMIT) -> dict[str, Any]:
        """A job as `GET /api/v1/jobs/{id}` shows it, with the next useful calls.

        The candidates come a page at a time (`candidates_offset`, `candidates_limit`);
        `selection` always names every selected commit, whichever page is shown.
        """
        approvals = await self.jobs.approvals(job.id)
        log_events = [e.to_json() for e in await self.store.job_events(self.name, job.id)]
        base_info = await _safe_info(self.mirror, job.base)
        body: dict[str, Any] = {
            "id": job.id, "app": job.app, "state": job.state,
            "base": base_info, "bad_head": job.bad_head, "requester": job.requester,
            "reason": job.reason, "created_at": iso_time(job.created_at),
            "expires_at": iso_time(job.expires_at), "plan": job.plan,
            "ready": bool(job.preview.get("ready")), "blocked_by": job.preview.get("blocked_by"),
            "candidates": candidates_of(job, candidates_offset, candidates_limit),
            "candidates_total": len(job.candidates), "candidates_offset": candidates_offset,
            "selection": job.selection,
            "resolved_patch": job.resolved_patch is not None,
            "resolved_by": job.resolved_by if job.resolved_patch is not None else None,
            "extra_paths": job.preview.get("extra_paths", []),
            "beyond_commits": bool(job.preview.get("beyond_commits")),
            "changed_by": job.last_changed_by,
            "adaptation": job.preview.get("adaptation"),
            "new_head": job.new_head, "backup_branch": job.backup_ref, "step": job.step,
            "deploy": job.deploy_id, "error": job.error,
            "approvals": [a.to_json() for a in approvals], "log": log_events,
            "links": _links(job, candidates_offset, candidates_limit),
        }
        if job.state is JobState.PENDING and job.plan:
            body["next"] = {"approve": {"method": "POST", "href": _links(job)["approve"],
                                        "body": {"plan": job.plan, "comment": "..."}}}
        return body


async def known_commit(mirror: Mirror, given: str, what: str) -> str:
    """The full sha of `given`; Invalid naming it as `what` when the mirror has no such commit."""
    try:
        return await mirror.resolve_strict(given)
    except NotFound:
        raise Invalid(f"unknown {what} {given!r}") from None


def _plan(job: Job, tree: str | None) -> str:
    fields: dict[str, Any] = {"base": job.base, "bad_head": job.bad_head,
                              "selection": job.selection, "patch": None, "tree": tree}
    if job.resolved_patch is not None:
        # The resolver is bound too: they are named in (and may author) the commit.
        fields["patch"] = hashlib.sha256(
            job.resolved_patch.encode("utf-8", "surrogateescape")).hexdigest()
        fields["resolved_by"] = job.resolved_by
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _links(job: Job, offset: int = 0, limit: int = DEFAULT_CANDIDATES_LIMIT) -> dict[str, str]:
    base = f"/api/v1/jobs/{job.id}"
    links = {"self": base, "patch": f"{base}/patch", "selection": f"{base}/selection",
             "approve": f"{base}/approve", "reject": f"{base}/reject",
             "app": f"/api/v1/apps/{job.app}", "events": f"/api/v1/apps/{job.app}/events"}
    if offset + limit < len(job.candidates):
        links["candidates_next"] = (f"{base}?candidates_offset={offset + limit}"
                                    f"&candidates_limit={limit}")
    return links


async def _safe_info(mirror: Mirror, sha: str) -> dict[str, Any]:
    try:
        info = await mirror.commit_info(sha)
    except (GitError, NotFound):
        return {"sha": sha}
    return {"sha": sha, "summary": info.summary}
