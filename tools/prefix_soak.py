"""A soak of the prefix cache: clients hold varied multi-turn conversations
(a few shared system prompts, growing histories) with a two-stage cluster
whose prefix cache budget is small, so entries are kept, reused and evicted
all the time. Every few seconds each stage's own accounting (bytes its
entries hold, its budget) and its RSS are sampled.

    python tools/prefix_soak.py [--minutes 5] [--clients 4] [--budget-mib 2] [--json soak.json]

At the end: whether any stage ever held more than its budget, its RSS after
the warm-up and at the end, and the cache's hits, reused tokens and evictions.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chaos import rss_kib  # noqa: E402

from kimizmq.control import ControlError, ControlTimeout, call_once  # noqa: E402
from kimizmq.local import LocalCluster, write_config  # noqa: E402
from kimizmq.testmodel import make_test_model  # noqa: E402
from kimizmq_bench.rows import prompt_ids  # noqa: E402
from tests.support import post_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_EVERY_S = 2.0
WARMUP_S = 30.0  # RSS is compared from the first sample after this
MAX_CONTEXT = 2048
SYSTEM_PROMPTS = [prompt_ids(n, 500 + n) for n in (120, 200, 300)]  # shared by many conversations


def conversation(api: str, rng: random.Random, stop: threading.Event, tally: dict) -> None:
    """One conversation of 2-6 turns, each prompt the whole history plus a new message."""
    history = list(rng.choice(SYSTEM_PROMPTS))
    for _ in range(rng.randint(2, 6)):
        message = prompt_ids(rng.randint(20, 150), rng.randrange(1 << 30))
        reply = rng.randint(8, 24)
        if stop.is_set() or len(history) + len(message) + reply >= MAX_CONTEXT:
            return
        prompt = history + message
        body = {"prompt": prompt, "max_tokens": reply, "temperature": 0, "ignore_eos": True, "logprobs": 0}
        status, out = post_json(api, "/v1/completions", body)
        tally["turns"] += 1
        if status != 200:
            tally["errors"] += 1
            return
        tally["cached_tokens"] += out["usage"]["prompt_tokens_details"]["cached_tokens"]
        tally["prompt_tokens"] += len(prompt)
        history = prompt + out["choices"][0]["logprobs"]["token_ids"]


def client(api: str, seed: int, stop: threading.Event, tally: dict) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        conversation(api, rng, stop, tally)


def sample(cluster: LocalCluster, at: float) -> dict:
    row: dict = {"at_s": round(at, 1), "workers": {}}
    for w in cluster.cfg.workers:
        try:
            s = call_once(w.control_address, "stats", timeout_s=5.0, name=w.name)
        except (ControlError, ControlTimeout):
            continue
        row["workers"][w.name] = {
            "rss_mib": round((rss_kib(cluster.workers[w.name].pid) or 0) / 1024, 1),
            "prefix_bytes": s["prefix_bytes"],
            "prefix_budget_bytes": s["prefix_budget_bytes"],
            "prefix_entries": s["prefix_entries"],
            "prefix_refused": s["prefix_refused"],  # entries it could not keep (no room)
            "cache_bytes": s["cache_bytes"],
        }
    row["coordinator"] = cluster.health()[1]["coordinator"]["prefix_cache"]
    return row


def soak(minutes: float, clients: int, budget_mib: float) -> dict:
    model = make_test_model(REPO / "models" / "test-kimi-k2-tiny-seed0-layers7", seed=0, num_layers=7)
    runtime = {"prefix_cache_gb": budget_mib / 1024, "max_context": MAX_CONTEXT, "prefill_chunk": 64}
    folder = Path(tempfile.mkdtemp(prefix="kimizmq-prefix-soak-"))
    tally = {"turns": 0, "errors": 0, "cached_tokens": 0, "prompt_tokens": 0}
    samples = []
    with LocalCluster(write_config(folder / "kimi.toml", model, 2, runtime=runtime)) as cluster:
        stop = threading.Event()
        threads = [threading.Thread(target=client, args=(cluster.api, k, stop, tally)) for k in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < minutes * 60:
            time.sleep(SAMPLE_EVERY_S)
            samples.append(sample(cluster, time.monotonic() - t0))
        stop.set()
        for t in threads:
            t.join(300)
        samples.append(sample(cluster, time.monotonic() - t0))
        lines = (cluster.log_dir / "coordinator.jsonl").read_text().splitlines()
        missing = sum(json.loads(line)["event"] == "prefix_missing" for line in lines)
    workers = {}
    for name in samples[-1]["workers"]:
        rows = [s["workers"][name] for s in samples if name in s["workers"]]
        warm = [r for s, r in zip(samples, rows) if s["at_s"] >= WARMUP_S] or rows
        workers[name] = {
            "budget_mib": round(rows[-1]["prefix_budget_bytes"] / 2**20, 2),
            "most_held_mib": round(max(r["prefix_bytes"] for r in rows) / 2**20, 2),
            "over_budget_samples": sum(r["prefix_bytes"] > r["prefix_budget_bytes"] for r in rows),
            "refused": rows[-1]["prefix_refused"],
            "rss_mib_after_warmup": warm[0]["rss_mib"],
            "rss_mib_max": max(r["rss_mib"] for r in warm),
            "rss_mib_end": rows[-1]["rss_mib"],
        }
    return {
        "minutes": minutes,
        "clients": clients,
        **tally,
        "prefix_missing": missing,  # requests whose entry a stage lacked: run again from 0
        "cache": samples[-1]["coordinator"],
        "workers": workers,
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=4, help="conversations at once")
    ap.add_argument("--budget-mib", type=float, default=2.0, help="each stage's prefix cache budget")
    ap.add_argument("--json", type=Path, default=Path("prefix-soak.json"))
    args = ap.parse_args()
    report = soak(args.minutes, args.clients, args.budget_mib)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    c = report["cache"]
    print(
        f"{report['turns']} turns ({report['errors']} errors) by {report['clients']} clients in {report['minutes']:g} min; "
        f"{report['cached_tokens']} of {report['prompt_tokens']} prompt tokens from the cache; "
        f"{c['hits']} hits, {c['misses']} misses, {c['evictions']} evictions, "
        f"{report['prefix_missing']} entries missing on a stage"
    )
    print("worker  budget MiB  most held MiB  samples over budget  refused  RSS MiB after warm-up / max / end")
    for name, w in report["workers"].items():
        print(
            f"{name:<7} {w['budget_mib']:>10} {w['most_held_mib']:>14} {w['over_budget_samples']:>20} {w['refused']:>8}  "
            f"{w['rss_mib_after_warmup']} / {w['rss_mib_max']} / {w['rss_mib_end']}"
        )
    print(f"(written to {args.json})")


if __name__ == "__main__":
    main()
