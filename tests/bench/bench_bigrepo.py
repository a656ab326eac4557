"""Benchmark: deployd on a repository of SQLAlchemy's size, next to the git CLI on the same data.

    python3 tests/bench/bench_bigrepo.py [--commits 30000] [--files 5000] [--range 10000]
                                         [--cases 40] [--small] [--profile DIR]
                                         [--code DIR]

Builds a synthetic history with `git fast-import` (a main line of `--commits` commits over
`--files` files, topic branches merged into it, renames, two release branches that get
backports, tags), serves it over `ssh://` from a real sshd on 127.0.0.1 as the unprivileged
test user (the server's git builds the packs, as in production), and prints side by side:

- first mirror until ready: deployd's `Mirror.fetch` into an empty mirror (plus reading the
  branch head) vs `git clone --mirror` of the same ssh:// URL;
- a later fetch with nothing new: `Mirror.fetch` vs `git fetch` in that clone;
- opening a rescue job, p50/p95 over `--cases` commits of a bad range of `--range` commits:
  deployd's `Rescue.open` (candidates listed, the selected commit merged three-way onto the
  base, conflicts found) plus `Rescue.describe` of the job, vs `git cherry-pick` of the same
  commit onto the base in a scratch clone; then the same by hand as
  `POST /api/v1/apps/{app}/jobs` does it (`AppSupervisor.open_job`: a fetch first). The very
  first opening runs cold (the bad range never walked before);
- the daemon side's peak RSS (VmHWM of the process playing the daemon) through all of it.

It also checks that both agree on every case: the same tree when the pick is clean, the same
conflicting paths when not. `--profile DIR` writes cProfile files of the daemon side's first
mirror and of the job openings (the event loop's thread only; for the worker threads, run
the script under `py-spy record --subprocesses`). Everything it makes lives in two temporary
directories, removed at the end (also on failure or Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_300_000_000  # author time of the first commit; each commit is an hour later


# ------------------------------------------------------------------- the synthetic history


@dataclass
class _Branch:
    """A branch being written: its files (path -> lines), its last commit mark."""

    files: dict[str, list[str]]
    head: int


@dataclass
class History:
    """What the generator made, for choosing the rescue cases."""

    main_marks: list[int] = field(default_factory=list)  # first-parent line of main
    history_at: dict[int, int] = field(default_factory=dict)  # main mark -> commits so far
    renamed_at: dict[str, int] = field(default_factory=dict)  # new path -> rename's mark
    touches: dict[int, list[str]] = field(default_factory=dict)  # commit mark -> paths
    merges: int = 0
    renames: int = 0
    backports: int = 0


class Generator:
    """Writes a `git fast-import` stream of a big, plausible history."""

    def __init__(self, out: IO[bytes], *, commits: int, files: int, seed: int = 12) -> None:
        self.out = out
        self.commits = commits
        self.nfiles = files
        self.rng = random.Random(seed)
        self.mark = 0
        self.time = T0
        self.history = History()
        self.made = 0  # commits reachable from main so far
        self.paths: list[str] = []  # main's paths, as a sequence to sample from

    def _next_mark(self) -> int:
        self.mark += 1
        return self.mark

    def _line(self) -> str:
        r = self.rng.randrange
        return f"    value_{r(100000)} = session.compute(arg_{r(1000)}, {r(10**6)})\n"

    def _blob(self, lines: list[str]) -> int:
        data = "".join(lines).encode()
        mark = self._next_mark()
        self.out.write(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)) + data + b"\n")
        return mark

    def _commit(self, ref: str, message: str, parents: list[int], changes: list[str]) -> int:
        mark = self._next_mark()
        self.time += 3600
        who = self.rng.choice(["Mike Bayer", "Federico Caselli", "Gord Thompson", "Ann Dev"])
        email = who.lower().replace(" ", ".") + "@example.com"
        msg = message.encode()
        head = [f"commit {ref}", f"mark :{mark}",
                f"author {who} <{email}> {self.time} +0000",
                f"committer {who} <{email}> {self.time} +0000",
                f"data {len(msg)}"]
        self.out.write(("\n".join(head) + "\n").encode() + msg + b"\n")
        if parents:
            self.out.write(f"from :{parents[0]}\n".encode())
        for parent in parents[1:]:
            self.out.write(f"merge :{parent}\n".encode())
        if changes:
            self.out.write(("\n".join(changes) + "\n").encode())
        self.out.write(b"\n")
        return mark

    def _message(self, path: str) -> str:
        n = self.rng.randrange(10000)
        body = f"Adjust {Path(path).stem} for issue #{n}.\n\nThe value was computed twice."
        trailer = f"\n\nFixes: #{n}\nChange-Id: I{self.rng.getrandbits(160):040x}\n"
        return f"Fix #{n} in {path}\n\n{body}{trailer}"

    def _edit(self, files: dict[str, list[str]], path: str,
              at: int | None = None, new: list[str] | None = None) -> tuple[int, list[str]]:
        """Replace 1-4 lines of `path` (copy on write); return where and with what."""
        lines = list(files[path])
        if at is None or new is None:
            at = self.rng.randrange(len(lines))
            new = [self._line() for _ in range(self.rng.randint(1, 4))]
        at = min(at, len(lines) - 1)
        lines[at:at + len(new)] = new
        files[path] = lines
        return at, new

    def _modify(self, branch: _Branch, ref: str, paths: list[str]) -> tuple[int, list[Any]]:
        edits = []
        changes = []
        for path in paths:
            at, new = self._edit(branch.files, path)
            edits.append((path, at, new))
            changes.append(f"M 100644 :{self._blob(branch.files[path])} {path}")
        branch.head = self._commit(ref, self._message(paths[0]), [branch.head], changes)
        self.history.touches[branch.head] = paths
        return branch.head, edits

    def generate(self) -> History:
        files: dict[str, list[str]] = {}
        for i in range(self.nfiles):
            top = "lib/sqlalchemy" if i % 3 else "test"
            path = f"{top}/pkg{i % 97:02d}/mod{i:05d}.py"
            files[path] = [self._line() for _ in range(self.rng.randint(30, 110))]
        changes = [f"M 100644 :{self._blob(lines)} {path}" for path, lines in files.items()]
        self.paths = list(files)
        main = _Branch(files, 0)
        main.head = self._commit("refs/heads/main", "Initial import\n", [], changes)
        self._on_main(main.head)
        releases: list[tuple[str, _Branch]] = []
        forks = {int(self.commits * 0.45): "rel_1_4", int(self.commits * 0.75): "rel_2_0"}
        tagged = 0
        while self.made < self.commits:
            for at in [at for at in forks if self.made >= at]:
                releases.append((f"refs/heads/{forks.pop(at)}",
                                 _Branch(dict(main.files), main.head)))
            roll = self.rng.random()
            if roll < 0.01 and self.commits - self.made > 5:
                self._topic(main)
            elif roll < 0.017:
                self._rename(main)
            else:
                paths = self.rng.sample(self.paths, self.rng.choice([1, 1, 1, 2, 3]))
                mark, edits = self._modify(main, "refs/heads/main", paths)
                self._on_main(mark)
                if releases and self.rng.random() < 0.08:
                    self._backport(self.rng.choice(releases), edits)
            if self.made // 1000 > tagged:
                tagged = self.made // 1000
                self.out.write(f"reset refs/tags/v{tagged}.0\nfrom :{main.head}\n\n".encode())
        self.out.write(b"reset refs/heads/production\nfrom :%d\n\n" % main.head)
        return self.history

    def _on_main(self, mark: int) -> None:
        self.made += 1
        self.history.main_marks.append(mark)
        self.history.history_at[mark] = self.made

    def _topic(self, main: _Branch) -> None:
        """A topic branch of 2-3 commits merged into main with a merge commit."""
        topic = _Branch(main.files, main.head)  # shares main's files: main gets them merged
        fork = main.head
        touched: set[str] = set()
        for _ in range(self.rng.randint(2, 3)):
            paths = self.rng.sample(self.paths, 1)
            self._modify(topic, "refs/heads/topic", paths)
            self.made += 1
            touched.update(paths)
        changes = [f"M 100644 :{self._blob(main.files[p])} {p}" for p in sorted(touched)]
        main.head = self._commit("refs/heads/main", "Merge branch 'topic'\n",
                                 [fork, topic.head], changes)
        self._on_main(main.head)
        self.history.merges += 1

    def _rename(self, main: _Branch) -> None:
        old = self.rng.choice(self.paths)
        new = f"lib/sqlalchemy/moved{self.rng.randrange(30):02d}/{Path(old).name}"
        if new in main.files:
            return
        main.files[new] = main.files.pop(old)
        self.paths[self.paths.index(old)] = new
        main.head = self._commit("refs/heads/main", f"Move {old} to {new}\n", [main.head],
                                 [f"R {old} {new}"])
        self.history.renamed_at[new] = main.head
        self.history.renames += 1
        self._on_main(main.head)

    def _backport(self, release: tuple[str, _Branch], edits: list[Any]) -> None:
        ref, branch = release
        changes = []
        for path, at, new in edits:
            if path in branch.files:
                self._edit(branch.files, path, at, new)
                changes.append(f"M 100644 :{self._blob(branch.files[path])} {path}")
        if changes:
            branch.head = self._commit(ref, self._message(edits[0][0]), [branch.head], changes)
            self.history.backports += 1


def build_origin(path: Path, commits: int, files: int, marks: Path) -> History:
    subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True)
    importer = subprocess.Popen(
        ["git", "-C", str(path), "fast-import", "--quiet", f"--export-marks={marks}"],
        stdin=subprocess.PIPE)
    assert importer.stdin is not None
    with importer.stdin as stream:
        history = Generator(stream, commits=commits, files=files).generate()
    if importer.wait() != 0:
        raise SystemExit("git fast-import failed")
    subprocess.run(["git", "-C", str(path), "symbolic-ref", "HEAD", "refs/heads/production"],
                   check=True)
    subprocess.run(["git", "-C", str(path), "repack", "-q", "-a", "-d"], check=True)
    return history


def read_marks(marks: Path) -> dict[int, str]:
    found = {}
    for line in marks.read_text().splitlines():
        mark, sha = line.split()
        found[int(mark[1:])] = sha
    return found


# ------------------------------------------------------------------- the daemon side (child)


def _status(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(name)


async def _daemon_side(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    from deployd.config import AppConfig
    from deployd.context import AppContext
    from deployd.fleet import Fleet
    from deployd.git import GitHome, Mirror
    from deployd.health import HealthMonitor
    from deployd.hosts import HostPool
    from deployd.metrics import Metrics
    from deployd.rescue import Rescue
    from deployd.store import JobStore, Store
    from deployd.supervisor import AppSupervisor

    state = Path(spec["state"])
    profile = spec.get("profile")
    app = AppConfig(name="bench", repo=spec["url"], branch="production", deploy_to="/srv/x",
                    hosts=(), repo_key=Path(spec["key"]),
                    repo_known_hosts=Path(spec["known_hosts"]))
    mirror = Mirror(state / "mirrors" / "bench.git", spec["url"], name="bench",
                    home=GitHome(state / "git-home"), key=Path(spec["key"]),
                    known_hosts=Path(spec["known_hosts"]))
    store = Store(state / "deployd.sqlite3")
    await store.open()
    metrics = Metrics()
    rescue = Rescue(app, store=store, jobs=JobStore(store), mirror=mirror, metrics=metrics)
    session = aiohttp.ClientSession()
    health = HealthMonitor(app, session, metrics)
    sup = AppSupervisor(AppContext(app, store=store, mirror=mirror,
                                   fleet=Fleet(app, HostPool(), metrics), metrics=metrics,
                                   health=health, rescue=rescue))
    out: dict[str, Any] = {"rss_start": _status("VmRSS")}
    try:
        profiler = cProfile.Profile() if profile else None
        began = time.perf_counter()
        if profiler:
            profiler.enable()
        await mirror.fetch()
        head = await mirror.branch_head("production")
        if profiler:
            profiler.disable()
            profiler.dump_stats(f"{profile}/first-mirror.prof")
        out["first_mirror"] = time.perf_counter() - began
        out["rss_after_mirror"] = _status("VmHWM")
        assert head == spec["head"], (head, spec["head"])
        noop = []
        for _ in range(5):
            began = time.perf_counter()
            await mirror.fetch()
            noop.append(time.perf_counter() - began)
        out["noop_fetch"] = noop
        profiler = cProfile.Profile() if profile else None
        cases = []
        for n, sha in enumerate(spec["cases"]):
            if profiler and n:  # the first opening warms caches: profile the steady state
                profiler.enable()
            began = time.perf_counter()
            job = await rescue.open(base=spec["base"], bad_head=head, requester="bench",
                                    reason="bench", commits=[sha])
            body = await rescue.describe(job)
            took = time.perf_counter() - began
            if profiler:
                profiler.disable()
            # Nobody approves: end the job so the next one is opened like the first.
            await rescue.reject(job.id, actor="bench", comment="")
            began = time.perf_counter()
            by_hand = await sup.open_job(commits=[sha], base=spec["base"], actor="bench")
            await rescue.describe(by_hand)
            took_by_hand = time.perf_counter() - began
            await rescue.reject(by_hand.id, actor="bench", comment="")
            picked = _selected(rescue, job, body, sha)
            cases.append({"sha": sha, "seconds": took, "by_hand": took_by_hand,
                          "candidates": _count(body),
                          "clean": picked["applies_cleanly"],
                          "paths": picked["conflicting_paths"],
                          "tree": job.preview.get("tree") if picked["applies_cleanly"]
                          else None})
        if profiler:
            profiler.dump_stats(f"{profile}/open-job.prof")
        out["cases"] = cases
        out["rss_peak"] = _status("VmHWM")
        return out
    finally:
        await session.close()
        await store.close()


def _selected(rescue: Any, job: Any, body: dict[str, Any], sha: str) -> dict[str, Any]:
    """The selected candidate as the job shows it (on whichever page of the list)."""
    listed = [c for c in body["candidates"] if c["sha"] == sha]
    if not listed:
        from deployd.rescue_preview import candidates_of  # the list is paginated

        listed = [c for c in candidates_of(job) if c["sha"] == sha]
    return dict(listed[0])


def _count(body: dict[str, Any]) -> int:
    total = body.get("candidates_total")
    return int(total) if total is not None else len(body["candidates"])


def _child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    print(json.dumps(asyncio.run(_daemon_side(spec))))


# ------------------------------------------------------------------- the git CLI side (parent)


def _git(*args: str, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["git", *args], env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _timed(*args: str, env: dict[str, str] | None = None) -> float:
    began = time.perf_counter()
    _git(*args, env=env)
    return time.perf_counter() - began


@dataclass
class GitSide:
    clone: float
    noop_fetch: list[float]
    cases: dict[str, dict[str, Any]]


def git_side(url: str, env: dict[str, str], workdir: Path, base: str,
             cases: list[str]) -> GitSide:
    mirror = workdir / "git-mirror.git"
    clone = _timed("clone", "-q", "--mirror", url, str(mirror), env=env)
    noop = [_timed("-C", str(mirror), "fetch", "-q", "--prune", env=env) for _ in range(5)]
    scratch = workdir / "git-scratch"
    _git("clone", "-q", "--no-checkout", str(mirror), str(scratch))
    _git("-C", str(scratch), "-c", "advice.detachedHead=false", "checkout", "-q", base)
    results = {}
    for sha in cases:
        _git("-C", str(scratch), "reset", "-q", "--hard", base)
        began = time.perf_counter()
        picked = _git("-C", str(scratch), "-c", "user.name=bench", "-c",
                      "user.email=bench@localhost", "cherry-pick", sha, check=False)
        took = time.perf_counter() - began
        unmerged = _git("-C", str(scratch), "diff", "--name-only", "--diff-filter=U").stdout
        paths = sorted(set(unmerged.split()))
        if picked.returncode == 0 or not paths:  # applied, or empty (already in the base)
            tree = _git("-C", str(scratch), "write-tree").stdout.strip()
            results[sha] = {"seconds": took, "clean": True, "paths": [], "tree": tree}
        else:
            results[sha] = {"seconds": took, "clean": False, "paths": paths, "tree": None}
        _git("-C", str(scratch), "cherry-pick", "--abort", check=False)
    return GitSide(clone, noop, results)


# ------------------------------------------------------------------- choosing the cases


def choose(history: History, marks: dict[int, str], bad_range: int,
           count: int) -> tuple[str, list[str], dict[str, str]]:
    """The base (`bad_range` commits below main's head) and the commits to rescue."""
    total = history.history_at[history.main_marks[-1]]
    base_mark = next(m for m in reversed(history.main_marks)
                     if history.history_at[m] <= total - bad_range)
    later = [m for m in history.main_marks
             if history.history_at[m] > history.history_at[base_mark] and m in history.touches]
    step = max(1, len(later) // count)
    picked = later[::step][:count]
    # A few commits touching files renamed after the base: the pick must follow the rename.
    renamed = [m for m in later if m not in picked and any(
        base_mark < history.renamed_at.get(path, 0) < m for path in history.touches[m])]
    picked += random.Random(7).sample(renamed, min(len(renamed), max(2, count // 8)))
    kinds = {marks[m]: "rename" for m in renamed}
    return marks[base_mark], [marks[m] for m in picked], kinds


# ------------------------------------------------------------------- main


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=30_000)
    parser.add_argument("--files", type=int, default=5_000)
    parser.add_argument("--range", type=int, default=10_000, dest="bad_range")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--small", action="store_true",
                        help="a quick run: 3,000 commits, 800 files, a range of 1,000")
    parser.add_argument("--profile", help="write cProfile files of the daemon side here")
    parser.add_argument("--code", default=str(ROOT / "daemon"),
                        help="the daemon/ tree whose deployd package plays the daemon side "
                             "(e.g. an older one from `git archive OLD daemon | tar -x -C DIR`)")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    if args.small:
        args.commits, args.files, args.bad_range, args.cases = 3_000, 800, 1_000, 20
    if args.profile:
        args.profile = str(Path(args.profile).resolve())
    sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]
    from tests.support.sshd import ClientKey, SshdHost, chown_tree, shared_dir

    private = Path(tempfile.mkdtemp(prefix="deployd-bench-bigrepo-"))
    served = shared_dir("deployd-bench-bigrepo-origin-")
    # home set here: SshdHost.cleanup() removes it, and its default is the current directory.
    # The sshd's files live where the test user can read them (its authorized_keys).
    host = SshdHost(workdir=served / "sshd", client_key=ClientKey.create(private),
                    home=served / "home")
    try:
        began = time.perf_counter()
        origin = served / "origin.git"
        history = build_origin(origin, args.commits, args.files, private / "marks")
        marks = read_marks(private / "marks")
        objects = _git("-C", str(origin), "count-objects", "-v").stdout
        count = sum(int(line.split()[1]) for line in objects.splitlines()
                    if line.startswith(("count:", "in-pack:")))
        base, cases, kinds = choose(history, marks, args.bad_range, args.cases)
        head = _git("-C", str(origin), "rev-parse", "production").stdout.strip()
        (served / "home").mkdir()
        chown_tree(served)  # the sshd login (the test user) serves it
        print(f"history: {history.history_at[history.main_marks[-1]]} commits on main "
              f"({history.merges} merges, {history.renames} renames), {history.backports} "
              f"backports on 2 release branches, {args.files} files, {count} objects; "
              f"built in {time.perf_counter() - began:.0f} s", flush=True)
        host.start()
        known_hosts = private / "known_hosts"
        known_hosts.write_text(host.known_hosts_line() + "\n")
        url = f"ssh://{host.user}@127.0.0.1:{host.port}{origin}"
        env = {**os.environ, "GIT_SSH_COMMAND": (
            f"ssh -i {host.client_key.private} -o IdentitiesOnly=yes -o BatchMode=yes "
            f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes")}
        git = git_side(url, env, private, base, cases)
        spec = {"url": url, "key": str(host.client_key.private),
                "known_hosts": str(known_hosts), "state": str(private / "daemon"),
                "head": head, "base": base, "cases": cases, "profile": args.profile}
        spec_path = private / "spec.json"
        spec_path.write_text(json.dumps(spec))
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(spec_path)],
            env={**os.environ, "PYTHONPATH": f"{args.code}:{ROOT}"},
            capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise SystemExit(f"the daemon side failed:\n{child.stderr[-4000:]}")
        report(json.loads(child.stdout.strip().splitlines()[-1]), git, kinds)
    finally:
        host.cleanup()
        shutil.rmtree(served, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def report(ours: dict[str, Any], git: GitSide, kinds: dict[str, str]) -> None:
    opened = [c["seconds"] for c in ours["cases"]]
    by_hand = [c["by_hand"] for c in ours["cases"]]
    picked = [git.cases[c["sha"]]["seconds"] for c in ours["cases"]]
    rows = [
        ("first mirror until ready", _ms(ours["first_mirror"]), _ms(git.clone),
         "git clone --mirror"),
        ("fetch with nothing new (median of 5)", _ms(statistics.median(ours["noop_fetch"])),
         _ms(statistics.median(git.noop_fetch)), "git fetch"),
        ("rescue job opened + previewed p50", _ms(_percentile(opened, 0.5)),
         _ms(_percentile(picked, 0.5)), "git cherry-pick"),
        ("rescue job opened + previewed p95", _ms(_percentile(opened, 0.95)),
         _ms(_percentile(picked, 0.95)), "git cherry-pick"),
        ("  the first of them (cold)", _ms(opened[0]), _ms(picked[0]), "git cherry-pick"),
        ("opened by hand (fetch first) p50", _ms(_percentile(by_hand, 0.5)),
         _ms(_percentile(picked, 0.5)), "git cherry-pick"),
        ("daemon peak RSS", f"{ours['rss_peak'] / 2**20:.0f} MB", "-", ""),
    ]
    print(f"{len(ours['cases'])} rescue cases, {ours['cases'][0]['candidates']} candidates "
          "each")
    print(f"{'figure':<38}{'deployd':>10}{'git CLI':>10}")
    for label, mine, theirs, how in rows:
        print(f"{label:<38}{mine:>10}{theirs:>10}  {how}")
    print(f"(daemon RSS at start {ours['rss_start'] / 2**20:.0f} MB, peak after the first "
          f"mirror {ours['rss_after_mirror'] / 2**20:.0f} MB)")
    agree = conflicts = renames = 0
    for case in ours["cases"]:
        theirs = git.cases[case["sha"]]
        same = case["clean"] == theirs["clean"] and (
            case["tree"] == theirs["tree"] if case["clean"]
            else sorted(case["paths"]) == theirs["paths"])
        agree += same
        conflicts += not theirs["clean"]
        renames += kinds.get(case["sha"]) == "rename"
        if not same:
            print(f"  differs on {case['sha'][:12]}: deployd clean={case['clean']} "
                  f"{case['paths']} tree={case['tree']}; git clean={theirs['clean']} "
                  f"{theirs['paths']} tree={theirs['tree']}")
    print(f"results agree with git on {agree}/{len(ours['cases'])} cases "
          f"({conflicts} conflicting, {renames} on files renamed after the base)")


if __name__ == "__main__":
    main()
