"""The git side of an approved rescue: rebuild the branch and keep its old head.

The rebuilt head is the selection cherry-picked onto the base (or the resolved patch
committed on it), checked against the tree the approved plan names; the old head is kept
under a backup branch, in the mirror and on the remote, before the branch is pushed.
`Rescue.transplant` records each step and makes the push.
"""

from __future__ import annotations

from deployd.config import AppConfig
from deployd.errors import Conflict, GitError, Invalid, NotFound
from deployd.git import Mirror, RefUpdate
from deployd.rescue_preview import COMMITTER, Previewer
from deployd.store import Job


class Rebuilder:
    """Rebuilds one app's branch for its approved rescue jobs."""

    def __init__(self, app: AppConfig, *, mirror: Mirror, previewer: Previewer) -> None:
        self.app = app
        self.mirror = mirror
        self.previewer = previewer

    def backup_ref(self, job: Job) -> str:
        """The remote branch holding the old head: `refs/heads/<prefix>/<app>/<job id>`."""
        return f"refs/heads/{self.app.rescue.backup_prefix}/{self.app.name}/{job.id}"

    async def made_before(self, job: Job) -> str | None:
        """The commit an interrupted run of this job made, if the mirror still has it."""
        if job.new_head is None:
            return None
        try:
            return await self.mirror.resolve(job.new_head)
        except (NotFound, GitError):
            return None

    async def rebuild(self, job: Job, approver: str) -> str:
        """Make the new head in the mirror; Conflict unless its tree is the approved one."""
        marks = [("Rescue-Job", f"{self.app.name}#{job.id}"), ("Approved-by", approver)]
        if job.resolved_patch is not None:
            tree = await self.mirror.apply_patch(job.base, job.resolved_patch)
            author, credits = await self._patch_author(job, tree)
            marks = [marks[0], *credits, ("Resolved-by", job.resolved_by or job.last_changed_by),
                     marks[1]]
            new_head = await self.mirror.commit_tree(
                tree, job.base, like=job.selection, committer_name=COMMITTER[0],
                committer_email=COMMITTER[1], trailers=marks, author=author)
        else:
            result = await self.mirror.cherry_pick(
                job.base, job.selection, committer_name=COMMITTER[0],
                committer_email=COMMITTER[1], trailers=marks)
            if not result.clean:
                raise Invalid(f"{result.conflict} no longer applies cleanly")
            new_head, tree = result.head, result.tree
        if tree != job.preview.get("tree"):
            raise Conflict(f"rescue job {job.id}: the rebuilt tree differs from the approved "
                           "plan's; nothing pushed")
        return new_head

    async def _patch_author(self, job: Job, tree: str
                            ) -> tuple[tuple[str, str] | None, list[tuple[str, str]]]:
        """Who authors a resolved patch's commit, and the trailers crediting the originals.

        The original author (None: keep it) only while the patch brings in nothing the
        selected commits did not contain; otherwise the resolver, as `<name>@deployd.invalid`
        (API tokens have names, not mailboxes), with every original author named in an
        `Original-author:` trailer.
        """
        if not (await self.previewer.patch_scope(job, tree)).beyond_commits:
            return None, []
        resolver = job.resolved_by or job.last_changed_by
        originals: list[str] = []
        for sha in job.selection:
            info = await self.mirror.commit_info(sha)
            name = f"{info.author_name} <{info.author_email}>"
            if name not in originals:
                originals.append(name)
        return (resolver, f"{resolver}@deployd.invalid"), [("Original-author", o)
                                                            for o in originals]

    async def backup(self, job: Job) -> None:
        """Keep the old head: a local ref fetches never prune, and the same on the remote."""
        local = f"refs/deployd/backup/{self.app.name}/{job.id}"
        await self.mirror.create_ref(local, job.bad_head)
        await self.mirror.push([RefUpdate(job.bad_head, self.backup_ref(job), expected=None)])
