"""CURVE on every ZMQ socket, the HTTP API key, and no code from peers.

A cluster with keys made by `kimi keys --all` serves as a plain one does. A
peer whose key is not on the allow list (or that has no key, or that expects a
different server) cannot command a worker or put a message into any socket:
its messages never reach a daemon, which the daemons' counters and logs show
next to those of a trusted peer sending the same.
"""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlx.core as mx
import pytest
import zmq
import zmq.auth
from click.testing import CliRunner
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from kimizmq import security, wire
from kimizmq.cli import main as kimi
from kimizmq.config import load_config
from kimizmq.local import LocalCluster, write_config
from tests.support import greedy_body, log_events, post_json, wait_until

API_KEY = "sk-test-0123456789"
PROMPT = [5, 17, 99, 230, 41, 7, 300, 12, 64, 8, 150, 77]
N_TOKENS = 16
REFUSED_WAIT_MS = 1500  # a refused peer's reply would have come long before this
PACKAGE = Path(__file__).resolve().parent.parent / "kimizmq"


def secure_config(path: Path, model: Path, n_workers: int, *, api_key: bool = False) -> Path:
    extra = '\n[security]\ncurve_dir = "keys"\n' + (f'api_key = "{API_KEY}"\n' if api_key else "")
    return write_config(path, model, n_workers, extra=extra)


def kimi_keys(*args: str):
    return CliRunner().invoke(kimi, ["keys", *args])


def complete(base: str, n: int = N_TOKENS, key: str | None = API_KEY) -> tuple[int, dict]:
    return post_json(base, "/v1/completions", greedy_body(PROMPT, n), api_key=key)


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    cfg = secure_config(tmp_path_factory.mktemp("secure") / "kimi.toml", tiny_model, 2, api_key=True)
    made = kimi_keys("--config", str(cfg), "--all")
    assert made.exit_code == 0, made.output
    with LocalCluster(cfg) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_model) -> list[int]:
    model, _ = load_model(tiny_model)
    model.set_dtype(mx.float32)
    cache = make_prompt_cache(model)
    logits = model(mx.array([PROMPT]), cache=cache)[:, -1, :]
    tokens = []
    for _ in range(N_TOKENS):
        tokens.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[:, -1, :]
    return tokens


# -- keys -------------------------------------------------------------------------------------


def test_kimi_keys_makes_a_private_secret_and_a_public_key_per_daemon(tiny_model, tmp_path):
    cfg_path = secure_config(tmp_path / "kimi.toml", tiny_model, 2)
    cfg = load_config(cfg_path)
    listing = kimi_keys("--config", str(cfg_path))
    assert listing.exit_code == 0 and listing.output.count(" -") >= 6  # nothing there yet

    made = kimi_keys("--config", str(cfg_path), "--name", "w1")
    assert made.exit_code == 0, made.output
    secret, public = security.secret_path(cfg, "w1"), security.public_path(cfg, "w1")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    pub_key, sec_key = zmq.auth.load_certificate(secret)
    assert zmq.auth.load_certificate(public) == (pub_key, None)  # the public file holds no secret
    assert zmq.curve_public(sec_key) == pub_key

    again = kimi_keys("--config", str(cfg_path), "--name", "w1")
    assert again.exit_code != 0 and "already exists; pass --force" in again.output
    assert zmq.auth.load_certificate(secret)[1] == sec_key
    forced = kimi_keys("--config", str(cfg_path), "--name", "w1", "--force")
    assert forced.exit_code == 0 and zmq.auth.load_certificate(secret)[1] != sec_key

    listing = kimi_keys("--config", str(cfg_path))
    row = next(line for line in listing.output.splitlines() if line.startswith("w1 "))
    assert "yes" in row and zmq.auth.load_certificate(public)[0].decode() in row

    unknown = kimi_keys("--config", str(cfg_path), "--name", "w9")
    assert unknown.exit_code != 0 and "no daemon named 'w9' (known: coordinator, w0, w1)" in unknown.output
    plain = kimi_keys("--config", str(write_config(tmp_path / "plain.toml", tiny_model, 1)), "--all")
    assert plain.exit_code != 0 and "set [security] curve_dir" in plain.output


def test_missing_or_mismatched_keys_are_named_at_start(tiny_model, tmp_path):
    cfg_path = secure_config(tmp_path / "kimi.toml", tiny_model, 2)
    cfg = load_config(cfg_path)
    with pytest.raises(security.SecurityError, match=r"w0.key_secret is missing: run `kimi keys --config"):
        security.Curve(cfg, "w0")
    assert kimi_keys("--config", str(cfg_path), "--all").exit_code == 0
    security.public_path(cfg, "w1").unlink()
    with pytest.raises(
        security.SecurityError, match=r"public/w1.key is missing: copy it from the machine that runs w1"
    ):
        security.Curve(cfg, security.COORDINATOR, peers=("w0", "w1"))
    security.public_path(cfg, "w0").write_text(security.public_path(cfg, "coordinator").read_text())
    with pytest.raises(security.SecurityError, match=r"public/w0.key does not hold the public key of .*w0.key_secret"):
        security.Curve(cfg, "w0")
    with pytest.raises(security.SecurityError, match=r"public/w1.key is missing: put the public-key line of"):
        security.Curve(cfg, "w1")
    security.secret_path(cfg, "coordinator").write_text('curve\n    public-key = "short"\n')
    with pytest.raises(security.SecurityError, match=r"coordinator.key_secret: no valid public key"):
        security.Curve(cfg, security.COORDINATOR)
    with pytest.raises(security.SecurityError, match=r"tcp://10.0.0.1:9 is neither"):
        security.owner_of(cfg, "tcp://10.0.0.1:9")

    # The daemons say the same and exit, without a traceback.
    for module, args, expect in (
        ("worker", ("--name", "w1"), "public/w1.key is missing"),
        ("coordinator", (), "coordinator.key_secret: no valid public key"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", f"kimizmq.{module}", "--config", str(cfg_path), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert expect in out.stderr, out.stderr


# -- a cluster with CURVE -------------------------------------------------------------------


def test_curve_cluster_gives_the_same_greedy_tokens(cluster, reference):
    status, out = complete(cluster.api)
    assert status == 200, out
    assert out["choices"][0]["logprobs"]["token_ids"] == reference
    for daemon, peers in (
        ("coordinator", {"w0", "w1"}),
        ("worker-w0", {"coordinator", "w1"}),  # w1, the last stage, feeds decode steps back
        ("worker-w1", {"coordinator", "w0"}),
    ):
        assert {e["peer"] for e in log_events(cluster, daemon, "curve_peer_allowed")} == peers


def test_http_api_needs_the_api_key(cluster):
    for key in (None, "wrong", API_KEY + "x", ""):
        status, out = complete(cluster.api, n=2, key=key)
        assert status == 401 and out["error"]["code"] == "invalid_api_key", (key, out)
    assert complete(cluster.api, n=2)[0] == 200
    with urllib.request.urlopen(cluster.api + "/health", timeout=10) as r:  # for load balancers: no key
        assert r.status == 200


class Peer:
    """A raw pyzmq client with some CURVE setup (or none)."""

    def __init__(self, ctx: zmq.Context, setup):
        self.ctx = ctx
        self.setup = setup  # (socket, server name) -> None
        self.sockets: list[zmq.Socket] = []

    def socket(self, kind: int, address: str, server: str) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.linger = 0
        self.setup(s, server)
        s.connect(address)
        self.sockets.append(s)
        return s

    def send_command(self, address: str, server: str, cmd: str) -> zmq.Socket:
        """A command over DEALER (REQ's empty delimiter, then the message)."""
        s = self.socket(zmq.DEALER, address, server)
        s.send_multipart([b"", *wire.encode("command", {"cmd": cmd, "id": cmd})])
        return s

    def command(self, address: str, server: str, cmd: str, timeout_ms: int) -> dict | None:
        """Its reply header, or None when none came within the timeout."""
        s = self.send_command(address, server, cmd)
        if not s.poll(timeout_ms):
            return None
        return wire.decode(s.recv_multipart()[1:]).header

    def push(self, address: str, server: str, frames: list) -> None:
        self.socket(zmq.PUSH, address, server).send_multipart(frames)


def keypair_setup(cfg, public: bytes, secret: bytes, server_key=None):
    def setup(sock: zmq.Socket, server: str) -> None:
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = server_key or zmq.auth.load_certificate(security.public_path(cfg, server))[0]

    return setup


def rogue_setups(cfg) -> dict:
    coordinator = zmq.auth.load_certificate(security.secret_path(cfg, security.COORDINATOR))
    return {
        # knows every server's public key (they are not secret), has its own key
        "unknown key": keypair_setup(cfg, *zmq.curve_keypair()),
        # plain TCP against a CURVE server
        "no key": lambda sock, server: None,
        # a trusted key, talking to a server that must prove another identity
        "wrong server key": keypair_setup(cfg, *coordinator, server_key=zmq.curve_keypair()[0]),
    }


GARBAGE = [b"\xc1 not msgpack"]


def forward(req: str) -> list:
    header = {"req": req, "seq": 0, "offset": 0, "sample": True, "params": {}}
    return wire.encode("forward", header, [mx.array([[1, 2, 3]], dtype=mx.int32)])


@pytest.mark.parametrize("peer_kind", ["unknown key", "no key", "wrong server key"])
def test_a_peer_not_on_the_allow_list_cannot_send_or_command_anything(cluster, reference, peer_kind):
    cfg = cluster.cfg
    w0, w1 = cfg.workers
    ctx = zmq.Context()
    trusted = Peer(ctx, keypair_setup(cfg, *zmq.auth.load_certificate(security.secret_path(cfg, "coordinator"))))
    as_w1 = Peer(ctx, keypair_setup(cfg, *zmq.auth.load_certificate(security.secret_path(cfg, "w1"))))
    rogue = Peer(ctx, rogue_setups(cfg)[peer_kind])
    try:

        def stats() -> dict:
            return {w.name: trusted.command(w.control_address, w.name, "stats", 10_000)["result"] for w in (w0, w1)}

        before = stats()
        coord_bad = len(log_events(cluster, "coordinator", "bad_result_message"))
        # Commands, including shutdown: no reply, no effect.
        poller = zmq.Poller()
        for w in (w0, w1):
            for cmd in ("stats", "shutdown", "unload"):
                poller.register(rogue.send_command(w.control_address, w.name, cmd), zmq.POLLIN)
        # Data: a well-formed new request and garbage to each worker, garbage to the coordinator.
        for w in (w0, w1):
            rogue.push(w.data_address, w.name, forward(f"rogue-{peer_kind}"))
            rogue.push(w.data_address, w.name, GARBAGE)
        rogue.push(cfg.coordinator.result_address, security.COORDINATOR, GARBAGE)
        assert poller.poll(REFUSED_WAIT_MS) == []

        # A legitimate request still works, start to end.
        status, out = complete(cluster.api)
        assert status == 200 and out["choices"][0]["logprobs"]["token_ids"] == reference
        # The same garbage from trusted peers is received, refused and counted ...
        trusted.push(w0.data_address, w0.name, GARBAGE)
        as_w1.push(cfg.coordinator.result_address, security.COORDINATOR, GARBAGE)
        after = wait_until(
            lambda: (s := stats())[w0.name]["bad_messages"] > before[w0.name]["bad_messages"] and s,
            "the trusted peer's message to be counted",
            interval=0.02,
        )
        wait_until(
            lambda: len(log_events(cluster, "coordinator", "bad_result_message")) > coord_bad,
            "the coordinator to log the trusted peer's message",
            interval=0.02,
        )
        # ... and nothing of the rogue's: one request more (the legitimate one), one bad message more (the trusted one).
        for w in (w0, w1):
            b, a = before[w.name], after[w.name]
            assert a["requests_started"] == b["requests_started"] + 1, w.name
            assert a["bad_messages"] == b["bad_messages"] + (1 if w is w0 else 0), w.name
            assert a["state"] == "ready", w.name
        assert len(log_events(cluster, "coordinator", "bad_result_message")) == coord_bad + 1
        assert cluster.coordinator.poll() is None and all(p.poll() is None for p in cluster.workers.values())
        if peer_kind == "unknown key":
            for daemon in ("worker-w0", "worker-w1", "coordinator"):
                assert log_events(cluster, daemon, "curve_peer_refused"), daemon
    finally:
        ctx.destroy(linger=0)


def test_a_public_key_copied_into_the_allow_list_counts_without_a_restart(cluster):
    cfg = cluster.cfg
    w0 = cfg.workers[0]
    ctx = zmq.Context()
    public, secret = zmq.curve_keypair()
    newcomer = Peer(ctx, keypair_setup(cfg, public, secret))
    key_file = security.public_path(cfg, "ops-laptop")
    try:
        assert newcomer.command(w0.control_address, w0.name, "ping", REFUSED_WAIT_MS) is None
        key_file.write_text(f'curve\n    public-key = "{public.decode()}"\n')
        reply = newcomer.command(w0.control_address, w0.name, "ping", 10_000)
        assert reply is not None and reply["ok"] and reply["result"]["name"] == w0.name
        key_file.unlink()
        assert newcomer.command(w0.control_address, w0.name, "ping", REFUSED_WAIT_MS) is None
    finally:
        key_file.unlink(missing_ok=True)
        ctx.destroy(linger=0)


# -- nothing a peer sends is run ----------------------------------------------------------------

FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "yaml", "jsonpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def test_no_pickle_eval_or_exec_in_the_package():
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                names = [node.func.id] if node.func.id in FORBIDDEN_CALLS else []
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                names = ["importlib"] if node.func.attr == "import_module" else []
                names += ["trust_remote_code"] * any(
                    k.arg == "trust_remote_code" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                    for k in node.keywords
                )
            else:
                continue
            found += [
                f"{path.name}:{node.lineno} {n}"
                for n in names
                if n in FORBIDDEN_MODULES | FORBIDDEN_CALLS | {"importlib", "trust_remote_code"}
            ]
    assert found == []


def test_msgpack_extension_types_are_refused():
    import msgpack

    header = msgpack.packb(
        {"v": wire.PROTOCOL_VERSION, "kind": "release", "req": msgpack.ExtType(42, b"payload"), "tensors": []}
    )
    with pytest.raises(wire.WireError, match="max_ext_len"):
        wire.decode([header])


def test_secret_keys_readable_by_others_are_warned_about(tiny_model, tmp_path, capsys):
    cfg_path = secure_config(tmp_path / "kimi.toml", tiny_model, 1)
    cfg = load_config(cfg_path)
    assert kimi_keys("--config", str(cfg_path), "--all").exit_code == 0
    os.chmod(security.secret_path(cfg, "w0"), 0o644)
    from kimizmq import log

    log.configure("test", None)
    security.Curve(cfg, "w0")
    assert "secret_key_readable_by_others" in capsys.readouterr().err
