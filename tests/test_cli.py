"""`kimi status`, `kimi logs` and `kimi chat` against a real coordinator and
two real workers."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
import zmq
from click.testing import CliRunner

from kimizmq.cli import format_status, main
from kimizmq.config import load_config
from tests.support import log_events, running_cluster, wait_until

MODEL = "kimi-k2-tiny"
CONTEXT = 4096


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    yield from running_cluster(
        tmp_path_factory.mktemp("cli"), tiny_model, 2, model_name=MODEL, runtime={"max_context": CONTEXT}
    )


def kimi(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


class Kimi:
    """`kimi ARGS` as a process, its output (stdout and stderr) read as it comes."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kimizmq.cli", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.output = ""
        self._chunks: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self._chunks.put(chunk)

    def wait_for(self, condition, what: str, timeout: float = 30.0) -> str:
        def seen():
            while not self._chunks.empty():
                self.output += self._chunks.get().decode(errors="replace")
            assert self.proc.poll() is None or condition(self.output), f"kimi exited:\n{self.output}"
            return condition(self.output)

        wait_until(seen, f"{what}; output so far:\n{self.output}", timeout)
        return self.output

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def pipeline_idle(cluster) -> bool:
    status, body = cluster.health()
    return (
        status == 200 and body["requests_in_flight"] == 0 and all(w["requests"] == 0 for w in body["workers"].values())
    )


# -- kimi status ---------------------------------------------------------------------


def test_status_shows_every_worker_and_the_coordinator(cluster, client):
    cfg = str(cluster.config_path)
    code, out = kimi("status", "--config", cfg)
    assert code == 0, out
    head, prefix, table, *rows = out.splitlines()
    assert head.startswith(f"coordinator 127.0.0.1:{cluster.cfg.coordinator.api_port}: ready (model {MODEL}")
    assert re.fullmatch(
        r"prefix cache: \d+ hits, \d+ misses, \d+ prompt tokens reused, \d+ entries, \d+ evicted", prefix
    )
    assert table.split() == [
        "WORKER",
        "ADDRESS",
        "STATE",
        "LAYERS",
        "MEMORY",
        "PREFIX",
        "CACHE",
        "LOAD",
        "TOK/S",
        "HEARTBEAT",
    ]
    assert [r.split()[:3] for r in rows] == [
        ["w0", cluster.cfg.worker("w0").control_address.removeprefix("tcp://"), "ready"],
        ["w1", cluster.cfg.worker("w1").control_address.removeprefix("tcp://"), "ready"],
    ]
    assert all("/ 16.0 GiB" in r and "100% of" in r and "s ago" in r for r in rows)
    assert "[0, " in rows[0] and ", 7)" in rows[1]

    # The workers' counters reach the coordinator once a heartbeat, apart from liveness, and a rate
    # needs two of them: generate and look again until every worker has one (or the deadline).
    deadline = time.monotonic() + 60
    client.completions.create(model=MODEL, prompt="hi there", max_tokens=4)  # the loop's prompt starts from it
    while True:
        client.completions.create(model=MODEL, prompt="hi there", max_tokens=60, extra_body={"ignore_eos": True})
        code, out = kimi("status", "--config", cfg, "--json")
        report = json.loads(out)
        if all(w["tokens_per_s"] for w in report["workers"]) or time.monotonic() > deadline:
            break
    assert code == 0 and report["coordinator"]["state"] == "ready" and report["coordinator"]["tokens_per_s"] > 0
    assert report["coordinator"]["prefix_cache"]["hits"] > 0  # "hi there" again and again
    for w in report["workers"]:
        assert w["state"] == "ready" and w["up"] and w["tokens_per_s"] > 0
        assert 0 < w["prefix_bytes"] <= w["prefix_budget_bytes"] and w["prefix_hits"] > 0
        assert w["memory_bytes"] > 0 and w["progress"]["done_bytes"] == w["progress"]["total_bytes"]
        assert time.time() - w["last_seen"] < 30


def test_status_row_of_a_loading_worker_shows_progress_and_rate():
    report = {
        "model": MODEL,
        "coordinator": {"state": "loading", "up": True, "address": "h:1", "requests_in_flight": 0, "queue_depth": 0},
        "workers": [
            {
                "name": "m3",
                "address": "tcp://10.0.0.1:5000",
                "state": "loading",
                "layers": [0, 44],
                "memory_bytes": 120 << 30,
                "memory_total_bytes": 512 << 30,
                "progress": {"done_bytes": 135 << 30, "total_bytes": 360 << 30, "rate_bytes_s": 2.5e9},
                "tokens_per_s": None,
                "last_seen": time.time(),
            }
        ],
    }
    row = format_status(report).splitlines()[2]
    assert row.split()[:4] == ["m3", "10.0.0.1:5000", "loading", "[0,"]
    assert "120.0 GiB / 512.0 GiB" in row and "38% of 360.0 GiB at 2500 MB/s" in row


# -- kimi logs -----------------------------------------------------------------------


def test_logs_follow_one_request_through_every_daemon(cluster, client):
    follower = Kimi("logs", "--config", str(cluster.config_path), "-f")
    try:
        follower.wait_for(lambda out: "cluster_ready" in out, "the lines already there")
        rid = client.completions.create(model=MODEL, prompt="follow me", max_tokens=5).id

        def traced(out: str) -> bool:
            mine = [line.split() for line in out.splitlines() if f" {rid} " in line]
            return {(parts[3], parts[5]) for parts in mine} >= {
                ("coordinator", "request_submitted"),
                ("coordinator", "request_finished"),
                ("worker-w0", "request_started"),
                ("worker-w0", "request_released"),
                ("worker-w1", "request_started"),
                ("worker-w1", "request_released"),
            }

        follower.wait_for(traced, f"request {rid} on the coordinator and both workers")
    finally:
        follower.proc.send_signal(signal.SIGINT)
        assert follower.close() == 0


def test_logs_of_one_request_are_merged_in_time_order(cluster, client):
    rid = client.completions.create(model=MODEL, prompt="merge me", max_tokens=5).id
    # The release travels the stages after the answer is out: wait for the last one.
    args = ("logs", "--config", str(cluster.config_path), "--request", rid, "--json")
    wait_until(
        lambda: any(
            e["event"] == "request_released" and e["daemon"] == "worker-w1"
            for e in map(json.loads, kimi(*args)[1].splitlines())
        ),
        "the last stage's release",
    )
    code, out = kimi(*args)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and lines and all(e["request_id"].split("~")[0] == rid for e in lines)
    assert {e["daemon"] for e in lines} == {"coordinator", "worker-w0", "worker-w1"}
    times = [datetime.fromisoformat(e["timestamp"]) for e in lines]
    assert times == sorted(times)
    code, pretty = kimi("logs", "--config", str(cluster.config_path), "--request", rid)
    assert len(pretty.splitlines()) == len(lines) and all(f" {rid} " in line for line in pretty.splitlines())


def test_logs_level_filter_keeps_warnings_and_worse(cluster):
    with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as s:  # a frame no stage can read: the worker warns
        s.setsockopt(zmq.LINGER, 1000)
        s.connect(cluster.cfg.worker("w1").data_address)
        s.send(b"not a kimizmq message")
    args = ("logs", "--config", str(cluster.config_path), "--level", "warning", "--daemon", "worker-w1")
    out = wait_until(lambda: "bad_data_message" in (o := kimi(*args)[1]) and o, "the worker's warning")
    assert all(line.split()[2] in ("WARNING", "ERROR", "CRITICAL") for line in out.splitlines())
    assert all(line.split()[3] == "worker-w1" for line in out.splitlines())


def test_worker_logs_report_load_progress(cluster):
    code, out = kimi("logs", "--config", str(cluster.config_path), "--daemon", "worker-w0", "--json")
    progress = [e for e in map(json.loads, out.splitlines()) if e["event"] == "load_progress"]
    assert progress and progress[-1]["done_bytes"] == progress[-1]["total_bytes"] > 0
    assert all("rate_mb_s" in e for e in progress)
    assert [e["done_bytes"] for e in progress] == sorted(e["done_bytes"] for e in progress)


# -- kimi chat -----------------------------------------------------------------------


def test_chat_streams_answers_and_keeps_the_conversation(cluster):
    chat = Kimi("chat", "--config", str(cluster.config_path), "--max-tokens", "4", "--temperature", "0")
    try:
        chat.wait_for(lambda out: out.count("you> ") == 1, "the prompt")
        chat.send("Hello there")
        chat.wait_for(lambda out: out.count("you> ") == 2, "the first answer")
        chat.send("Tell me more")
        chat.wait_for(lambda out: out.count("you> ") == 3, "the second answer")
    finally:
        assert chat.close() == 0
    first, second = log_events(cluster, "coordinator", "request_submitted")[-2:]
    assert second["prompt_tokens"] > first["prompt_tokens"] + 4  # the first turn, question and answer, is in it
    answers = chat.output.split("you> ")[1:3]
    assert all(a.strip() for a in answers)


def test_chat_ctrl_c_stops_the_answer_not_the_chat(cluster, client):
    # A question whose greedy answer runs long, so that Ctrl-C lands in the middle of it.
    questions = ["Hello there", "Tell me about pipelines", "Why is the sky blue?", "Count to ten", "Hi"]
    question = next(
        (
            q
            for q in questions
            if client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=100, temperature=0
            )
            .choices[0]
            .finish_reason
            == "length"
        ),
        None,
    )
    assert question is not None, "the test model ends every answer early: add a question"
    chat = Kimi("chat", "--config", str(cluster.config_path), "--max-tokens", "3000", "--temperature", "0")
    try:
        chat.wait_for(lambda out: out.count("you> ") == 1, "the prompt")
        chat.send(question)
        chat.wait_for(lambda out: len(out.split("you> ")[1]) > 10, "the answer to start")
        chat.proc.send_signal(signal.SIGINT)
        chat.wait_for(lambda out: "[stopped]" in out and out.count("you> ") == 2, "the answer to stop")
        wait_until(lambda: pipeline_idle(cluster), "every stage to free the request")
        cancelled = log_events(cluster, "coordinator", "request_cancelled")[-1]
        assert cancelled["tokens"] < 3000

        chat.send("and then?")  # the chat goes on, and remembers the cut answer
        chat.wait_for(lambda out: len(out.split("you> ")[2]) > 10, "the second answer to start")
        chat.proc.send_signal(signal.SIGINT)
        chat.wait_for(lambda out: out.count("[stopped]") == 2 and out.count("you> ") == 3, "the second stop")
        chat.send("/exit")
    finally:
        assert chat.close() == 0
    first, second = log_events(cluster, "coordinator", "request_submitted")[-2:]
    assert second["prompt_tokens"] > first["prompt_tokens"] + cancelled["tokens"] // 2


# -- last: the cluster loses a worker, then its coordinator ------------------------------


def test_logs_of_workers_on_other_machines_come_over_their_control_sockets(cluster, client, tmp_path):
    # The same cluster seen from a machine whose log folder holds none of its files.
    elsewhere = tmp_path / "kimi.toml"
    text = cluster.config_path.read_text()
    elsewhere.write_text(text.replace(json.dumps(str(cluster.log_dir)), json.dumps(str(tmp_path / "log"))))
    assert load_config(elsewhere).log_dir == tmp_path / "log"
    rid = client.completions.create(model=MODEL, prompt="far away", max_tokens=3).id
    args = ("logs", "--config", str(elsewhere), "--request", rid, "--json")
    out = wait_until(
        lambda: (
            (o := kimi(*args)[1])
            and {json.loads(line)["daemon"] for line in o.splitlines()} >= {"worker-w0", "worker-w1"}
            and o
        ),
        "both workers' lines of the request",
    )
    assert "coordinator" not in {json.loads(line)["daemon"] for line in out.splitlines()}  # its file is not here
    mirrored = (tmp_path / "log" / "remote" / "worker-w0.jsonl").read_text().splitlines()
    local = (cluster.log_dir / "worker-w0.jsonl").read_text().splitlines()
    assert mirrored == local[: len(mirrored)] and len(mirrored) >= 5  # an exact copy, line for line


# -- kimi prompt, and the daemons' own lines -----------------------------------------


def test_prompt_dash_reads_stdin_and_verbose_reports_ttft_and_rate(cluster):
    args = [sys.executable, "-m", "kimizmq.cli", "prompt", "--config", str(cluster.config_path), "--raw"]
    args += ["--temperature", "0", "--max-tokens", "12"]
    given = subprocess.run([*args, "Hello there"], capture_output=True, text=True, timeout=120)
    piped = subprocess.run([*args, "-v", "-"], input="Hello there", capture_output=True, text=True, timeout=120)
    assert given.returncode == piped.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout and given.stdout.strip()
    stats = re.search(r"(\d+) tokens; TTFT (\d+) ms; ([\d.]+) tokens/s after the first", piped.stderr)
    assert stats and 2 <= int(stats[1]) <= 12 and float(stats[3]) > 0, piped.stderr
    assert "TTFT" not in given.stderr


def test_daemons_print_a_human_line_when_listening_and_when_ready(cluster):
    for w in cluster.cfg.workers:
        said = cluster.stderr(f"worker-{w.name}")
        assert f"kimi-worker {w.name}: listening on {w.control_address} (control)" in said
        assert re.search(rf"kimi-worker {w.name} ready: layers \[\d, \d\), [\d.]+ GiB of weights loaded in", said)
    port = cluster.cfg.coordinator.api_port
    said = cluster.stderr("coordinator")
    assert f"kimi-coordinator: API listening on http://127.0.0.1:{port}/v1; loading 2 workers" in said
    assert f"kimi-coordinator ready: http://127.0.0.1:{port}/v1 serves {MODEL} on w0 [0, " in said


def test_status_when_a_worker_and_then_the_coordinator_are_down(cluster):
    cfg = str(cluster.config_path)
    cluster.workers["w1"].terminate()
    cluster.workers["w1"].wait(10)

    def degraded():
        code, out = kimi("status", "--config", cfg, "--json")
        report = json.loads(out)
        return code == 1 and report["coordinator"]["state"] == "degraded" and report

    report = wait_until(degraded, "the coordinator to see w1 down")
    states = {w["name"]: (w["state"], w["up"]) for w in report["workers"]}
    assert states == {"w0": ("ready", True), "w1": ("down", False)}
    assert cluster.health()[0] == 503

    cluster.coordinator.terminate()
    cluster.coordinator.wait(10)
    code, out = kimi("status", "--config", cfg)
    assert code == 1
    head, _, w0, w1, *notes = out.splitlines()
    assert head.startswith(f"coordinator 127.0.0.1:{cluster.cfg.coordinator.api_port}: down (")
    assert head.endswith("the workers answered directly:")
    assert w0.split()[:3] == ["w0", cluster.cfg.worker("w0").control_address.removeprefix("tcp://"), "ready"]
    assert w1.split()[2] == "down" and any(n.startswith("w1: ") and "did not answer" in n for n in notes)
