"""`python -m mlx_qwen35.experts.bench_scale`: decode speed and I/O of streamed experts on a synthetic 4-bit
MoE checkpoint larger than the cache budget (default 8 layers x 512 experts at Qwen3.5-397B expert shapes,
32 GB of experts, against a 6 GB budget), side by side on the same bytes:

- `ours`: ExpertCache (adaptive LRFU) with next-layer prefetch. A random-weight router cannot predict a trace, so the
  lookahead here is modelled: it names `--lookahead-precision` of the next layer's experts correctly (0.7, as
  public next-layer-gate reports), the rest at random;
- `ours-noprefetch`: the same cache without prefetch (the policy alone); `lru`: the same cache with plain LRU;
- `mlx-vlm`: mlx-vlm 0.7.10's `moe_offload.ExpertStore` + `OffloadedSwitchGLU`, on the same files;
- `mmap`: no application cache, experts copied out of an mmap of the store (the OS page cache is the cache);
- `floor`: ours with every token routed to the same experts (all hits): the compute floor per token.

Routing comes from traces (traces.py): `realistic` (fitted to flash-moe's Qwen3.5-397B statistics),
`realistic-low` (calibrated to Swiftlet's exact-routing 397B hit rate, a pessimistic bound), and the
`uniform` and `shuffled` controls. Every run is a fresh process, after `drop_caches`, inside a memory cgroup
capped at resident weights + budget + margin, so the page cache cannot hold what the budget excludes. Results
and the commands used are in docs/benchmarks.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import traces
from ..bench import PLAIN_CPU
from .bench_engines import ENGINES, PLAIN_CPU_ENGINES, TRACES, child, make_trace

DEFAULT_PATH = Path("/tmp/mlx-qwen35-expert-bench")
CGROUP_NAME = "mlx-qwen35-expert-bench"


# ------------------------------------------------------------------------------------------ the parent run
def _own_memory_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, where = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / where.lstrip("/")
    return None


def make_cgroup(limit_bytes: int) -> Path | None:
    """A cgroup-v1 memory cgroup under our own, capped at `limit_bytes` (page cache included)."""
    parent = _own_memory_cgroup()
    if parent is None or not parent.exists():
        return None
    group = parent / CGROUP_NAME
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return group
    except OSError as error:
        print(f"# no memory cgroup ({error}); the page cache is not capped", file=sys.stderr)
        return None


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def fadvise_dontneed(path: Path):
    """The fallback without root: ask the kernel to drop the store's cached pages."""
    for file in (path / "expert_store").glob("*.experts"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _running(name: str | None) -> bool:
    """Whether another process has `name` as one of its arguments (e.g. a shared machine's training module)."""
    if not name:
        return False
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if name.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    return True
            except OSError:
                continue
    return False


def run_one(args, engine: str, trace: str, group: Path | None) -> dict:
    """One fresh-process run. With --wait-for, it starts only while no matching process runs, and is redone
    if one appeared meanwhile (its timings would be shared with that job)."""
    while True:
        while _running(args.wait_for):
            time.sleep(10)
        result = _run_once(args, engine, trace, group)
        if not _running(args.wait_for) and not result.pop("disturbed", False):
            return result
        print(f"# {trace} {engine}: another job ran meanwhile; redoing the run", flush=True)


def _run_once(args, engine: str, trace: str, group: Path | None) -> dict:
    if not drop_caches():
        fadvise_dontneed(Path(args.path))
    if group is not None:
        (group / "memory.max_usage_in_bytes").write_text("0")
    environment = {**os.environ, **(PLAIN_CPU if engine in PLAIN_CPU_ENGINES else {})}
    command = [sys.executable, "-m", "mlx_qwen35.experts.bench_scale", "--child", "--path", str(args.path),
               "--engine", PLAIN_CPU_ENGINES.get(engine, engine), "--trace", trace, "--tokens", str(args.tokens), "--warmup", str(args.warmup),
               "--budget-gb", str(args.budget_gb), "--prewarm", str(args.prewarm), "--io-threads", str(args.io_threads), "--seed", str(args.seed),
               "--lookahead-precision", str(args.lookahead_precision)]
    if group is not None:
        command += ["--cgroup", str(group)]
    import tempfile

    start, disturbed = time.perf_counter(), False
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child_process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=environment)
        last = time.perf_counter()
        while child_process.poll() is None:
            time.sleep(1)
            # a gap between polls means this process was paused (e.g. SIGSTOP by a job scheduler)
            disturbed = disturbed or _running(args.wait_for) or time.perf_counter() - last > 5
            last = time.perf_counter()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - start
    if child_process.returncode != 0:
        return {"engine": engine, "trace": trace, "failed": child_process.returncode, "stderr": stderr[-2000:],
                "wall": wall, "disturbed": disturbed}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["engine"], result["wall"], result["disturbed"] = engine, wall, disturbed
    if group is not None:
        result["cgroup_peak"] = int((group / "memory.max_usage_in_bytes").read_text())
        result["cgroup_limit"] = int((group / "memory.limit_in_bytes").read_text())
    return result


def summarise(r: dict) -> dict:
    """Per-run numbers: warm-up = the first `warmup` tokens, steady = the rest."""
    w, times, snaps = r["warmup"], r["times"], r["snapshots"]
    last, cut = snaps[-1], (snaps[w - 1] if w else {})
    steady = {k: last[k] - cut.get(k, 0) for k in last}

    def accesses(s):
        return s["hits"] + s["misses"]

    expert = r["expert_bytes"]
    steady_seconds = sum(times[w:])
    out = {
        "tok_s": (len(times) - w) / steady_seconds,
        "ms_per_token": 1e3 * statistics.median(times[w:]),
        "hit_rate": last["hits"] / max(1, accesses(last)) if r["engine"] != "mmap" else None,
        "steady_hit_rate": steady["hits"] / max(1, accesses(steady)) if r["engine"] != "mmap" else None,
        "misses": last["misses"] if r["engine"] != "mmap" else None,
        "disk_gb": last["disk_bytes"] / 1e9,
        "steady_disk_mb_per_token": steady["disk_bytes"] / 1e6 / (len(times) - w),
        # every engine: the share of the routed experts' bytes that the disk did not have to supply
        "served_from_memory": 1 - steady["disk_bytes"] / max(1, accesses(steady) * expert),
        "disk_mb_s": steady["disk_bytes"] / 1e6 / steady_seconds,
        "stall_s": last.get("stall_seconds"),
        "peak_rss_gb": r["peak_rss"] / 1e9,
        "margin_gb": (r["peak_rss"] - r["resident_bytes"]) / 1e9 - r["budget_gb"],
        "cgroup_peak_gb": r.get("cgroup_peak", 0) / 1e9,
    }
    if r["engine"] == "ours":
        out["prefetch_precision"] = last["predicted_correct"] / max(1, last["predicted"])
        out["prefetch_wasted"] = last["prefetch_wasted"]
    return out


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(results: list) -> str:
    rows = [("| trace | engine | runs | tok/s | ms/token p50 | app hit rate | misses | served from memory | "
             "disk GB | disk MB/token | disk MB/s | stall s | peak RSS GB | RSS - resident - budget GB | "
             "cgroup peak GB |"), "|" + "---|" * 15]
    groups = {}
    for r in results:
        groups.setdefault((r["trace"], r["engine"]), []).append(r)
    for (trace, engine), runs in groups.items():
        ok = [summarise(r) for r in runs if "failed" not in r]
        if not ok:
            rows.append(f"| {trace} | {engine} | failed ({runs[0]['failed']}) |" + " |" * 12)
            continue
        med = {k: statistics.median(s[k] for s in ok) if ok[0][k] is not None else None for k in ok[0]}
        rows.append(f"| {trace} | {engine} | {len(ok)} | {med['tok_s']:.2f} | {med['ms_per_token']:.0f} | "
                    f"{_fmt(med['hit_rate'], '.1%')} | {_fmt(med['misses'], '.0f')} | "
                    f"{med['served_from_memory']:.1%} | {med['disk_gb']:.2f} | {med['steady_disk_mb_per_token']:.0f} | "
                    f"{med['disk_mb_s']:.0f} | {_fmt(med['stall_s'], '.1f')} | {med['peak_rss_gb']:.2f} | "
                    f"{med['margin_gb']:.2f} | {med['cgroup_peak_gb']:.2f} |")
    return "\n".join(rows)


def simulate_table(layers: int, num_experts: int, top_k: int, tokens: int, fractions, seed: int = 0) -> str:
    """Hit rates of LRU and LRFU over long traces (no I/O) at cache sizes given as a share of all experts,
    and Belady's offline optimum: the most any demand-loading policy can reach."""
    from .cache import simulate, simulate_optimal

    kinds = {k: make_trace(k, tokens, layers, num_experts, top_k, seed) for k in TRACES}
    rows = ["| trace | cache share | experts per layer | LRU | LRFU (half-life 16 tokens) | adaptive LRFU "
            "| offline optimum (Belady) |", "|---|---|---|---|---|---|---|"]
    for kind, trace in kinds.items():
        calls = traces.as_calls(trace)
        for share in fractions:
            capacity = max(top_k, round(share * layers * num_experts))
            hits = [simulate(policy, calls, capacity) for policy in ("lru", "lrfu", "lrfu-adaptive")]
            hits.append(simulate_optimal(calls, capacity))
            rates = " | ".join(f"{h:.1%}" for h in hits)
            rows.append(f"| {kind} | {share:.1%} | {capacity / layers:.0f} | {rates} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mlx_qwen35.experts.bench_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=str(DEFAULT_PATH), help="where the synthetic checkpoint is (written)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=512)
    parser.add_argument("--budget-gb", type=float, default=6.0)
    parser.add_argument("--tokens", type=int, default=16, help="timed decode tokens per run")
    parser.add_argument("--prewarm", type=int, default=64,
                        help="trace tokens replayed through the engine's loads (no compute) before timing")
    parser.add_argument("--warmup", type=int, default=2, help="timed tokens left out of the steady numbers")
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine on the realistic trace")
    parser.add_argument("--control-repeats", type=int, default=1, help="runs per engine on each control")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--control-engines", nargs="+", default=["ours", "lru", "mlx-vlm"], choices=ENGINES)
    parser.add_argument("--floor", action="store_true", help="also one run of the compute floor (all hits)")
    parser.add_argument("--traces", nargs="+", default=list(TRACES), choices=TRACES)
    parser.add_argument("--margin-gb", type=float, default=1.5, help="cgroup cap = resident + budget + this")
    parser.add_argument("--io-threads", type=int, default=4)
    parser.add_argument("--lookahead-precision", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", help="append every run's raw result to this JSON-lines file")
    parser.add_argument("--wait-for", help="on a shared machine: run only while no process has this argument "
                        "(e.g. another job's module name); a run it overlapped is redone")
    parser.add_argument("--resume", action="store_true",
                        help="count the runs already in --results (same settings) and run only the rest")
    parser.add_argument("--simulate", action="store_true", help="only the long-trace hit-rate table (no I/O)")
    parser.add_argument("--sim-tokens", type=int, default=1000)
    parser.add_argument("--delete", action="store_true", help="delete the synthetic checkpoint afterwards")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    parser.add_argument("--cgroup", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.simulate:
        # cache shares: Swiftlet's 397B run (~6%), this benchmark and a 64 GB Mac (18.6%), a 128 GB Mac (46%)
        print(simulate_table(args.layers, args.experts, 10, args.sim_tokens, (0.062, 0.186, 0.46), args.seed))
        return 0

    from .synthetic import write_synthetic_checkpoint

    path = Path(args.path)
    info = write_synthetic_checkpoint(path, layers=args.layers, num_experts=args.experts)
    experts_gb = info["experts_total_bytes"] / 1e9
    limit = info["resident_bytes"] + round((args.budget_gb + args.margin_gb) * 1e9)
    group = make_cgroup(limit)
    print(f"# {args.layers} MoE layers x {args.experts} experts x {info['expert_bytes'] / 1e6:.2f} MB = "
          f"{experts_gb:.1f} GB of experts; resident weights {info['resident_bytes'] / 1e9:.2f} GB; budget "
          f"{args.budget_gb} GB ({experts_gb / args.budget_gb:.1f}x smaller); cgroup cap "
          f"{limit / 1e9:.2f} GB{'' if group else ' (NOT applied)'}; per run: {args.prewarm} trace tokens of loads "
          f"only, then {args.tokens} timed decode tokens (first {args.warmup} left out of steady numbers); "
          f"drop_caches before each run", flush=True)
    results = []
    plan = []
    for repeat in range(max(args.repeats, args.control_repeats)):
        for trace in args.traces:
            if repeat < (args.repeats if trace == "realistic" else args.control_repeats):
                plan += [(e, trace) for e in (args.engines if trace == "realistic" else args.control_engines)]
    plan += [("floor", "realistic")] if args.floor else []
    if args.resume and args.results and Path(args.results).exists():
        results = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
        for done in results:
            if "failed" not in done and (done["engine"], done["trace"]) in plan:
                plan.remove((done["engine"], done["trace"]))
        results = [r for r in results if "failed" not in r]
        print(f"# resuming: {len(results)} runs read from {args.results}, {len(plan)} to go", flush=True)
    start = time.perf_counter()
    for i, (engine, trace) in enumerate(plan):
        result = run_one(args, engine, trace, group)
        results.append(result)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(result) + "\n")
        brief = ("FAILED " + str(result["failed"]) + " " + result["stderr"][-300:] if "failed" in result else
                 ", ".join(f"{k} {v:.3g}" for k, v in summarise(result).items() if isinstance(v, float)))
        print(f"# [{i + 1}/{len(plan)} {time.perf_counter() - start:.0f} s] {trace} {engine}: {brief}", flush=True)
    print(table(results))
    if group is not None:
        group.rmdir()
    if args.delete:
        import shutil

        shutil.rmtree(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
