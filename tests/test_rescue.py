"""Rescue jobs end to end: the real daemon, real sshd hosts, an origin served over SSH.

Every scenario starts like a night on call: production runs a good commit G; a batch lands
with A (harmless), P (the fix production needs, `Rescue: yes`) and B (breaks the health
check); deployd deploys it, rolls it back, quarantines it and opens a rescue job. The tests
then drive the job over REST and check the remote, the hosts, the job, events and metrics.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pygit2
import pytest

from tests.support.healthservers import BAD, GOOD
from tests.support.metrics import sample, scrape
from tests.support.rescuelab import (
    APP,
    CONFLICT_CONFIG,
    FIX_AUTHOR,
    RESOLVED,
    Batch,
    Daemonish,
    MakeLab,
    RescueLab,
    backdoor_patch,
    events,
    in_order,
    new_file_patch,
    wait_event,
    wait_job,
)
from tests.support.sshd import chown_tree, shared_dir
from tests.support.waiting import wait_until

CONFIG = "setting = 1\n"


async def night_on_call(lab: RescueLab, daemon: Daemonish, **batch: Any) -> tuple[str, Batch, int]:
    """G deployed and baked; the bad batch lands, is rolled back; the job's id."""
    good = lab.origin.head()
    await wait_event(daemon, "bake.healthy", good)
    landed = lab.land_bad_batch(**batch)
    await wait_event(daemon, "rollback.succeeded", good)
    opened = await wait_event(daemon, "job.opened")
    return good, landed, int(opened["data"]["job"])


def changes(repo: pygit2.Repository, old: pygit2.Commit, new: pygit2.Commit
            ) -> set[tuple[str, str, str]]:
    """What a commit pair changes: (status, path, new blob id) per file."""
    diff = repo.diff(old.tree, new.tree)
    return {(delta.status_char(), delta.new_file.path, str(delta.new_file.id))
            for delta in diff.deltas}


def message_lines(commit: pygit2.Commit) -> list[str]:
    return commit.message.splitlines()


# -- the full story ----------------------------------------------------------------------------


async def test_full_rescue_story_over_ssh(rescue_lab: MakeLab) -> None:
    """Bad batch rolled back, job with P selected, approved over HTTP: G + P' live and pristine."""
    lab: RescueLab = await rescue_lab(2)
    good = lab.commit_good(**{"config.txt": CONFIG})
    daemon = await lab.start()
    good, batch, job_id = await night_on_call(lab, daemon)

    # Quarantined and rolled back; a pending job waits.
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert [q["revision"] for q in detail["quarantined"]] == [batch.b]
    assert lab.live_revisions() == [good, good]
    assert detail["pristine"] is False
    listed = (await daemon.api.get("/api/v1/jobs?state=pending"))["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    assert listed[0]["selected"] == [batch.p] and listed[0]["bad_head"] == batch.b
    assert (await daemon.api.get(f"/api/v1/jobs?state=pending&app={APP}"))["jobs"] == listed
    assert (await daemon.api.get("/api/v1/jobs?state=succeeded"))["jobs"] == []
    samples = await scrape(daemon)
    assert sample(samples, "deployd_rescue_jobs", app=APP, state="pending") == 1
    assert sample(samples, "deployd_rescue_job_oldest_pending_timestamp_seconds", app=APP)

    job = await daemon.api.get(f"/api/v1/jobs/{job_id}", token="reader")
    assert job["state"] == "pending" and job["ready"] is True and job["blocked_by"] is None
    assert job["base"]["sha"] == good and job["bad_head"] == batch.b
    assert job["requester"] == "deployd"
    by_sha = {c["sha"]: c for c in job["candidates"]}
    assert [c["sha"] for c in job["candidates"]] == [batch.a, batch.p, batch.b]
    assert by_sha[batch.p]["summary"] == "Fix tax rounding"
    assert by_sha[batch.p]["author"] == "Pat Fixer <pat@example.com>"
    assert by_sha[batch.a]["author"] == "Ann Author <ann@example.com>"
    assert [c["selected"] for c in job["candidates"]] == [False, True, False]
    assert by_sha[batch.p]["applies_cleanly"] is True
    assert by_sha[batch.p]["conflicting_paths"] == []
    assert job["adaptation"] is None
    plan = job["plan"]
    assert isinstance(plan, str) and len(plan) >= 16
    assert job["next"]["approve"]["body"]["plan"] == plan

    status, patch = await daemon.api.call("GET", f"/api/v1/jobs/{job_id}/patch", token="reader")
    assert status == 200 and isinstance(patch, str)
    assert patch.startswith("diff --git a/tax.txt b/tax.txt")
    assert "+++ b/tax.txt" in patch and "+rate 0.2" in patch
    assert "index.html" not in patch and "health.txt" not in patch

    status, body = await daemon.api.call("POST", f"/api/v1/jobs/{job_id}/approve",
                                         token="approver",
                                         json_body={"plan": plan, "comment": "ship the fix"})
    assert status == 202, body
    assert body["state"] in ("approved", "running")
    done = await wait_job(daemon, job_id, "succeeded", "failed", "superseded")
    assert done["state"] == "succeeded", done

    # The remote branch is G + P', P' made by deployd with P's author and the trailers.
    new_head = lab.remote_head()
    assert new_head is not None and new_head == done["new_head"]
    rebuilt = lab.remote_commit(new_head)
    original = lab.remote_commit(batch.p)
    assert [str(p) for p in rebuilt.parent_ids] == [good]
    assert (rebuilt.author.name, rebuilt.author.email) == FIX_AUTHOR
    assert rebuilt.author.time == original.author.time
    assert rebuilt.committer.name == "deployd"
    lines = message_lines(rebuilt)
    assert lines[0] == "Fix tax rounding"
    assert f"(cherry picked from commit {batch.p})" in lines
    assert f"Rescue-Job: {APP}#{job_id}" in lines
    assert "Approved-by: approver" in lines
    assert "Rescue: yes" in lines
    repo = lab.origin.repo
    assert changes(repo, lab.remote_commit(good), rebuilt) == changes(
        repo, original.parents[0], original)
    assert rebuilt.tree["tax.txt"].id == original.tree["tax.txt"].id
    assert rebuilt.tree["health.txt"].id == lab.remote_commit(good).tree["health.txt"].id
    assert "index.html" not in rebuilt.tree

    # The old head is kept on the remote under the backup branch.
    backup = f"deployd/backup/{APP}/{job_id}"
    assert lab.remote_head(backup) == batch.b
    assert done["backup_branch"] == f"refs/heads/{backup}"

    # The hosts run the new release, healthy; the branch is pristine again.
    assert lab.live_revisions() == [new_head, new_head]
    for deploy_to in lab.deploy_dirs:
        assert (deploy_to / "current" / "tax.txt").read_text() == "rate 0.2\n"
        assert (deploy_to / "current" / "health.txt").read_text() == GOOD
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert detail["head"] == new_head
    assert detail["deployed"]["revision"] == new_head
    assert detail["last_good"]["revision"] == new_head
    assert detail["pristine"] is True

    # The job tells who approved what, and its log.
    assert done["error"] is None and done["step"] == "pushed"
    (approval,) = done["approvals"]
    assert approval["decision"] == "approve" and approval["by"] == "approver"
    assert approval["plan"] == plan and approval["comment"] == "ship the fix"
    assert [e["kind"] for e in done["log"]] == [
        "job.opened", "job.approved", "job.pushed", "job.succeeded"]
    assert "next" not in done

    # Metrics.
    samples = await scrape(daemon)
    assert sample(samples, "deployd_rescue_jobs", app=APP, state="succeeded") == 1
    assert sample(samples, "deployd_rescue_jobs", app=APP, state="pending") == 0
    assert sample(samples, "deployd_transplant_duration_seconds_count", app=APP) == 1
    assert (sample(samples, "deployd_transplant_duration_seconds_sum", app=APP) or 0) > 0
    assert not [key for key in samples
                if key[0] == "deployd_rescue_job_oldest_pending_timestamp_seconds"]
    assert sample(samples, "deployd_branch_pristine", app=APP) == 1

    # The events tell the story, in order.
    timeline = await events(daemon)
    in_order(timeline, [
        ("deploy.succeeded", good), ("bake.healthy", good),
        ("branch.moved", batch.b), ("deploy.started", batch.b), ("deploy.succeeded", batch.b),
        ("bake.failed", batch.b), ("quarantine.added", batch.b), ("rollback.started", None),
        ("rollback.succeeded", good), ("job.opened", batch.b), ("job.approved", None),
        ("job.pushed", new_head), ("deploy.started", new_head),
        ("deploy.succeeded", new_head), ("bake.healthy", new_head), ("job.succeeded", None),
    ])
    rescue_deploy = (await events(daemon, "deploy.started", new_head))[0]
    assert "(rescue)" in rescue_deploy["message"] and rescue_deploy["actor"] == "approver"
    assert len(await events(daemon, "job.opened")) == 1


# -- conflicts, resolved patches and selection ------------------------------------------------

async def approve(daemon: Daemonish, job_id: int, plan: Any, token: str = "approver",
                  comment: str | None = None) -> tuple[int, Any]:
    body: dict[str, Any] = {"plan": plan}
    if comment is not None:
        body["comment"] = comment
    return await daemon.api.call("POST", f"/api/v1/jobs/{job_id}/approve", token=token,
                                 json_body=body)


async def test_conflicting_fix_needs_a_resolved_patch(rescue_lab: MakeLab) -> None:
    """P conflicts with the base: 422 until a resolved diff is uploaded; old plans are stale."""
    lab: RescueLab = await rescue_lab(2)
    lab.commit_good(**{"config.txt": CONFLICT_CONFIG})
    daemon = await lab.start()
    good, batch, job_id = await night_on_call(
        lab, daemon,
        a_files={"config.txt": "# shop\nsetting = 2\ncurrency = EUR\n"},
        p_files={"config.txt": "# shop\nsetting = 3\ncurrency = EUR\n", "tax.txt": "rate 0.2\n"})
    path = f"/api/v1/jobs/{job_id}"

    job = await daemon.api.get(path)
    p = next(c for c in job["candidates"] if c["sha"] == batch.p)
    assert p["selected"] is True and p["applies_cleanly"] is False
    assert p["conflicting_paths"] == ["config.txt"]
    assert job["ready"] is False and job["plan"] is None
    assert batch.p[:12] in job["blocked_by"] and "PUT .../patch" in job["blocked_by"]
    assert "next" not in job
    status, body = await approve(daemon, job_id, "0" * 32)
    assert status == 422 and body["error"]["code"] == "invalid", body
    assert "cannot be approved yet" in body["error"]["message"]

    # A and P together apply cleanly: that is a plan an approver could read...
    status, job = await daemon.api.call("PUT", f"{path}/selection", token="approver",
                                        json_body={"commits": [batch.a, batch.p]})
    assert status == 200 and job["ready"] is True, job
    old_plan = job["plan"]
    # ...but back to P alone, and a hand-resolved patch for it.
    status, job = await daemon.api.call("PUT", f"{path}/selection", token="approver",
                                        json_body={"commits": [batch.p]})
    assert status == 200 and job["ready"] is False and job["plan"] is None

    status, body = await daemon.api.call("PUT", f"{path}/patch", token="reader", data=RESOLVED)
    assert status == 403, body
    # Made against the wrong base: as `git diff` writes it (the file is named), and by hand.
    before, after = "# shop\nsetting = 2\ncurrency = EUR\n", "# shop\nsetting = 3\ncurrency = EUR\n"
    index = f"index {str(pygit2.hash(before))[:7]}..{str(pygit2.hash(after))[:7]} 100644\n"
    wrong = RESOLVED.replace("-setting = 1", "-setting = 2")
    tax = str(pygit2.hash("rate 0.2\n"))[:7]
    git_style = wrong.replace("--- a/config.txt", index + "--- a/config.txt", 1).replace(
        "new file mode 100644\n", f"new file mode 100644\nindex 0000000..{tax}\n", 1)
    status, body = await daemon.api.call("PUT", f"{path}/patch", token="approver",
                                         data=git_style)
    assert status == 422 and "does not apply" in body["error"]["message"], body
    assert "(in config.txt)" in body["error"]["message"]
    status, body = await daemon.api.call("PUT", f"{path}/patch", token="approver", data=wrong)
    assert status == 422 and "does not apply" in body["error"]["message"], body
    status, body = await daemon.api.call("PUT", f"{path}/patch", token="approver",
                                         data="this is not a diff\n")
    assert status == 422, body
    status, body = await daemon.api.call("PUT", f"{path}/patch", token="approver", data="")
    assert status == 422, body

    status, job = await daemon.api.call("PUT", f"{path}/patch", token="approver", data=RESOLVED)
    assert status == 200, job
    assert job["ready"] is True and job["resolved_patch"] is True and job["blocked_by"] is None
    new_plan = job["plan"]
    assert new_plan and new_plan != old_plan
    adaptation = job["adaptation"]
    assert adaptation is not None
    assert "setting = 1" in adaptation and "setting = 2" in adaptation
    status, patch = await daemon.api.call("GET", f"{path}/patch", token="reader")
    assert status == 200 and "+setting = 3" in patch and "-setting = 1" in patch
    assert "+rate 0.2" in patch

    status, body = await approve(daemon, job_id, old_plan)
    assert status == 409 and "stale plan" in body["error"]["message"], body
    assert (await daemon.api.get(path))["state"] == "pending"
    status, body = await approve(daemon, job_id, new_plan, comment="resolved by hand")
    assert status == 202, body
    done = await wait_job(daemon, job_id, "succeeded", "failed", "superseded")
    assert done["state"] == "succeeded", done

    head = lab.remote_head()
    assert head is not None and head == done["new_head"]
    rebuilt = lab.remote_commit(head)
    assert [str(p) for p in rebuilt.parent_ids] == [good]
    assert (rebuilt.author.name, rebuilt.author.email) == FIX_AUTHOR
    assert rebuilt.committer.name == "deployd"
    lines = message_lines(rebuilt)
    assert lines[0] == "Fix tax rounding"
    assert f"(cherry picked from commit {batch.p})" in lines
    assert f"Rescue-Job: {APP}#{job_id}" in lines and "Approved-by: approver" in lines
    # The patch holds only P's own change: P's author stays, the resolver is named.
    assert "Resolved-by: approver" in lines
    assert not [line for line in lines if line.startswith("Original-author:")]
    assert done["resolved_by"] == "approver" and done["extra_paths"] == []
    assert done["beyond_commits"] is False
    blob = lab.origin.repo[rebuilt.tree["config.txt"].id]
    assert isinstance(blob, pygit2.Blob)
    assert blob.data == b"# shop\nsetting = 3\ncurrency = EUR\n"
    assert lab.remote_head(f"deployd/backup/{APP}/{job_id}") == batch.b
    assert lab.live_revisions() == [head, head]
    assert done["adaptation"] == adaptation
    kinds = [e["kind"] for e in done["log"]]
    assert kinds == ["job.opened", "job.selection", "job.selection", "job.patch",
                     "job.approved", "job.pushed", "job.succeeded"]


async def test_selection_changes_the_plan(rescue_lab: MakeLab) -> None:
    """PUT /selection picks other candidates and recomputes the plan; outside the range: 422."""
    lab: RescueLab = await rescue_lab(1)
    lab.commit_good(**{"config.txt": CONFIG})
    daemon = await lab.start()
    good, batch, job_id = await night_on_call(lab, daemon)
    path = f"/api/v1/jobs/{job_id}"
    first = await daemon.api.get(path)

    async def select(commits: Any, token: str = "approver") -> tuple[int, Any]:
        return await daemon.api.call("PUT", f"{path}/selection", token=token,
                                     json_body={"commits": commits})

    status, job = await select([batch.a])
    assert status == 200, job
    assert [c["selected"] for c in job["candidates"]] == [True, False, False]
    # Unselected candidates still say whether they apply (alone, on the base).
    assert [c["applies_on"] for c in job["candidates"]] == ["selection", "base", "base"]
    assert [c["applies_cleanly"] for c in job["candidates"]] == [True, True, True]
    assert job["ready"] is True and job["plan"] not in (None, first["plan"])
    status, patch = await daemon.api.call("GET", f"{path}/patch")
    assert "index.html" in patch and "tax.txt" not in patch

    # Given newest first and by short sha: stored oldest first, the patch holds both.
    status, job = await select([batch.p[:10], batch.a])
    assert status == 200, job
    assert [c["selected"] for c in job["candidates"]] == [True, True, False]
    both = job["plan"]
    listed = (await daemon.api.get("/api/v1/jobs?state=pending"))["jobs"]
    assert listed[0]["selected"] == [batch.a, batch.p] and listed[0]["plan"] == both
    status, patch = await daemon.api.call("GET", f"{path}/patch")
    assert "index.html" in patch and "tax.txt" in patch

    # Outside the range: the base itself, a commit on another branch, unknown, malformed.
    side = lab.origin.commit({"side.txt": "x\n"}, "Elsewhere", branch="side", parents=[good])
    await asyncio.sleep(0.5)  # the daemon fetches every ref on its next poll
    for commits in ([good], [side], ["f" * 40], [batch.p, "nope"]):
        status, body = await select(commits)
        assert status == 422, (commits, body)
    for commits in ("x", [1], None):
        status, body = await select(commits)
        assert status == 422, (commits, body)
    status, body = await select([batch.p], token="deployer")
    assert status == 403, body
    assert (await daemon.api.get(path))["plan"] == both

    # Nothing selected: still pending, not approvable.
    status, job = await select([])
    assert status == 200 and job["ready"] is False and job["plan"] is None
    assert "nothing selected" in job["blocked_by"]
    status, body = await approve(daemon, job_id, both)
    assert status == 422, body

    # Back to P alone: the very plan the job was opened with (nothing else moved).
    status, job = await select([batch.p])
    assert status == 200 and job["plan"] == first["plan"]
    status, body = await approve(daemon, job_id, first["plan"])
    assert status == 202, body
    assert (await wait_job(daemon, job_id, "succeeded", "failed"))["state"] == "succeeded"
    status, body = await select([batch.a])
    assert status == 409, body


# -- the branch moves --------------------------------------------------------------------------


async def test_push_while_pending_supersedes_the_job(rescue_lab: MakeLab) -> None:
    """Someone pushes while the job waits: approve is 409, job superseded, their push stays."""
    lab: RescueLab = await rescue_lab(1)
    lab.commit_good()
    daemon = await lab.start()
    _, _, job_id = await night_on_call(lab, daemon)
    plan = (await daemon.api.get(f"/api/v1/jobs/{job_id}"))["plan"]

    theirs = await lab.push_as_someone_else({"health.txt": GOOD}, "Fix the database by hand")
    assert lab.remote_head() == theirs
    status, body = await approve(daemon, job_id, plan)
    assert status == 409 and body["error"]["code"] == "conflict", body
    job = await wait_job(daemon, job_id, "superseded")
    assert "moved" in job["error"] and theirs[:12] in job["error"]
    assert job["approvals"] == [] and job["new_head"] is None

    # Nothing was overwritten or backed up; their push is deployed like any new head.
    assert lab.remote_head() == theirs
    assert lab.remote_head(f"deployd/backup/{APP}/{job_id}") is None
    assert not await events(daemon, "job.approved")
    await wait_event(daemon, "bake.healthy", theirs)
    assert lab.live_revisions() == [theirs]
    status, body = await approve(daemon, job_id, plan)
    assert status == 409, body
    samples = await scrape(daemon)
    assert sample(samples, "deployd_rescue_jobs", app=APP, state="superseded") == 1
    assert sample(samples, "deployd_rescue_jobs", app=APP, state="pending") == 0
    assert not sample(samples, "deployd_transplant_duration_seconds_count", app=APP)


async def test_push_racing_the_transplant_is_not_overwritten(rescue_lab: MakeLab) -> None:
    """A push landing between approve's check and the transplant's push: job superseded."""
    lab: RescueLab = await rescue_lab(1)
    lab.commit_good()
    daemon = await lab.start()
    _, batch, job_id = await night_on_call(lab, daemon)
    plan = (await daemon.api.get(f"/api/v1/jobs/{job_id}"))["plan"]

    # The remote's pre-receive hook moves production the moment deployd pushes to it: after
    # every check deployd made and after its lease was negotiated, before the update.
    theirs = lab.origin.commit({"health.txt": GOOD}, "Racing hotfix", branch="racer",
                               parents=[batch.b])
    lab.install_hook("pre-receive", f"""#!/bin/sh
unset GIT_QUARANTINE_PATH
while read old new ref; do
  if [ "$ref" = refs/heads/production ]; then
    git update-ref refs/heads/production {theirs}
  fi
done
""")
    status, body = await approve(daemon, job_id, plan)
    assert status == 202, body
    job = await wait_job(daemon, job_id, "superseded", "failed", "succeeded")
    assert job["state"] == "superseded", job
    assert "push refused, nothing overwritten" in job["error"]
    assert lab.remote_head() == theirs
    # The backup went first, so the old head is kept whatever happens to the branch.
    assert lab.remote_head(f"deployd/backup/{APP}/{job_id}") == batch.b
    assert not await events(daemon, "job.pushed")
    assert not [e for e in await events(daemon, "deploy.started")
                if "(rescue)" in e["message"]]
    await wait_event(daemon, "bake.healthy", theirs)
    assert lab.live_revisions() == [theirs]


# -- the rebuilt head is bad too ---------------------------------------------------------------


async def test_transplanted_head_that_fails_health_is_rolled_back(rescue_lab: MakeLab) -> None:
    """P' unhealthy in its bake: rolled back, quarantined, job failed; no second job."""
    lab: RescueLab = await rescue_lab(2)
    lab.commit_good()
    daemon = await lab.start()
    # The fix is itself what breaks the app; B is harmless this time.
    good, batch, job_id = await night_on_call(
        lab, daemon, p_files={"tax.txt": "rate 0.2\n", "health.txt": BAD},
        b_files={"index.html": "<h1>v3</h1>\n"})
    plan = (await daemon.api.get(f"/api/v1/jobs/{job_id}"))["plan"]
    status, body = await approve(daemon, job_id, plan)
    assert status == 202, body
    job = await wait_job(daemon, job_id, "failed", "succeeded")
    assert job["state"] == "failed", job
    assert "the rebuilt head was unhealthy" in job["error"]
    new_head = job["new_head"]
    assert new_head and lab.remote_head() == new_head

    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert {q["revision"] for q in detail["quarantined"]} == {batch.b, new_head}
    await wait_event(daemon, "rollback.succeeded", good, count=2)
    assert lab.live_revisions() == [good, good]
    assert detail["pristine"] is False
    timeline = await events(daemon)
    in_order(timeline, [("job.pushed", new_head), ("deploy.started", new_head),
                        ("bake.failed", new_head), ("quarantine.added", new_head),
                        ("rollback.started", None), ("job.failed", None)])
    await asyncio.sleep(1.0)  # a few polls: the quarantined head is neither deployed nor rescued
    assert len(await events(daemon, "job.opened")) == 1
    assert [j["id"] for j in (await daemon.api.get("/api/v1/jobs"))["jobs"]] == [job_id]
    assert len(await events(daemon, "deploy.started", new_head)) == 1
    samples = await scrape(daemon)
    assert sample(samples, "deployd_rescue_jobs", app=APP, state="failed") == 1
    assert sample(samples, "deployd_rescue_jobs", app=APP, state="succeeded") == 0


# -- approvals racing --------------------------------------------------------------------------


async def test_two_racing_approvals_one_wins(rescue_lab: MakeLab) -> None:
    """Two concurrent approvals of the right plan: one 202, one 409, one transplant."""
    lab: RescueLab = await rescue_lab(1)
    lab.commit_good()
    daemon = await lab.start()
    good, _, job_id = await night_on_call(lab, daemon)
    plan = (await daemon.api.get(f"/api/v1/jobs/{job_id}"))["plan"]
    results = await asyncio.gather(approve(daemon, job_id, plan, token="approver"),
                                   approve(daemon, job_id, plan, token="admin"))
    assert sorted(status for status, _ in results) == [202, 409], results
    winner = next(body for status, body in results if status == 202)
    job = await wait_job(daemon, job_id, "succeeded", "failed")
    assert job["state"] == "succeeded", job
    assert len(job["approvals"]) == 1
    assert job["approvals"][0]["by"] == winner["approvals"][0]["by"]
    assert len(await events(daemon, "job.approved")) == 1
    assert len(await events(daemon, "job.pushed")) == 1
    assert len([e for e in await events(daemon, "deploy.started")
                if "(rescue)" in e["message"]]) == 1
    head = lab.remote_head()
    assert head == job["new_head"]
    assert [str(p) for p in lab.remote_commit(head).parent_ids] == [good]


# -- REST: auth, bad requests, decisions -------------------------------------------------------


async def paused_with_bad_batch(lab: RescueLab, daemon: Daemonish) -> tuple[str, Batch]:
    """G live and good; the app paused; the bad batch on production, not deployed."""
    good = lab.origin.head()
    await wait_event(daemon, "bake.healthy", good)
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/pause", token="deployer",
                                         json_body={"reason": "we rescue by hand tonight"})
    assert status == 200, body
    batch = lab.land_bad_batch()
    await wait_event(daemon, "branch.moved", batch.b)
    return good, batch


async def open_by_hand(daemon: Daemonish, commits: list[str], token: str = "admin") -> int:
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/jobs", token=token,
                                         json_body={"commits": commits})
    assert status == 201, body
    assert body["state"] == "pending" and body["requester"] == token
    return int(body["id"])


async def test_job_calls_check_auth_input_and_state(rescue_lab: MakeLab) -> None:
    """401, 403, 404, 400, 422 and 409 on the job calls; reject records its comment."""
    lab: RescueLab = await rescue_lab(1)
    lab.commit_good()
    daemon = await lab.start()
    good, batch = await paused_with_bad_batch(lab, daemon)
    call = daemon.api.call

    # Opening by hand needs the deploy role and commits of the range.
    jobs = f"/api/v1/apps/{APP}/jobs"
    for token in ("reader", "approver"):
        status, body = await call("POST", jobs, token=token, json_body={"commits": [batch.p]})
        assert status == 403, (token, body)
    for body_json in ({}, {"commits": []}, {"commits": ["no-such-commit"]},
                      {"commits": [good]}, {"commits": batch.p}, {"commits": [batch.p], "x": 1},
                      {"commits": [batch.p], "base": "no-such-base"}):
        status, body = await call("POST", jobs, token="deployer", json_body=body_json)
        assert status == 422, (body_json, body)
    status, body = await call("POST", "/api/v1/apps/nope/jobs", token="deployer",
                              json_body={"commits": [batch.p]})
    assert status == 404, body
    job_id = await open_by_hand(daemon, [batch.p], token="deployer")
    job = await daemon.api.get(f"/api/v1/jobs/{job_id}")
    assert job["base"]["sha"] == good and job["bad_head"] == batch.b
    assert [c["selected"] for c in job["candidates"]] == [False, True, False]
    plan = job["plan"]
    path = f"/api/v1/jobs/{job_id}"

    # 401: no token, a wrong one, a malformed header.
    for token in (None, "not-a-token"):
        for method, url in (("GET", "/api/v1/jobs"), ("GET", path), ("GET", f"{path}/patch"),
                            ("POST", f"{path}/approve"), ("POST", f"{path}/reject"),
                            ("PUT", f"{path}/selection")):
            status, body = await call(method, url, token=token, json_body={"plan": plan})
            assert status == 401, (token, method, url, body)
            assert body["error"]["code"] == "unauthorized"
    # 403: reading is not approving.
    for token in ("reader", "deployer"):
        status, body = await approve(daemon, job_id, plan, token=token)
        assert status == 403 and body["error"]["code"] == "forbidden", (token, body)
        status, body = await call("POST", f"{path}/reject", token=token, json_body={})
        assert status == 403, (token, body)
    # 404: unknown ids, numeric or not.
    for url in ("/api/v1/jobs/9999", "/api/v1/jobs/abc", "/api/v1/jobs/9999/patch",
                "/api/v1/jobs/-1", "/api/v1/jobs/1.5"):
        status, body = await call("GET", url, token="reader")
        assert status == 404 and body["error"]["code"] == "not_found", (url, body)
    for url in ("/api/v1/jobs/9999/approve", "/api/v1/jobs/abc/approve",
                "/api/v1/jobs/9999/reject"):
        status, body = await call("POST", url, token="approver", json_body={"plan": plan})
        assert status == 404, (url, body)
    # 400: not JSON. 422: JSON, but not the fields approve needs.
    for raw in (b"{not json", b'{"plan": ', b"\xff\xfe"):
        status, body = await call("POST", f"{path}/approve", token="approver", data=raw)
        assert status == 400 and body["error"]["code"] == "bad_json", (raw, body)
    for bad in ({}, {"plan": None}, {"plan": 42}, {"plan": ""}, {"plan": plan, "x": 1},
                {"plan": plan, "comment": 7}, [plan], "plan"):
        status, body = await call("POST", f"{path}/approve", token="approver", json_body=bad)
        assert status == 422 and body["error"]["code"] == "invalid", (bad, body)
    status, body = await call("GET", "/api/v1/jobs?state=bogus", token="reader")
    assert status == 422, body
    # Candidates a page at a time; a page that is not a number (or too big) is a 422.
    status, body = await call("GET", f"{path}?candidates_offset=1&candidates_limit=1",
                              token="reader")
    assert status == 200 and [c["sha"] for c in body["candidates"]] == [batch.p], body
    assert body["candidates_total"] == 3 and body["selection"] == [batch.p]
    assert body["links"]["candidates_next"] == f"{path}?candidates_offset=2&candidates_limit=1"
    for query in ("candidates_offset=-1", "candidates_offset=x", "candidates_limit=0",
                  "candidates_limit=5001", "candidates_limit=%C2%B2"):
        status, body = await call("GET", f"{path}?{query}", token="reader")
        assert status == 422 and body["error"]["code"] == "invalid", (query, body)
    status, body = await call("GET", "/api/v1/jobs?app=nope", token="reader")
    assert status == 404, body
    status, body = await approve(daemon, job_id, "f" * 32)
    assert status == 409 and "stale plan" in body["error"]["message"], body
    assert (await daemon.api.get(path))["state"] == "pending"
    assert not await events(daemon, "job.approved")

    # Reject records the comment; the job is then neither approvable nor rejectable.
    status, body = await call("POST", f"{path}/reject", token="approver",
                              json_body={"comment": "B's author will fix forward"})
    assert status == 200 and body["state"] == "rejected", body
    (decision,) = body["approvals"]
    assert decision["decision"] == "reject" and decision["by"] == "approver"
    assert decision["comment"] == "B's author will fix forward" and decision["plan"] == plan
    rejected = await wait_event(daemon, "job.rejected")
    assert "B's author will fix forward" in rejected["message"]
    assert rejected["actor"] == "approver"
    status, body = await approve(daemon, job_id, plan)
    assert status == 409 and "rejected" in body["error"]["message"], body
    status, body = await call("POST", f"{path}/reject", token="approver", json_body={})
    assert status == 409, body
    status, body = await call("PUT", f"{path}/selection", token="approver",
                              json_body={"commits": [batch.a]})
    assert status == 409, body
    assert lab.remote_head() == batch.b

    # A second job, approved: approving it again is a 409, while it runs and after.
    second = await open_by_hand(daemon, [batch.p])
    plan = (await daemon.api.get(f"/api/v1/jobs/{second}"))["plan"]
    status, body = await approve(daemon, second, plan, comment="go")
    assert status == 202, body
    status, body = await approve(daemon, second, plan)
    assert status == 409, body
    done = await wait_job(daemon, second, "succeeded", "failed")
    assert done["state"] == "succeeded", done
    status, body = await approve(daemon, second, plan)
    assert status == 409 and "succeeded" in body["error"]["message"], body
    status, body = await call("POST", f"/api/v1/jobs/{second}/reject", token="approver",
                              json_body={"comment": "too late"})
    assert status == 409, body
    assert [a["decision"] for a in done["approvals"]] == ["approve"]
    samples = await scrape(daemon)
    assert sample(samples, "deployd_rescue_jobs", app=APP, state="rejected") == 1
    assert sample(samples, "deployd_rescue_jobs", app=APP, state="succeeded") == 1


async def test_distinct_approver_refuses_who_opened_the_job(rescue_lab: MakeLab) -> None:
    """distinct_approver = true: the token that opened a job by hand may not approve it."""
    lab: RescueLab = await rescue_lab(1, rescue={"distinct_approver": True})
    lab.commit_good()
    daemon = await lab.start()
    _, batch = await paused_with_bad_batch(lab, daemon)
    job_id = await open_by_hand(daemon, [batch.p], token="admin")
    plan = (await daemon.api.get(f"/api/v1/jobs/{job_id}"))["plan"]
    status, body = await approve(daemon, job_id, plan, token="admin")
    assert status == 403 and "may not approve" in body["error"]["message"], body
    assert (await daemon.api.get(f"/api/v1/jobs/{job_id}"))["state"] == "pending"
    status, body = await approve(daemon, job_id, plan, token="approver")
    assert status == 202, body
    done = await wait_job(daemon, job_id, "succeeded", "failed")
    assert done["state"] == "succeeded", done
    assert done["requester"] == "admin" and done["approvals"][0]["by"] == "approver"


BACKDOOR = (backdoor_patch("echo owned > /tmp/never-written")
            + new_file_patch("tax.txt", ["rate 0.2"]))


async def test_one_approver_cannot_ship_their_own_patch(rescue_lab: MakeLab) -> None:
    """distinct_approver on an automatic job: who uploaded a backdoor patch (or chose the
    selection) gets 403; another approver ships it under the resolver's name, not P's."""
    lab: RescueLab = await rescue_lab(1, rescue={"distinct_approver": True})
    lab.commit_good()
    daemon = await lab.start()
    good, batch, job_id = await night_on_call(lab, daemon)
    path = f"/api/v1/jobs/{job_id}"
    assert (await daemon.api.get(path))["requester"] == "deployd"

    status, job = await daemon.api.call("PUT", f"{path}/patch", token="approver",
                                        data=BACKDOOR)
    assert status == 200 and job["ready"] is True, job
    assert job["resolved_by"] == "approver" and job["changed_by"] == "approver"
    assert job["extra_paths"] == ["backdoor.sh"] and job["beyond_commits"] is True
    status, body = await approve(daemon, job_id, job["plan"], token="approver")
    assert status == 403 and body["error"]["code"] == "forbidden", body
    assert "distinct_approver" in body["error"]["message"]
    assert "resolved patch" in body["error"]["message"]
    assert (await daemon.api.get(path))["state"] == "pending"

    # Choosing the selection is changing what lands too.
    status, chosen = await daemon.api.call("PUT", f"{path}/selection", token="admin",
                                           json_body={"commits": [batch.p]})
    assert status == 200 and chosen["resolved_patch"] is False, chosen
    assert chosen["changed_by"] == "admin" and chosen["resolved_by"] is None
    status, body = await approve(daemon, job_id, chosen["plan"], token="admin")
    assert status == 403 and "chose the selection" in body["error"]["message"], body

    status, job = await daemon.api.call("PUT", f"{path}/patch", token="approver",
                                        data=BACKDOOR)
    assert status == 200, job
    status, body = await approve(daemon, job_id, job["plan"], token="admin")
    assert status == 202, body
    done = await wait_job(daemon, job_id, "succeeded", "failed")
    assert done["state"] == "succeeded", done
    head = lab.remote_head()
    assert head is not None and head == done["new_head"]
    rebuilt = lab.remote_commit(head)
    assert [str(p) for p in rebuilt.parent_ids] == [good]
    assert (rebuilt.author.name, rebuilt.author.email) == ("approver",
                                                           "approver@deployd.invalid")
    assert rebuilt.committer.name == "deployd"
    lines = message_lines(rebuilt)
    assert lines[0] == "Fix tax rounding"
    assert f"(cherry picked from commit {batch.p})" in lines
    assert f"Original-author: {FIX_AUTHOR[0]} <{FIX_AUTHOR[1]}>" in lines
    assert "Resolved-by: approver" in lines and "Approved-by: admin" in lines
    assert "backdoor.sh" in rebuilt.tree


async def test_pending_job_expires(rescue_lab: MakeLab) -> None:
    """rescue.expire = "1s": the job becomes expired and approving it is a 409."""
    lab: RescueLab = await rescue_lab(1, rescue={"expire": "1s"})
    lab.commit_good()
    daemon = await lab.start()
    _, _, job_id = await night_on_call(lab, daemon)
    job = await daemon.api.get(f"/api/v1/jobs/{job_id}")
    plan = job["plan"]
    assert plan
    job = await wait_job(daemon, job_id, "expired", within=10)
    assert job["error"] == "nobody approved it in time"
    status, body = await approve(daemon, job_id, plan)
    assert status == 409 and "expired" in body["error"]["message"], body
    assert (await wait_event(daemon, "job.expired"))["data"]["job"] == job_id
    samples = await scrape(daemon)
    assert sample(samples, "deployd_rescue_jobs", app=APP, state="expired") == 1
    assert sample(samples, "deployd_rescue_jobs", app=APP, state="pending") == 0
    assert not [key for key in samples
                if key[0] == "deployd_rescue_job_oldest_pending_timestamp_seconds"]
    assert lab.remote_head(f"deployd/backup/{APP}/{job_id}") is None


async def test_expiry_is_checked_on_approve_too(rescue_lab: MakeLab) -> None:
    """A job past its expiry is a 409 on approve even before any poll expired it."""
    lab: RescueLab = await rescue_lab(1, rescue={"expire": "1s"},
                                      settings={"poll_interval": "1h"})
    good = lab.commit_good()
    daemon = await lab.start()
    await wait_event(daemon, "bake.healthy", good)
    batch = lab.land_bad_batch()
    job_id = await open_by_hand(daemon, [batch.p])  # fetches the branch itself
    plan = (await daemon.api.get(f"/api/v1/jobs/{job_id}"))["plan"]
    assert (await daemon.api.get(f"/api/v1/jobs/{job_id}"))["state"] == "pending"
    await asyncio.sleep(1.2)
    status, body = await approve(daemon, job_id, plan)
    assert status == 409 and "expired" in body["error"]["message"], body
    assert (await daemon.api.get(f"/api/v1/jobs/{job_id}"))["state"] == "expired"
    assert lab.remote_head() == batch.b


# -- kill -9 during a transplant ---------------------------------------------------------------

# Holds each push to production in the remote's pre-receive hook until the test writes its
# verdict: `held<n>` names the commit the n-th push brings, `verdict<n>` says `lands` or not.
HOLDING_HOOK = """#!/bin/sh
unset GIT_QUARANTINE_PATH
D={ctl}
while read old new ref; do
  [ "$ref" = refs/heads/production ] || continue
  n=$(ls "$D" | grep -c '^held')
  n=$((n + 1))
  echo "$new" > "$D/held$n.tmp" && mv "$D/held$n.tmp" "$D/held$n"
  while [ ! -e "$D/verdict$n" ]; do sleep 0.05; done
  verdict=$(cat "$D/verdict$n")
  touch "$D/done$n"
  [ "$verdict" = lands ] || {{ echo "push $n refused: $verdict" >&2; exit 1; }}
done
exit 0
"""


async def wait_file(path: Path, within: float = 30.0) -> str:
    await wait_until(path.exists, within=within, what=f"{path} appearing")
    return (await asyncio.to_thread(path.read_text)).strip()


async def wait_remote(lab: RescueLab, sha: str, within: float = 10.0) -> bool:
    """Whether production reaches `sha` within `within` seconds (it may not: no failure)."""
    try:
        await wait_until(lambda: lab.remote_head() == sha, within=within)
    except AssertionError:
        return False
    return True


def assert_remote_consistent(lab: RescueLab, good: str, batch: Batch, job_id: int) -> str:
    """Untouched, or fully done with its backup: never half of it. Returns which."""
    head = lab.remote_head()
    backup = lab.remote_head(f"deployd/backup/{APP}/{job_id}")
    if head == batch.b:
        assert backup in (None, batch.b)
        return "untouched"
    assert head is not None
    assert [str(p) for p in lab.remote_commit(head).parent_ids] == [good], head
    assert backup == batch.b
    return "done"


def assert_nothing_lost(lab: RescueLab, batch: Batch, job_id: int) -> None:
    repo = lab.origin.repo
    backup = lab.remote_head(f"deployd/backup/{APP}/{job_id}")
    assert backup == batch.b
    for sha in (batch.a, batch.p):
        assert repo.descendant_of(backup, sha)


@pytest.mark.parametrize("moment", ["approved", "push-refused", "push-lands", "pushed",
                                    "push-lands-late"])
async def test_kill9_during_transplant_resumes(rescue_lab: MakeLab, moment: str) -> None:
    """kill -9 mid-transplant: remote untouched or fully done, job carries on, nothing lost."""
    lab: RescueLab = await rescue_lab(2)
    lab.commit_good()
    daemon = await lab.start_process()
    good, batch, job_id = await night_on_call(lab, daemon)
    plan = (await daemon.api.get(f"/api/v1/jobs/{job_id}"))["plan"]
    ctl = shared_dir("deployd-hook-")
    try:
        if moment.startswith("push-"):
            lab.install_hook("pre-receive", HOLDING_HOOK.format(ctl=ctl))
            # receive-pack sends keep-alives while a hook runs (every 5s by default); to a
            # client that is gone, that kills the orphaned push. Without them, whether it
            # lands is up to the hook alone, however long it holds.
            lab.origin.repo.config["receive.keepAlive"] = 0
            chown_tree(lab.origin.path)
        status, body = await approve(daemon, job_id, plan)
        assert status == 202, body

        if moment == "approved":
            daemon.kill9()
        elif moment == "pushed":
            await wait_event(daemon, "job.pushed")
            daemon.kill9()
        else:
            held = await wait_file(ctl / "held1")
            daemon.kill9()
            if moment == "push-refused":
                (ctl / "verdict1").write_text("deployd went away\n")
                await wait_file(ctl / "done1")
            elif moment == "push-lands":
                (ctl / "verdict1").write_text("lands\n")
                await wait_file(ctl / "done1")
                await wait_remote(lab, held)  # the orphaned push may still complete
            if moment != "push-lands-late":
                (ctl / "verdict2").write_text("lands\n")

        if moment != "push-lands-late":
            state = assert_remote_consistent(lab, good, batch, job_id)
            if moment == "push-refused":
                assert state == "untouched"
        await daemon.start()
        if moment == "push-lands-late":
            # The resumed transplant pushes while the first push is still held; then the
            # first one lands before the second is let through.
            await wait_file(ctl / "held2")
            (ctl / "verdict1").write_text("lands\n")
            await wait_file(ctl / "done1")
            landed = await wait_remote(lab, held)
            (ctl / "verdict2").write_text("lands\n")
            assert landed

        job = await wait_job(daemon, job_id, "succeeded", "failed", "superseded", within=60)
        log = (lab.root / "deployd.log").read_text()[-4000:]
        if moment == "pushed" and job["state"] == "failed":
            assert "restart" in job["error"], (job, log)
        else:
            assert job["state"] == "succeeded", (job, log)
        assert assert_remote_consistent(lab, good, batch, job_id) == "done"
        assert_nothing_lost(lab, batch, job_id)
        head = lab.remote_head()
        assert head == job["new_head"]
        rebuilt = lab.remote_commit(head)
        assert f"(cherry picked from commit {batch.p})" in rebuilt.message
        assert f"Rescue-Job: {APP}#{job_id}" in rebuilt.message
        if job["state"] == "succeeded":
            assert lab.live_revisions() == [head, head]
            await wait_event(daemon, "job.pushed")
        assert [j["id"] for j in (await daemon.api.get("/api/v1/jobs"))["jobs"]] == [job_id]
    finally:
        shutil.rmtree(ctl, ignore_errors=True)
