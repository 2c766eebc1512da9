"""`kimi sync`, `kimi up` and `kimi down` over real OpenSSH to three machines
made of network namespaces (tests/hosts.py), and the version handshake.

Each machine has its own address and its own disk at the same path; the
coordinator runs on the first one, next to worker w0, as on the two-Mac
cluster. Skipped, with the reason, where namespaces or sshd are unavailable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kimizmq import __version__
from kimizmq.checkpoint import HEADERS_FILE, headers_json, stage_tensor_names, tensor_index
from kimizmq.local import LocalCluster, write_config
from tests import hosts as hosts_mod
from tests.support import complete_ids, wait_until
from tests.test_pipeline import PROMPT, reference_greedy

N_HOSTS = 3
N_TOKENS = 16
MODEL_DIR = "models/kimi-k2-tiny"  # [model] path, relative to each machine's config
ALT_VERSION = "0.0.0"
BIN = Path(sys.executable).parent
KIMI_TIMEOUT_S = 300


def kimi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "kimi"), *args], capture_output=True, text=True, timeout=KIMI_TIMEOUT_S, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="session")
def other_version(tmp_path_factory) -> Path:
    """A copy of kimizmq at another version; on PYTHONPATH it is the one imported."""
    site = tmp_path_factory.mktemp("other-version")
    shutil.copytree(Path(__file__).resolve().parent.parent / "kimizmq", site / "kimizmq")
    init = site / "kimizmq" / "__init__.py"
    text = init.read_text()
    assert f'__version__ = "{__version__}"' in text
    init.write_text(text.replace(f'__version__ = "{__version__}"', f'__version__ = "{ALT_VERSION}"'))
    return site


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if reason := hosts_mod.unavailable():
        pytest.skip(f"no namespace machines: {reason}")
    root = tmp_path_factory.mktemp("hosts")
    with hosts_mod.Hosts(root, N_HOSTS, root / "disk") as h:
        yield h


def cluster_config(h: hosts_mod.Hosts, path: Path, *, worker_ssh: dict[int, str] | None = None) -> Path:
    """This machine's copy of the config: every daemon reached over ssh, its
    config at <disk>/kimi.toml there, the coordinator on machine 0."""
    remote = h.shared_path / "kimi.toml"
    ssh = f'options = ["-F", "{h.ssh_config}"]\nconfig = "{remote}"'
    lines = [
        f'[model]\npath = "{MODEL_DIR}"\nname = "kimi-k2-tiny"\n',
        f'[coordinator]\nhost = "{h.address(0)}"\napi_port = 52415\nresult_port = 52400',
        f'[coordinator.ssh]\n{ssh}\ncommand = "{BIN / "kimi-coordinator"}"\n',
        "[runtime]\nprefill_chunk = 16\nmax_context = 1024\nmax_concurrent = 4\nload_timeout_s = 120\n",
        '[logging]\ndir = "log"\n',
    ]
    for i in range(N_HOSTS):
        lines += [
            f'[[workers]]\nname = "w{i}"\nhost = "{h.address(i)}"\nmemory_gb = 16\ncontrol_port = 52501\ndata_port = 52502',
            f'[workers.ssh]\n{ssh}\ncommand = "{BIN / "kimi-worker"}"\n{(worker_ssh or {}).get(i, "")}\n',
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def host_model(h: hosts_mod.Hosts, i: int) -> Path:
    return h.folder(i) / MODEL_DIR


def expected_files(model: Path, start: int, end: int, n_layers: int) -> set[str]:
    index = tensor_index(model)
    names = stage_tensor_names(index, start, end, first=start == 0, last=end == n_layers)
    small = {p.name for p in model.iterdir() if not p.name.endswith(".safetensors")}
    return {index[n].file.name for n in names} | small | {HEADERS_FILE}


def test_sync_copies_each_machine_only_its_files_and_a_second_run_nothing(hosts, tiny_model, tmp_path):
    cfg = cluster_config(hosts, tmp_path / "kimi.toml")
    out = kimi("sync", "--config", str(cfg), "--from", str(tiny_model))
    assert out.returncode == 0, out.stderr + out.stdout
    stages = {}
    for line in out.stdout.splitlines():
        if line.startswith("w") and "[" in line:
            name, span = line.split(" ", 1)
            start, end = span[span.index("[") + 1 : span.index(")")].split(", ")
            stages[name] = (int(start), int(end))
    assert sorted(stages) == [f"w{i}" for i in range(N_HOSTS)]
    all_weights = {p.name for p in tiny_model.glob("*.safetensors")}
    for i in range(N_HOSTS):
        want = expected_files(tiny_model, *stages[f"w{i}"], 7)
        have = {p.name for p in host_model(hosts, i).iterdir()}
        assert have == want, f"machine {i}"
        assert all_weights - have, f"machine {i} got every weight file"
        for name in have - {HEADERS_FILE}:
            assert (host_model(hosts, i) / name).read_bytes() == (tiny_model / name).read_bytes()
        assert (host_model(hosts, i) / HEADERS_FILE).read_bytes() == headers_json(tensor_index(tiny_model))

    before = {p: p.stat().st_mtime_ns for i in range(N_HOSTS) for p in host_model(hosts, i).iterdir()}
    again = kimi("sync", "--config", str(cfg), "--from", str(tiny_model))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("files there") == N_HOSTS and "copying" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # An interrupted copy: half a file left as .partial goes on from there.
    weight = sorted(n for n in {p.name for p in host_model(hosts, 1).iterdir()} if n.endswith(".safetensors"))[0]
    target = host_model(hosts, 1) / weight
    data = target.read_bytes()
    target.unlink()
    (host_model(hosts, 1) / f"{weight}.partial").write_bytes(data[: len(data) // 2])
    resumed = kimi("sync", "--config", str(cfg), "--from", str(tiny_model))
    assert resumed.returncode == 0, resumed.stderr
    assert "copying 1 of" in resumed.stdout and "(1 resumed)" in resumed.stdout
    assert target.read_bytes() == data and not (host_model(hosts, 1) / f"{weight}.partial").exists()


def test_sync_from_the_machine_that_has_the_model(hosts, tiny_model, tmp_path):
    """`--from w0:FOLDER`: the checkpoint is indexed on w0's machine and
    streamed from there; the others get the same files as from a local folder."""
    cfg = cluster_config(hosts, tmp_path / "kimi.toml")
    shutil.copytree(tiny_model, hosts.folder(0) / "full", dirs_exist_ok=True)
    for i in (1, 2):
        shutil.rmtree(host_model(hosts, i), ignore_errors=True)
    source = f"w0:{hosts.shared_path / 'full'}"
    out = kimi("sync", "--config", str(cfg), "--from", source)
    assert out.returncode == 0, out.stderr + out.stdout
    local = kimi("sync", "--config", str(cfg), "--from", str(tiny_model), "--dry-run")
    assert [line for line in out.stdout.splitlines() if line.startswith("w")][:N_HOSTS] == [
        line for line in local.stdout.splitlines() if line.startswith("w")
    ]
    for i in (1, 2):
        have = sorted(p.name for p in host_model(hosts, i).iterdir())
        assert HEADERS_FILE in have and not any(n.endswith(".partial") for n in have)
        for name in set(have) - {HEADERS_FILE}:
            assert (host_model(hosts, i) / name).read_bytes() == (tiny_model / name).read_bytes()
        assert (host_model(hosts, i) / HEADERS_FILE).read_bytes() == headers_json(tensor_index(tiny_model))
    again = kimi("sync", "--config", str(cfg), "--from", source)
    assert again.returncode == 0 and "copying" not in again.stdout, again.stdout
    bad = kimi("sync", "--config", str(cfg), "--from", "w9:/x")
    assert bad.returncode == 1 and "no worker or coordinator named 'w9'" in bad.stderr


def test_up_serves_mlx_lm_greedy_over_ssh_and_down_stops_everything(hosts, tiny_model, tmp_path):
    cfg = cluster_config(hosts, tmp_path / "kimi.toml")
    synced = kimi("sync", "--config", str(cfg), "--from", str(tiny_model))
    assert synced.returncode == 0, synced.stderr
    up = kimi("up", "--config", str(cfg))
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        api = f"http://{hosts.address(0)}:52415"
        assert f"ready: {api}/v1" in up.stdout
        for i in range(N_HOSTS):
            assert any(line.strip().startswith(f"w{i}: {hosts.address(i)}") for line in up.stderr.splitlines())
        for i in range(N_HOSTS):
            running = hosts.others(i)
            assert any(f"--name w{i}" in c for c in running), running
        assert any("kimi-coordinator" in c for c in hosts.others(0))
        ref_tokens, ref_logprobs = reference_greedy(tiny_model, PROMPT, N_TOKENS)
        lp = complete_ids(api, PROMPT, N_TOKENS)["logprobs"]
        assert lp["token_ids"] == ref_tokens
        np.testing.assert_allclose(lp["token_logprobs"], ref_logprobs, rtol=1e-4, atol=1e-6)
        again = kimi("up", "--config", str(cfg))
        assert again.returncode != 0 and "kimi down` first" in again.stderr
    finally:
        down = kimi("down", "--config", str(cfg))
    assert down.returncode == 0, down.stderr
    assert down.stdout.count(": stopped") == N_HOSTS + 1
    for i in range(N_HOSTS):
        wait_until(lambda i=i: not hosts.others(i), f"nothing left running on machine {i}")
    assert "nothing to stop" in kimi("down", "--config", str(cfg)).stdout


def test_up_refuses_a_machine_of_another_version_and_starts_nothing(hosts, other_version, tmp_path):
    cfg = cluster_config(hosts, tmp_path / "kimi.toml", worker_ssh={2: f'env = {{PYTHONPATH = "{other_version}"}}'})
    up = kimi("up", "--config", str(cfg))
    assert up.returncode == 1
    message = up.stderr
    assert f"worker 'w2' on {hosts.address(2)}: version mismatch" in message
    assert f"kimizmq {__version__}" in message and f"kimizmq {ALT_VERSION}" in message
    for i in range(N_HOSTS):
        assert not hosts.others(i), f"machine {i} runs {hosts.others(i)}"
    assert not (tmp_path / "log" / "up.json").exists()


@pytest.mark.parametrize(
    "change,cause",
    [
        ({"host": "unreachable"}, "unreachable"),
        ({"command": "/nonexistent/kimi-worker"}, "remote command missing"),
        ({"identity": True}, "cannot log in"),
    ],
    ids=["unreachable", "command-missing", "auth"],
)
def test_up_names_the_machine_and_the_cause(hosts, tmp_path, change, cause):
    cfg = cluster_config(hosts, tmp_path / "kimi.toml")
    text = cfg.read_text()
    if change.get("host"):  # nobody there; and no need to wait the default 10 s to say so
        text = text.replace(f'host = "{hosts.address(1)}"', f'host = "{hosts.net}.250"')
        text = text.replace(f'"-F", "{hosts.ssh_config}"', f'"-F", "{hosts.ssh_config}", "-o", "ConnectTimeout=2"')
    if change.get("command"):
        text = text.replace(f'command = "{BIN / "kimi-worker"}"', f'command = "{change["command"]}"', 1)
    if change.get("identity"):
        stranger = tmp_path / "stranger"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
        conf = tmp_path / "ssh_config"
        conf.write_text(hosts.ssh_config.read_text().replace(str(hosts.root / "id_ed25519"), str(stranger)))
        text = text.replace(str(hosts.ssh_config), str(conf))
    cfg.write_text(text)
    up = kimi("up", "--config", str(cfg))
    assert up.returncode == 1
    assert cause in up.stderr and f"{hosts.net}." in up.stderr, up.stderr
    for i in range(N_HOSTS):
        assert not hosts.others(i)


def test_up_says_which_port_is_busy_and_stops_what_it_started(hosts, tiny_model, tmp_path):
    cfg = cluster_config(hosts, tmp_path / "kimi.toml")
    assert kimi("sync", "--config", str(cfg), "--from", str(tiny_model)).returncode == 0
    holder = (
        f"import socket, sys; s = socket.socket(); s.bind(('{hosts.address(1)}', 52501)); s.listen(); sys.stdin.read()"
    )
    squatter = subprocess.Popen(
        ["ip", "netns", "exec", hosts.ns(1), sys.executable, "-c", holder], stdin=subprocess.PIPE
    )
    try:
        wait_until(lambda: any("socket.socket()" in c for c in hosts.others(1)), "the port to be taken")
        up = kimi("up", "--config", str(cfg))
    finally:
        squatter.stdin.close()
        squatter.wait(10)
    assert up.returncode == 1
    assert f"worker 'w1' on {hosts.address(1)} exited: port busy" in up.stderr, up.stderr
    assert "Address already in use" in up.stderr
    for i in range(N_HOSTS):
        wait_until(lambda i=i: not hosts.others(i), f"nothing left running on machine {i}")
    assert not (tmp_path / "log" / "up.json").exists()


def test_a_worker_of_another_version_refuses_the_load(tiny_model, other_version, tmp_path):
    """The handshake itself: a coordinator and a worker of different versions
    on loopback. The worker refuses before loading, naming both versions."""
    cluster = LocalCluster(write_config(tmp_path / "kimi.toml", tiny_model, 2))
    # Started from another folder: the current one may hold this checkout's own metadata.
    other = subprocess.Popen(
        [str(BIN / "kimi-worker"), "--config", str(cluster.config_path), "--name", "w1"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(other_version)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cluster.start_worker("w0")
        coordinator = cluster.start_coordinator()
        assert coordinator.wait(120) != 0
    finally:
        cluster.stop()
        LocalCluster._stop(other)
    said = cluster.stderr("coordinator")
    assert "version mismatch: worker w1 runs" in said, said
    assert f"kimizmq {ALT_VERSION}" in said and f"kimizmq {__version__}" in said
    events = [json.loads(line) for line in (cluster.log_dir / "worker-w1.jsonl").read_text().splitlines()]
    assert not any(e["event"] == "load_started" for e in events)
    assert any(e["event"] == "command_refused" and "version mismatch" in e["error"] for e in events)
