"""Two commits of the engine side by side in one run: this checkout's and another
(--base, any commit or branch), alternated --rounds times on one of compare.py's
workloads, each run in a process of its own on an embedded Redis of its own, so
that the host's moods fall on both alike. Prints every run, then each side's
medians: orders/s, and the CPU per order (user + system) of the engine's process and
of the Redis process (from /proc, over the measured orders only).

    .venv/bin/python bench/ab.py --base HEAD~3                        # hot SKU, 20,000 orders, 4 rounds
    .venv/bin/python bench/ab.py --base 928b8ae --workload rc --rounds 6

Workloads (compare.py's, 256 callers over 8 distributors, one code per order):
hot (deliver, 1 SKU), zipf (deliver, 100 SKUs Zipf 1.1), rc (reserve + confirm,
1 SKU, half as many orders). The base is checked out in a temporary git worktree,
with this checkout's compiled core where ext/ and setup.py are the same in both
(else it is built there); its bench/compare.py must have engine_row (which seeds,
runs and audits a workload) and Row as this one's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

WORKLOADS = {"hot": (1, None, "deliver", 1.0), "zipf": (100, 1.1, "deliver", 1.0), "rc": (1, None, "reserve", 0.5)}

# One measured run, in a child process of either checkout (argv: root, the workload's
# WORKLOADS entry as JSON, orders).
CHILD = r"""
import json, os, sys, tempfile
root, (skus, zipf_s, mode, share), n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
sys.path[:0] = [root, os.path.join(root, "bench")]
import uvloop
import compare
from dispatch.store.embedded import EmbeddedRedis

async def main():
    with tempfile.TemporaryDirectory() as d, EmbeddedRedis(os.path.join(d, "r")) as server:
        row = await compare.engine_row(server.url, d, server.pid, True, int(n * share), skus, zipf_s, mode)
    print(json.dumps({"rate": row.rate, "batch": row.batch, "engine_us": row.py_us, "redis_us": row.redis_us}))

uvloop.run(main())
"""


def git(*args: str, cwd: str = ROOT) -> str:
    got = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if got.returncode != 0:
        sys.exit(f"git {' '.join(args)}: {got.stderr.strip()}")
    return got.stdout.strip()


def checkout(base: str, where: str) -> str:
    """A worktree of *base* at *where*, with its compiled core; returns its commit."""
    commit = git("rev-parse", "--verify", f"{base}^{{commit}}")
    git("worktree", "add", "--detach", where, commit)
    if git("diff", "--name-only", commit, "--", "ext", "setup.py") == "":
        for so in glob.glob(os.path.join(ROOT, "dispatch", "*.so")):
            shutil.copy(so, os.path.join(where, "dispatch"))
    else:
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=where, check=True)
    return commit[:7]


def run(root: str, workload: str, orders: int) -> dict[str, float]:
    got = subprocess.run([sys.executable, "-c", CHILD, root, json.dumps(WORKLOADS[workload]), str(orders)],
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    if got.returncode != 0:
        sys.exit(f"a run in {root} failed:\n{got.stderr[-3000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def row(name: str, r: dict[str, float]) -> str:
    return f"{name:10} {r['rate']:>9,.0f} {r['batch']:>6.0f} {r['engine_us']:>10.1f} {r['redis_us']:>9.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit (or branch) to run against this checkout")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="hot")
    ap.add_argument("--orders", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    here = git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")
    with tempfile.TemporaryDirectory(prefix="dispatch-ab-") as tmp:
        where = os.path.join(tmp, "base")
        try:
            base = checkout(args.base, where)
            sides = {base: where, here: ROOT}
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
            print(f"{args.workload}, {args.orders:,} orders a run, {args.rounds} rounds; "
                  "CPU us per order (user + system)")
            print(f"{'side':10} {'orders/s':>9} {'batch':>6} {'engine us':>10} {'redis us':>9}")
            for _ in range(args.rounds):
                for name, root in sides.items():
                    r = run(root, args.workload, args.orders)
                    runs[name].append(r)
                    print(row(name, r), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", where], cwd=ROOT, capture_output=True)
    print("medians")
    for name, rows in runs.items():
        print(row(name, {k: statistics.median(r[k] for r in rows) for k in ("rate", "batch", "engine_us", "redis_us")}))


if __name__ == "__main__":
    main()
