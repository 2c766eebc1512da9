"""Hostile frames at every socket of every daemon while requests run.

One 2-worker cluster on loopback. A thread runs greedy completions back to back
while the test throws every kind of malformed message at the worker control
sockets (REP), the worker data sockets (PULL) and the coordinator's result
socket (PULL) with raw pyzmq. Every message is refused and logged, every
daemon stays up, and every completion equals the undisturbed one.
"""

from __future__ import annotations

import json
import math
import threading
import uuid

import msgpack
import numpy as np
import pytest
import zmq

from kimizmq import wire
from tests.support import complete_ids, log_events, running_cluster, wait_until

N_TOKENS = 48
REPLY_TIMEOUT_MS = 5000
PROMPT = [5, 17, 99, 230, 41, 7, 300, 12, 64, 8, 150, 77, 3, 201, 45, 11, 90, 33, 120, 6, 250, 19, 88, 140]


# -- frames --------------------------------------------------------------------------


def head(**fields) -> bytes:
    return msgpack.packb({"v": wire.PROTOCOL_VERSION, "tensors": [], **fields})


def forward_head(req: str, offset: int, dtype: str, shape: list[int], **extra) -> bytes:
    fields = {"kind": "forward", "req": req, "seq": 0, "offset": offset, "sample": True, "params": {}, **extra}
    return msgpack.packb({"v": wire.PROTOCOL_VERSION, **fields, "tensors": [{"dtype": dtype, "shape": shape}]})


def tokens_head(req: str, **fields) -> bytes:
    """A run of sampled tokens for the coordinator; `fields` override a valid one."""
    return head(kind="tokens", req=req, **{"seq": 0, "tokens": [3], "logprobs": [-1.0], **fields})


def stranger() -> str:
    return f"fuzz-{uuid.uuid4().hex[:8]}"


def nested_header(depth: int) -> bytes:
    """A release whose req is a list nested `depth` deep (too deep for msgpack's own packer)."""
    start = msgpack.packb({"v": wire.PROTOCOL_VERSION, "kind": "release", "tensors": []})
    return bytes([start[0] + 1]) + start[1:] + msgpack.packb("req") + b"\x91" * depth + b"\x90"


def malformed_anywhere() -> dict[str, list[bytes]]:
    """Messages no socket accepts: each fails `wire.decode`."""
    ids = np.array([[5, 6, 7]], dtype=np.int32).tobytes()
    return {
        "empty frame": [b""],
        "not msgpack": [b"\xc1\xc1 not msgpack at all"],
        "random bytes": [bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))],
        "msgpack list": [msgpack.packb([1, 2, 3])],
        "no version": [msgpack.packb({"kind": "release", "req": "x", "tensors": []})],
        "wrong version": [msgpack.packb({"v": 99, "kind": "release", "req": "x", "tensors": []})],
        "version as string": [msgpack.packb({"v": "1", "kind": "release", "req": "x", "tensors": []})],
        "unknown kind": [head(kind="frobnicate", req="x")],
        "kind not a string": [head(kind=7, req="x")],
        "missing field": [head(kind="forward", req="x")],
        "field of wrong type": [head(kind="release", req=12345)],
        "unknown field": [head(kind="release", req="x", extra="field")],
        "id too long": [head(kind="release", req="r" * 10_000)],
        "int map keys": [msgpack.packb({"v": wire.PROTOCOL_VERSION, "kind": "release", 5: "x", "tensors": []})],
        "ext type": [
            msgpack.packb(
                {"v": wire.PROTOCOL_VERSION, "kind": "release", "req": msgpack.ExtType(1, b"x"), "tensors": []}
            )
        ],
        "deep nesting": [nested_header(5000)],
        "header over 64 KiB": [head(kind="error", req="x", message="m" * (wire.MAX_HEADER_BYTES + 1))],
        "negative seq": [forward_head(stranger(), 0, "int32", [1, 3], seq=-1), ids],
        "non-str param keys": [forward_head(stranger(), 0, "int32", [1, 3], params={1: 2}), ids],
        "tensors not a list": [
            msgpack.packb({"v": wire.PROTOCOL_VERSION, "kind": "release", "req": "x", "tensors": "no"})
        ],
        "unknown dtype": [forward_head(stranger(), 0, "float64", [1, 3]), bytes(24)],
        "bool tensor desc": [forward_head(stranger(), 0, "bool", [1, 3]), bytes(3)],
        "5-d shape": [forward_head(stranger(), 0, "float32", [1, 1, 1, 1, 1]), bytes(4)],
        "negative dim": [forward_head(stranger(), 0, "int32", [1, -3]), ids],
        "uint32 token ids": [forward_head(stranger(), 0, "uint32", [1, 3]), ids],
        "float token ids (2-d)": [forward_head(stranger(), 0, "float32", [1, 3]), bytes(12)],
        "truncated tensor": [forward_head(stranger(), 0, "int32", [1, 3]), ids[:-2]],
        "tensor frame missing": [forward_head(stranger(), 0, "int32", [1, 3])],
        "extra frame": [forward_head(stranger(), 0, "int32", [1, 3]), ids, b"spare"],
        "declared 1 TB tensor": [forward_head(stranger(), 0, "float32", [1, 2**20, 2**18]), bytes(16)],
        "frames on a tensorless kind": [head(kind="release", req="x"), b"\0" * 64],
    }


def malformed_on_data(first: bool, hidden: int) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
    """(refused as messages, refused by the stage) for a worker's data socket."""
    wrong_kinds = {
        "tokens on data": [head(kind="tokens", req=stranger(), seq=0, tokens=[1], logprobs=[-0.5])],
        "command on data": [head(kind="command", cmd="shutdown", id="1")],
        "reply on data": [head(kind="reply", id="1", ok=True)],
        "error on data": [head(kind="error", req=stranger(), message="boom")],
    }
    bad = {**malformed_anywhere(), **wrong_kinds}
    act = np.zeros((1, 3, hidden), np.float32)
    tok = np.array([[1, 2, 3]], np.int32)
    if first:
        stage = {
            "token id above vocab": [forward_head(stranger(), 0, "int32", [1, 3]), np.array([[1, 10**6, 2]], np.int32)],
            "negative token id": [forward_head(stranger(), 0, "int32", [1, 3]), np.array([[1, -4, 2]], np.int32)],
            "batch of two": [forward_head(stranger(), 0, "int32", [2, 3]), np.zeros((2, 3), np.int32)],
            "empty chunk": [forward_head(stranger(), 0, "int32", [1, 0]), b""],
            "activations to stage 0": [forward_head(stranger(), 0, "float32", [1, 3, hidden]), act],
            "unknown request mid-way": [forward_head(stranger(), 5, "int32", [1, 3]), tok],
            "huge offset": [forward_head(stranger(), 2**62, "int32", [1, 3]), tok],
            "bad sampling params": [forward_head(stranger(), 0, "int32", [1, 3], params={"temperature": -1}), tok],
            "NaN top_p": [forward_head(stranger(), 0, "int32", [1, 3], params={"top_p": float("nan")}), tok],
            "string param": [forward_head(stranger(), 0, "int32", [1, 3], params={"seed": "abc"}), tok],
            "too many logprobs": [forward_head(stranger(), 0, "int32", [1, 3], params={"logprobs": 10**6}), tok],
        }
    else:
        stage = {
            "token ids to stage 1": [forward_head(stranger(), 0, "int32", [1, 3]), tok],
            "wrong hidden size": [
                forward_head(stranger(), 0, "float32", [1, 3, hidden + 1]),
                np.zeros((1, 3, hidden + 1), np.float32),
            ],
            "batch of two": [
                forward_head(stranger(), 0, "float32", [2, 3, hidden]),
                np.zeros((2, 3, hidden), np.float32),
            ],
            "unknown request mid-way": [forward_head(stranger(), 7, "bfloat16", [1, 3, hidden]), bytes(6 * hidden)],
            "NaN activations, unknown request": [
                forward_head(stranger(), 9, "float16", [1, 3, hidden]),
                np.full((1, 3, hidden), np.nan, np.float16),
            ],
            "bad sampling params": [
                forward_head(stranger(), 0, "float32", [1, 3, hidden], params={"logprobs": 999}),
                act,
            ],
        }
    # a release for a request nobody knows is legal, and harmless
    stage_free = {"release unknown request": [head(kind="release", req=stranger())]}
    return bad, {**stage, **stage_free}


def load(id_: str, **args) -> bytes:
    """A load command for layers [0, 3) with `args` on top."""
    return head(kind="command", cmd="load", id=id_, args={"start": 0, "end": 3, "next": "tcp://127.0.0.1:1", **args})


def malformed_commands() -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
    """(refused as messages, refused as commands) for a worker's control socket."""
    bad = malformed_anywhere()
    del bad["header over 64 KiB"]  # over the control socket's size limit: tested as an oversize message
    bad = {
        **bad,
        "reply as a command": [head(kind="reply", id="1", ok=True)],
        "forward as a command": [forward_head("x", 0, "int32", [1, 1]), np.zeros((1, 1), np.int32).tobytes()],
        "args not a map": [head(kind="command", cmd="health", id="1", args=[1, 2])],
    }
    refused = {
        "unknown command": [head(kind="command", cmd="frobnicate", id="2")],
        "dunder command": [head(kind="command", cmd="_unload", id="3")],
        "load with a string start": [
            head(kind="command", cmd="load", id="4", args={"start": "0", "end": 3, "next": "tcp://127.0.0.1:1"})
        ],
        "load with a negative range": [
            head(kind="command", cmd="load", id="5", args={"start": -4, "end": 2, "next": "tcp://127.0.0.1:1"})
        ],
        "load to a non-tcp address": [
            head(kind="command", cmd="load", id="6", args={"start": 0, "end": 3, "next": "ipc:///tmp/x"})
        ],
        "load without next": [head(kind="command", cmd="load", id="7", args={"start": 0, "end": 3})],
        "load with a non-tcp first stage": [load("9", first="ipc:///tmp/x")],
        "load with a number for first": [load("10", first=5)],
        "release without req": [head(kind="command", cmd="release", id="8", args={"req": 5})],
        "load with zero stages": [load("11", stages=0)],
        "load with stages a float": [load("12", stages=2.0)],
    }
    return bad, refused


# -- the cluster and its clients ---------------------------------------------------------


def tensor_frames(frames: list) -> list[bytes]:
    return [f.tobytes() if isinstance(f, np.ndarray) else f for f in frames]


class Control:
    """A DEALER speaking to a worker's REP: an empty delimiter frame, then the message."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvtimeo = REPLY_TIMEOUT_MS
        self.sock.connect(address)

    def send(self, frames: list) -> wire.Message:
        self.sock.send_multipart([b"", *tensor_frames(frames)])
        delimiter, *reply = self.sock.recv_multipart()
        assert delimiter == b""
        msg = wire.decode(reply)
        assert msg.kind == "reply"
        return msg

    def call(self, cmd: str) -> dict:
        msg = self.send(wire.encode("command", {"cmd": cmd, "id": cmd}))
        assert msg.header["ok"], msg.header
        return msg.header["result"]


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    yield from running_cluster(tmp_path_factory.mktemp("fuzz"), tiny_model, 2)


class Requests(threading.Thread):
    """Greedy completions back to back until stopped."""

    def __init__(self, api: str):
        super().__init__(daemon=True)
        self.api = api
        self.results: list[dict] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.results.append(complete_ids(self.api, PROMPT, N_TOKENS)["logprobs"])
            except BaseException as e:  # noqa: BLE001 - reported by the test
                self.errors.append(e)
                return


def test_every_socket_refuses_malformed_frames_while_a_request_runs(cluster, tiny_model):
    hidden = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    complete_ids(cluster.api, PROMPT, N_TOKENS)
    # the runs below start from the prefix cache, as this one does: bit for bit the same path
    undisturbed = complete_ids(cluster.api, PROMPT, N_TOKENS)["logprobs"]
    ctx = zmq.Context()
    w0, w1 = cluster.cfg.workers
    controls = {w.name: Control(ctx, w.control_address) for w in (w0, w1)}
    before = {n: c.call("stats") for n, c in controls.items()}
    coord_bad_before = len(log_events(cluster, "coordinator", "bad_result_message"))
    pushes = {}
    for name, address in [
        (w0.name, w0.data_address),
        (w1.name, w1.data_address),
        ("result", cluster.cfg.coordinator.result_address),
    ]:
        pushes[name] = ctx.socket(zmq.PUSH)
        pushes[name].linger = 0
        pushes[name].connect(address)

    runner = Requests(cluster.api)
    runner.start()
    try:
        # A request is in flight on both stages before the first bad frame.
        wait_until(
            lambda: all(c.call("stats")["active_requests"] for c in controls.values()),
            "a running request",
            interval=0.02,
        )
        expected_bad = {}
        expected_stage = {}
        for w, first in ((w0, True), (w1, False)):
            bad, stage = malformed_on_data(first, hidden)
            for frames in [*bad.values(), *stage.values()]:
                pushes[w.name].send_multipart(tensor_frames(frames))
            bad_cmds, refused_cmds = malformed_commands()
            for name, frames in bad_cmds.items():
                reply = controls[w.name].send(frames)
                assert not reply.header["ok"] and reply.header["id"] == "", name
                assert reply.header["error"].startswith("bad message"), (name, reply.header)
            for name, frames in refused_cmds.items():
                reply = controls[w.name].send(frames)
                assert not reply.header["ok"] and reply.header["error"], name
            expected_bad[w.name] = len(bad) + len(bad_cmds)
            # forwards the stage refuses; the release is no error
            expected_stage[w.name] = len(stage) - 1

            # A message without REQ's empty delimiter is dropped by REP; messages
            # over the control socket's size limit are dropped by ZMQ. None
            # reaches the worker, and the control socket answers on.
            for frames in (
                wire.encode("command", {"cmd": "shutdown", "id": "9"}),
                [b"", head(kind="command", cmd="shutdown", id="x" * (wire.MAX_HEADER_BYTES + 1))],
                [b"", b"\0" * (1 << 20)],
            ):
                raw = ctx.socket(zmq.DEALER)
                raw.linger = 0
                raw.connect(w.control_address)
                raw.send_multipart(frames)
                assert controls[w.name].call("ping")["state"] == "ready"
                assert raw.poll(200) == 0
                raw.close()

        # The coordinator's result socket: malformed messages, wrong kinds, bad
        # token values, and results for requests it does not know.
        live = set(controls[w1.name].call("stats")["active_requests"])
        result_bad = {
            **malformed_anywhere(),
            "forward to the coordinator": [forward_head("x", 0, "int32", [1, 1]), np.zeros((1, 1), np.int32)],
            "command to the coordinator": [head(kind="command", cmd="shutdown", id="1")],
            "reply to the coordinator": [head(kind="reply", id="1", ok=True)],
            "release to the coordinator": [head(kind="release", req=stranger())],
            "token id above vocab": [tokens_head(stranger(), tokens=[3, 10**9], logprobs=[-1.0, -1.0])],
            "NaN logprob": [tokens_head(stranger(), logprobs=[float("nan")])],
            "+inf logprob": [tokens_head(stranger(), logprobs=[math.inf])],
            "logprob not a number": [tokens_head(stranger(), logprobs=["-1"])],
            "bad top_logprobs": [tokens_head(stranger(), top_logprobs=[[[1]]])],
            "top_logprobs not lists": [tokens_head(stranger(), top_logprobs=[5])],
            "no tokens": [tokens_head(stranger(), tokens=[], logprobs=[])],
            "fewer logprobs than tokens": [tokens_head(stranger(), tokens=[3, 4])],
            "fewer top_logprobs than tokens": [
                tokens_head(stranger(), tokens=[3, 4], logprobs=[-1.0, -1.0], top_logprobs=[[]])
            ],
            "negative token id": [tokens_head(stranger(), tokens=[-3])],
            "more tokens than a run carries": [
                tokens_head(stranger(), tokens=[3] * (wire.MAX_ID_LIST + 1), logprobs=[-1.0] * (wire.MAX_ID_LIST + 1))
            ],
        }
        result_ignored = {
            "tokens for an unknown request": [tokens_head(stranger())],
            "error for an unknown request": [head(kind="error", req=stranger(), message="boom")],
            **{f"stale tokens for {req}": [tokens_head(req, seq=10**9)] for req in live},
        }
        for frames in [*result_bad.values(), *result_ignored.values()]:
            pushes["result"].send_multipart(tensor_frames(frames))
        oversize = ctx.socket(zmq.PUSH)
        oversize.linger = 0
        oversize.connect(cluster.cfg.coordinator.result_address)
        oversize.send_multipart([b"\0" * (4 << 20)])  # over the result socket's size limit: dropped by ZMQ

        def counted():
            stats = {n: c.call("stats") for n, c in controls.items()}
            done = all(
                stats[n]["bad_messages"] - before[n]["bad_messages"] >= expected_bad[n]
                and stats[n]["stage_errors"] - before[n]["stage_errors"] >= expected_stage[n]
                for n in controls
            )
            coord = len(log_events(cluster, "coordinator", "bad_result_message")) - coord_bad_before
            return (stats, coord) if done and coord >= len(result_bad) else None

        after, coord_bad = wait_until(counted, "every bad message to be counted", interval=0.02)
        fuzzing_done = len(runner.results)
        wait_until(
            lambda: len(runner.results) > fuzzing_done or runner.errors, "a request after the fuzzing", interval=0.02
        )
    finally:
        runner.stop.set()
        runner.join(120)
        ctx.destroy(linger=0)

    assert not runner.errors, runner.errors
    assert runner.results
    for lp in runner.results:
        assert lp["token_ids"] == undisturbed["token_ids"]
        np.testing.assert_array_equal(lp["token_logprobs"], undisturbed["token_logprobs"])
    for n in controls:
        assert after[n]["bad_messages"] - before[n]["bad_messages"] == expected_bad[n], n
        assert after[n]["stage_errors"] - before[n]["stage_errors"] == expected_stage[n], n
    assert coord_bad == len(result_bad)
    assert cluster.coordinator.poll() is None
    assert all(p.poll() is None for p in cluster.workers.values())
    assert cluster.health()[0] == 200
    # every refusal is in the daemon's log
    for w in (w0, w1):
        daemon = f"worker-{w.name}"
        assert len(log_events(cluster, daemon, "bad_data_message")) >= len(malformed_on_data(w is w0, hidden)[0])
        assert len(log_events(cluster, daemon, "bad_command")) >= len(malformed_commands()[0])
        assert log_events(cluster, daemon, "unknown_command")
    unknown = log_events(cluster, "coordinator", "result_for_unknown_request")
    assert len(unknown) >= 2
