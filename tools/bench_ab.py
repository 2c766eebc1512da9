"""`kimi bench --quick` of two source trees, alternately in one call: A (a base tree,
e.g. `git archive REF | tar -x -C DIR`) and B (default: this checkout), A B A B ...

Each run is a fresh `kimi bench` whose PYTHONPATH starts with its tree, run from that
tree, so its kimizmq (and the workers and coordinator it starts, which inherit both)
is the one measured; the run stops if `kimizmq.__file__` says otherwise. Prints per
measurement A's median, B's median and B/A, and writes every run's rows to a JSON file.

    python tools/bench_ab.py --base DIR [--rounds 2] [--out ab.json] -- [kimi bench flags]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HEAD))

from kimizmq_bench.report import chunk_label, system_label  # noqa: E402
from kimizmq_bench.rows import Row  # noqa: E402

FIELDS = ("decode_tps", "aggregate_tps", "ttft_s", "step_ms")  # tok/s: higher is better; s, ms: lower
DEFAULT_SYSTEMS = "kimizmq-1,kimizmq-2"  # mlx-lm's rows do not depend on the tree
PROBE = "import kimizmq, kimizmq_bench; print(kimizmq.__file__); print(kimizmq_bench.__file__)"


def tree_env(tree: Path) -> dict[str, str]:
    """The environment with `tree` first on PYTHONPATH and no other folder holding a kimizmq package."""
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not (Path(p) / "kimizmq").is_dir()]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *kept])}


def check_tree(tree: Path, env: dict[str, str]) -> None:
    """Fail unless a process with this environment and folder imports kimizmq and kimizmq_bench from `tree`."""
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tree, env=env, capture_output=True, text=True)
    files = [Path(line).resolve() for line in out.stdout.split()]
    if out.returncode or len(files) != 2 or any(not f.is_relative_to(tree) for f in files):
        sys.exit(f"bench_ab: {tree} is not the tree imported: {out.stdout.strip()} {out.stderr.strip()}")
    print(f"[bench_ab] kimizmq from {files[0]}", flush=True)


def run_bench(tree: Path, name: str, work: Path, systems: str, bench_args: list[str]) -> list[Row]:
    """One `kimi bench --quick` of `tree` in fresh processes; its rows."""
    env = tree_env(tree)
    check_tree(tree, env)
    cmd = [sys.executable, "-c", "from kimizmq.cli import main; main()", "bench", "--quick", "--no-plot"]
    cmd += ["--systems", systems, "--models", str(work / "models"), "--out", str(work), "--name", name, *bench_args]
    print(f"[bench_ab] {name}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, cwd=tree, env=env, check=True)
    return [Row.from_dict(d) for d in json.loads((work / f"{name}.json").read_text())]


def measurements(rows: list[Row]) -> dict[str, float]:
    """One number per measurement and field, named by what was measured."""
    out = {}
    for r in rows:
        if r.error:
            continue
        for f in FIELDS:
            if (v := getattr(r, f)) is not None:
                out[f"{system_label(r)} {r.metric} c{r.concurrency} p{r.prompt_tokens} chunk {chunk_label(r)} {f}"] = v
    return out


def summarize(runs: list[dict]) -> list[dict]:
    """Per measurement: A's and B's medians over the rounds and B/A."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for key, v in measurements([Row.from_dict(d) for d in run["rows"]]).items():
            values.setdefault(key, {"A": [], "B": []})[run["tree"]].append(v)
    summary = []
    for key, ab in values.items():
        a = statistics.median(ab["A"]) if ab["A"] else None
        b = statistics.median(ab["B"]) if ab["B"] else None
        ratio = b / a if a and b is not None else None
        summary.append(
            {"measurement": key, "a_median": a, "b_median": b, "b_over_a": ratio, "a": ab["A"], "b": ab["B"]}
        )
    return summary


def format_summary(summary: list[dict]) -> str:
    if not summary:
        return "no measurements (every row is an error)"
    width = max(len(s["measurement"]) for s in summary)
    lines = [f"{'measurement':<{width}}  {'A median':>10}  {'B median':>10}  {'B/A':>6}"]
    for s in summary:
        a, b, r = (s["a_median"], s["b_median"], s["b_over_a"])
        cells = [("-" if v is None else f"{v:.4g}") for v in (a, b)] + ["-" if r is None else f"{r:.3f}"]
        lines.append(f"{s['measurement']:<{width}}  {cells[0]:>10}  {cells[1]:>10}  {cells[2]:>6}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="tree A (holds kimizmq/ and kimizmq_bench/)")
    p.add_argument("--head", type=Path, default=HEAD, help="tree B (default: this checkout)")
    p.add_argument("--label-a", default="A", help="what tree A is, e.g. a commit, for the JSON")
    p.add_argument("--label-b", default="B", help="what tree B is")
    p.add_argument("--rounds", type=int, default=2, help="runs of each tree, alternating A B A B ...")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS, help="kimi bench --systems")
    p.add_argument("--work", type=Path, help="models and each run's JSON (default: a new temporary folder)")
    p.add_argument("--out", type=Path, default=Path("bench-results/ab.json"), help="the JSON written")
    p.add_argument("bench_args", nargs="*", help="further kimi bench flags, after --")
    args = p.parse_args()
    trees = {"A": args.base.resolve(), "B": args.head.resolve()}
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-ab-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "trees": {t: {"path": str(tree), "label": getattr(args, f"label_{t.lower()}")} for t, tree in trees.items()},
        "command": ["kimi", "bench", "--quick", "--systems", args.systems, *args.bench_args],
        "rounds": args.rounds,
        "summary": [],
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    for i in range(1, args.rounds + 1):
        for t, tree in trees.items():
            t0 = time.monotonic()
            rows = run_bench(tree, f"{t}-r{i}", work, args.systems, args.bench_args)
            runs.append(
                {"tree": t, "round": i, "seconds": round(time.monotonic() - t0, 1), "rows": [vars(r) for r in rows]}
            )
            result["summary"] = summarize(runs)  # saved after every run: a run cut off keeps what it has
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nA = {args.label_a} ({trees['A']}), B = {args.label_b} ({trees['B']}), rounds: {args.rounds}")
    print(format_summary(result["summary"]))
    print(f"\n{args.out}")
    errors = [(run["tree"], run["round"], r["error"]) for run in runs for r in run["rows"] if r["error"]]
    for e in errors:
        print(f"[bench_ab] error in {e[0]} round {e[1]}: {e[2]}", file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
