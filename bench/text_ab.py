"""Text queries over HTTP, the server of one commit beside another's, on one bundle and index.

Each commit's code is checked out into a temporary git worktree and put first on sys.path (a
folder of links that lays the worktree out as the `dsmd` package; an editable install's finder
is dropped), so both servers run with this checkout's installed dependencies; the number of
paths in each server's spec is recorded to show which code answered. They are started in turn for several rounds (the
machine's drift hits both alike), each round: wrk with a unique text per request at
concurrency 1 (p50) and 8 (req/s), GET /search?text=...&k=10.

    .venv/bin/python bench/text_ab.py c190665 HEAD --bundle artifacts/bundle --index artifacts/index

Writes bench/results/text-ab/{results.json,table.md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import wrk
from common import ROOT, machine, machine_line

STAGES = ("distill", "export", "index", "serve")  # folders installed as dsmd.<name>


def package_of(commit: str, work: Path) -> Path:
    """A folder whose `dsmd` package is the code of `commit` (a worktree laid out as the install does)."""
    tree = work / f"tree-{commit}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                   capture_output=True)
    site = work / f"site-{commit}"
    pkg = site / "dsmd"
    pkg.mkdir(parents=True)
    for f in (tree / "dsmd").iterdir():
        (pkg / f.name).symlink_to(f)
    for stage in STAGES:
        (pkg / stage).symlink_to(tree / stage)
    return site


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(site: Path, bundle: Path, index: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    # an editable install's finder (site-packages/__editable__*) would find this checkout's dsmd before
    # any path entry: drop it, put the worktree first, then run the command as `python -m dsmd.cli` would
    launch = ("import sys, runpy; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
              f"getattr(f, '__module__', '') and 'editable' not in str(f)]; sys.path.insert(0, {str(site)!r}); "
              "runpy.run_module('dsmd.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", launch, "serve", "--bundle", str(bundle), "--index", str(index),
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server of {site.name} did not start")


def routes(url: str) -> int:
    """How many paths the server's spec has: tells the two commits' servers apart (a check that each
    worktree is the code served, not this checkout)."""
    import httpx

    return len(httpx.get(f"{url}/openapi.json").json()["paths"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("commits", nargs=2, help="the two commits (e.g. c190665 HEAD)")
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--index", default="artifacts/index")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--out", default=str(ROOT / "bench/results/text-ab"))
    a = p.parse_args()
    if not wrk.available():
        sys.exit("wrk is not installed: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="text-ab-"))
    sites, results = {}, {}
    try:
        for c in a.commits:
            sites[c] = package_of(c, work)
        for r in range(a.rounds):
            for c in a.commits:
                proc, url = serve(sites[c], Path(a.bundle).resolve(), Path(a.index).resolve())
                try:
                    paths = routes(url)
                    one = wrk.run(f"{url}/search", wrk.text_script(), 1, a.seconds)
                    eight = wrk.run(f"{url}/search", wrk.text_script(), 8, a.seconds)
                finally:
                    proc.terminate()
                    proc.wait(10)
                statuses = {k: one["statuses"].get(k, 0) + eight["statuses"].get(k, 0)
                            for k in {*one["statuses"], *eight["statuses"]}}
                results.setdefault(c, []).append({"p50_ms_c1": one["p50_ms"], "rps_c8": eight["req_s"], "paths": paths,
                                                  "statuses": statuses})
                print(f"round {r + 1} {c} ({paths} paths in its spec): p50 {one['p50_ms']:.2f} ms at 1, "
                      f"{eight['req_s']:.0f} req/s at 8", flush=True)
    finally:
        for c in a.commits:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / f"tree-{c}")],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine(), "bundle": a.bundle, "index": a.index,
                                                  "rounds": results}, indent=1))
    md = [f"Command: `.venv/bin/python bench/text_ab.py {' '.join(sys.argv[1:])}`; {machine_line()}\n",
          "| server of | p50 ms at 1 connection (median; each round) | req/s at 8 (median; each round) |",
          "|---|---|---|"]
    for c, rows in results.items():
        p50s, rps = [x["p50_ms_c1"] for x in rows], [x["rps_c8"] for x in rows]
        md.append(f"| {c} | {statistics.median(p50s):.2f} ({', '.join(f'{v:.2f}' for v in p50s)}) | "
                  f"{statistics.median(rps):.0f} ({', '.join(f'{v:.0f}' for v in rps)}) |")
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
