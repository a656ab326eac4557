"""Benchmark: the daemon's memory and time for a release of one 100 MiB blob, and of 5,000 files.

    python3 tests/bench/bench_release.py [--hosts 3] [--blob-mib 100] [--files 5000]
                                         [--code DIR ...]

Each release is a commit in a real origin repository, fetched once into a mirror. Then, for
each `--code` directory (a `daemon/` tree holding the `deployd` package: by default this
checkout's; give an older one, e.g. from `git archive OLD daemon | tar -x -C DIR`, to compare)
a fresh Python process plays the daemon: it opens the mirror, connects to `--hosts` real sshd
hosts, and times `Mirror.archive` (build) then `Fleet.deploy` of that archive to every host,
then the same revision again (a redeploy: the archive comes from the cache). It prints the
wall times, the peak RSS above what the process held before the build (VmHWM after resetting
it), and the RSS still held after the deploys (what the archive cache keeps in memory).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


# ------------------------------------------------------------------- the daemon side (child)


async def _measure(spec: dict[str, Any]) -> dict[str, float]:
    from deployd.config import AppConfig, HostConfig, SSHConfig
    from deployd.fleet import Fleet
    from deployd.git import Mirror
    from deployd.hosts import HostPool

    hosts = tuple(HostConfig(address="127.0.0.1", port=port, deploy_to=deploy_to)
                  for port, deploy_to in spec["hosts"])
    app = AppConfig(name="bench", repo=spec["origin"], branch="production",
                    deploy_to=hosts[0].deploy_to, hosts=hosts, keep_releases=2,
                    ssh=SSHConfig(user=spec["user"], key=Path(spec["key"]),
                                  known_hosts=Path(spec["known_hosts"])))
    mirror = Mirror(Path(spec["mirror"]), spec["origin"], name="bench")
    pool = HostPool()
    fleet = Fleet(app, pool)
    try:
        if await fleet.connect():
            raise SystemExit("could not connect to every host")
        sha = spec["sha"]
        await mirror.resolve(sha)  # opens the repository
        gc.collect()
        baseline = _status("VmRSS")
        anon, file = _status("RssAnon"), _status("RssFile")
        _reset_peak()
        began = time.perf_counter()
        archive = await mirror.archive(sha)
        built = time.perf_counter()
        await fleet.deploy(sha, archive, branch="production", actor="bench")
        deployed = time.perf_counter()
        del archive
        again = await mirror.archive(sha)
        await fleet.deploy(sha, again, branch="production", actor="bench")
        redeployed = time.perf_counter()
        del again
        peak = _status("VmHWM")
        gc.collect()
        return {"build": built - began, "deploy": deployed - built,
                "redeploy": redeployed - deployed, "peak": peak - baseline,
                "held": _status("VmRSS") - baseline,
                "held_anon": _status("RssAnon") - anon, "held_file": _status("RssFile") - file}
    finally:
        await pool.close()


def _child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    sys.path[:0] = [spec["code"]]
    print(json.dumps(asyncio.run(_measure(spec))))


# ------------------------------------------------------------------- set-up (parent)


def _origin(path: Path, files: dict[str, bytes]) -> str:
    from tests.support.gitrepo import OriginRepo

    origin = OriginRepo(path)
    return origin.commit(files, "release")  # type: ignore[arg-type]


def _fetch(mirror: Path, origin: Path) -> None:
    from deployd.git import Mirror

    asyncio.run(Mirror(mirror, str(origin), name="bench").fetch())


def _run_child(spec: dict[str, Any], workdir: Path) -> dict[str, float]:
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measurement failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--blob-mib", type=int, default=100)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--code", nargs="+", default=[str(ROOT / "daemon")])
    parser.add_argument("--child")
    parser.add_argument("--only", choices=["blob", "files"])
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]
    from tests.support.sshd import (
        ClientKey,
        SshdHost,
        remove_hosts,
        start_hosts,
        write_known_hosts,
    )

    workdir = Path(tempfile.mkdtemp(prefix="deployd-bench-release-"))
    key = ClientKey.create(workdir)
    hosts: list[SshdHost] = []
    try:
        hosts = start_hosts(args.hosts, key, "deployd-bench-sshd-")
        known_hosts = write_known_hosts(workdir / "known_hosts", hosts)
        releases = {
            f"one {args.blob_mib} MiB blob": {"big.bin": os.urandom(args.blob_mib << 20)},
            f"{args.files} small files": {f"app/d{i % 50}/f{i}.rb": f"# {i}\n".encode() * 20
                                          for i in range(args.files)},
        }
        print(f"{args.hosts} sshd hosts; build = Mirror.archive, deploy = Fleet.deploy of it, "
              "redeploy = both again for the same revision; RSS above the process's own "
              "before the build")
        for n, (label, files) in enumerate(releases.items()):
            if args.only and args.only not in label:
                continue
            origin = workdir / f"origin{n}.git"
            sha = _origin(origin, files)
            del files
            mirror = workdir / f"mirror{n}.git"
            _fetch(mirror, origin)
            for code in args.code:
                spec = {"code": code, "origin": str(origin), "mirror": str(mirror), "sha": sha,
                        "hosts": [(h.port, str(h.home / f"app{n}")) for h in hosts],
                        "user": hosts[0].user, "key": str(key.private),
                        "known_hosts": str(known_hosts)}
                r = _run_child(spec, workdir)
                print(f"{label:<22} {code}\n    build {r['build']:6.2f}s  deploy "
                      f"{r['deploy']:6.2f}s  redeploy {r['redeploy']:6.2f}s  peak RSS "
                      f"+{r['peak'] / 2**20:6.1f} MiB  held after +{r['held'] / 2**20:6.1f} MiB "
                      f"(anonymous {r['held_anon'] / 2**20:+.1f}, "
                      f"files {r['held_file'] / 2**20:+.1f})")
    finally:
        remove_hosts(hosts)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
