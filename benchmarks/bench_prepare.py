"""Data preparation at scale: rows/s and peak RSS of ``orpo prep`` on large standard-format sources.

The script writes a JSON Lines file of N standard-format rows (``prompt`` / ``chosen`` /
``rejected`` strings; seeded; prompts of 40-400 characters, completions of 40-800, about
1.1 KB a row; 1 % exact duplicates, 0.5 % identical chosen/rejected, 2 % prompts
with a second pair) and runs ``python -m flows.cli prep RECIPE --no-tokenize`` on it for
every (rows, num_proc) combination, each in its own process tree. It prints wall time,
rows/s (rows read / wall seconds, CLI start-up included), the CPU seconds of the process
tree (user + system; on a shared, loaded machine wall time is not a measure of scaling,
CPU seconds show the overhead of more processes, and the split between the CLI process
and its workers shows the part that runs in parallel), and two peaks:

* peak RSS (tree): the largest sum of the resident set sizes of the CLI process and its
  worker processes, sampled every 50 ms (psutil);
* peak RSS (max process): the largest ``ru_maxrss`` of one process of the tree
  (``resource.getrusage(RUSAGE_CHILDREN)``).

    nice -n 5 python benchmarks/bench_prepare.py                       # 100k and 1M rows, num_proc 1 and 2
    nice -n 5 python benchmarks/bench_prepare.py --rows 100000 --num-proc 1

The generated files are kept in ``--workdir`` (default ``/tmp/orpo-bench-prepare``) and
reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the of and to in is that for it as with was on be by this are from or have an they which one you were "
    "her all she there would their we him been has when who will more no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like our "
    "over man me even most made after also did many before must through back years where much your way well"
).split()


def sentence(rng: random.Random, n_chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out).capitalize() + "."


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Write ``rows`` standard-format rows to ``path`` (JSON Lines), atomically.

    Texts come from seeded pools of 4,096 sentences (prompts 40-400 characters,
    completions 40-800); every prompt starts with its row number, so pairs are unique
    except the planted duplicates.
    """
    rng = random.Random(seed)
    prompts = [sentence(rng, rng.randint(40, 400)) for _ in range(4096)]
    answers = [sentence(rng, rng.randint(40, 800)) for _ in range(4096)]
    tmp = path.with_suffix(".tmp")
    prev: list[dict] = []
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(rows):
            r = rng.random()
            if prev and r < 0.01:  # exact duplicate of a recent row
                row = rng.choice(prev)
            elif prev and r < 0.03:  # a second pair for a recent prompt
                row = {"prompt": rng.choice(prev)["prompt"], "chosen": rng.choice(answers), "rejected": rng.choice(answers)}
            else:
                chosen = rng.choice(answers)
                row = {
                    "prompt": f"Question {i}: " + rng.choice(prompts),
                    "chosen": chosen,
                    "rejected": chosen if r < 0.035 else rng.choice(answers),
                }
            prev.append(row)
            if len(prev) > 64:
                prev.pop(0)
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)


def watch_tree(proc: subprocess.Popen, peak: list[int], cpu: dict[int, float], stop: threading.Event) -> None:
    """Sample the process tree every 50 ms: the peak sum of RSS, and the last-seen CPU
    seconds (user + system) of every process (``cpu[pid]``)."""
    import psutil

    try:
        p = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total = 0
        try:
            for q in [p, *p.children(recursive=True)]:
                try:
                    total += q.memory_info().rss
                    t = q.cpu_times()
                    cpu[q.pid] = t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        peak[0] = max(peak[0], total)
        time.sleep(0.05)


def run_prep(data: Path, rows: int, num_proc: int, workdir: Path) -> dict:
    run_dir = workdir / f"run-{rows}-{num_proc}"
    recipe = workdir / f"recipe-{rows}-{num_proc}.yaml"
    recipe.write_text(
        json.dumps(
            {
                "run_name": f"bench-{rows}-{num_proc}",
                "output_dir": str(run_dir),
                "data": {"sources": [{"path": str(data)}], "test_size": 0.05, "num_proc": num_proc},
            }
        )
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "flows.cli", "prep", str(recipe), "--no-tokenize"]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = ru0.ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    cpu_by_pid: dict[int, float] = {}
    stop = threading.Event()
    th = threading.Thread(target=watch_tree, args=(proc, peak, cpu_by_pid, stop), daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    max_proc = ru1.ru_maxrss * 1024
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"orpo prep failed ({proc.returncode}):\n{err[-3000:]}")
    stats = json.loads(out)
    return {
        "rows": rows,
        "num_proc": num_proc,
        "wall_s": wall,
        "cpu_s": cpu,
        # sampled: the CLI process (reading, spill, global steps, Parquet writing) vs the workers
        "cpu_main_s": cpu_by_pid.get(proc.pid, 0.0),
        "cpu_workers_s": sum(v for k, v in cpu_by_pid.items() if k != proc.pid),
        "rows_per_s": stats["rows_read"] / wall,
        "peak_rss_tree_gib": peak[0] / 2**30,
        # ru_maxrss of RUSAGE_CHILDREN is a running maximum: only meaningful when it grew
        "peak_rss_max_proc_gib": max_proc / 2**30 if max_proc > before * 1024 else None,
        "rows_kept": stats["rows_kept"],
        "dropped": stats["dropped"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="100000,1000000", help="comma-separated row counts")
    ap.add_argument("--num-proc", default="1,2", help="comma-separated data.num_proc values")
    ap.add_argument("--workdir", default="/tmp/orpo-bench-prepare")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in [int(x) for x in args.rows.split(",")]:
        data = workdir / f"standard-{rows}.jsonl"
        if not data.is_file():
            t = time.perf_counter()
            generate(data, rows)
            print(f"generated {data} ({data.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s", flush=True)
        for n in [int(x) for x in args.num_proc.split(",")]:
            r = run_prep(data, rows, n, workdir)
            results.append(r)
            mp = f"{r['peak_rss_max_proc_gib']:.2f}" if r["peak_rss_max_proc_gib"] is not None else "n/a"
            print(
                f"rows {rows:>9,}  num_proc {n}  {r['wall_s']:7.1f} s  {r['rows_per_s']:>9,.0f} rows/s  "
                f"cpu {r['cpu_s']:6.1f} s (main {r['cpu_main_s']:.1f} + workers {r['cpu_workers_s']:.1f})  "
                f"peak RSS tree {r['peak_rss_tree_gib']:.2f} GiB  max process {mp} GiB  "
                f"kept {r['rows_kept']:,}  dropped {r['dropped']}",
                flush=True,
            )
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
