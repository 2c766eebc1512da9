"""Setting a cluster up without the cluster: which config a command finds,
`kimi init`, `--version`, service files, macOS wired memory, and warnings a
person can read on a terminal."""

from __future__ import annotations

import json
import plistlib
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from kimizmq import discovery, log, service, wired
from kimizmq.cli import main
from kimizmq.config import load_config
from kimizmq.local import write_config
from kimizmq.versions import local_versions, mismatch

BIN = Path(sys.executable).parent


def kimi(*args: str, env: dict | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


# -- which config ---------------------------------------------------------------------


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A current folder, a user config folder and no source checkout, all empty."""
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.delenv(discovery.ENV_VAR, raising=False)
    monkeypatch.setattr(discovery, "CHECKOUT_CONFIG", tmp_path / "no-checkout" / "kimi.toml")
    return cwd, home


def test_config_is_found_in_order_flag_env_cwd_user_dir(places, tmp_path, tiny_model, monkeypatch):
    cwd, _ = places
    with pytest.raises(discovery.NoConfig, match="pass --config PATH, set KIMI_CONFIG, or write one with `kimi init`"):
        discovery.find_config()
    user = discovery.user_config_path()
    assert str(user).startswith(str(tmp_path / "home"))
    user.parent.mkdir(parents=True)
    write_config(user, tiny_model, 1)
    assert discovery.find_config() == user
    write_config(cwd / "kimi.toml", tiny_model, 1)
    assert discovery.find_config() == cwd / "kimi.toml"
    monkeypatch.setenv(discovery.ENV_VAR, str(tmp_path / "env.toml"))
    assert discovery.find_config() == tmp_path / "env.toml"  # as given: load_config says it is missing
    assert discovery.find_config("/x/given.toml") == Path("/x/given.toml")


def test_kimi_plan_runs_on_the_config_of_the_current_folder(places, tiny_model):
    cwd, _ = places
    code, out = kimi("plan")
    assert code == 2 and "no config file" in out
    write_config(cwd / "kimi.toml", tiny_model, 2)
    code, out = kimi("plan")
    assert code == 0, out
    assert "files for w0:" in out and "files for w1:" in out


# -- kimi init ------------------------------------------------------------------------


def test_init_writes_a_config_that_loads_and_plans(tmp_path, tiny_model):
    out = tmp_path / "kimi.toml"
    args = ["init", "--model", str(tiny_model), "-o", str(out), "--user", "me"]
    code, said = kimi(*args, "--worker", "m3=10.0.0.1:512", "--worker", "m2=10.0.0.2:192")
    assert code == 0, said
    cfg = load_config(out)
    assert [(w.name, w.host, w.memory_gb) for w in cfg.workers] == [("m3", "10.0.0.1", 512), ("m2", "10.0.0.2", 192)]
    assert cfg.workers[1].ssh.target == "me@10.0.0.2" and cfg.coordinator.host == "10.0.0.1"
    assert cfg.model_path == tiny_model
    assert "# " in out.read_text()  # commented
    code, said = kimi("plan", "--config", str(out))
    assert code == 0, said

    code, said = kimi(*args, "--worker", "m3=10.0.0.1:512")
    assert code == 1 and "exists; pass --force" in said
    code, said = kimi(*args, "--force", "--worker", "m3@10.0.0.1")
    assert code == 2 and "NAME=HOST:MEMORY_GB" in said


def test_ssh_tables_refuse_unknown_keys_and_bad_values(tmp_path, tiny_model):
    for bad, words in [
        ("[workers.ssh]\nusr = 'me'", "unknown keys ['usr']"),
        ("[workers.ssh]\nport = 0", "port must be an integer port"),
        ("[workers.ssh]\nenv = {A = 1}", "env must be a table of strings"),
        ("[workers.ssh]\noptions = '-v'", "options must be a list of strings"),
    ]:
        path = write_config(tmp_path / "kimi.toml", tiny_model, 1, extra=bad + "\n")
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            load_config(path)


# -- versions -------------------------------------------------------------------------


def test_version_is_the_same_line_for_every_program():
    lines = {
        name: subprocess.run([str(BIN / name), "--version"], capture_output=True, text=True, check=True).stdout.strip()
        for name in ("kimi", "kimi-worker", "kimi-coordinator")
    }
    v = local_versions()
    want = f"kimizmq {v['kimizmq']}, MLX {v['mlx']}, wire protocol {v['protocol']}"
    assert set(lines.values()) == {want}


def test_version_mismatch_names_both_sides():
    mine = local_versions()
    assert mismatch(mine, dict(mine), me="a", them="b") is None
    msg = mismatch(mine, {**mine, "mlx": "0.1"}, me="worker w1", them="the coordinator")
    assert f"worker w1 runs protocol {mine['protocol']}, kimizmq {mine['kimizmq']}, mlx {mine['mlx']}" in msg
    assert "the coordinator runs" in msg and "mlx 0.1" in msg
    assert "no versions (an older kimizmq)" in mismatch(mine, None, me="a", them="b")


# -- services -------------------------------------------------------------------------


def test_service_install_writes_a_launchd_agent_and_a_systemd_unit(tmp_path, tiny_model):
    cfg_path = write_config(tmp_path / "kimi.toml", tiny_model, 2)
    code, out = kimi(
        "service",
        "install",
        "--config",
        str(cfg_path),
        "--worker",
        "w1",
        "--platform",
        "darwin",
        "--dir",
        str(tmp_path / "la"),
    )
    assert code == 0, out
    plist = plistlib.loads((tmp_path / "la" / "org.kimizmq.worker-w1.plist").read_bytes())
    assert plist["ProgramArguments"][1:] == ["--config", str(cfg_path), "--name", "w1"]
    assert Path(plist["ProgramArguments"][0]).name == "kimi-worker" and Path(plist["ProgramArguments"][0]).exists()
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert plist["StandardErrorPath"].endswith("log/worker-w1.err")
    assert "launchctl bootstrap gui/" in out

    code, out = kimi(
        "service",
        "install",
        "--config",
        str(cfg_path),
        "--coordinator",
        "--platform",
        "linux",
        "--dir",
        str(tmp_path / "sd"),
    )
    assert code == 0, out
    unit = (tmp_path / "sd" / "kimi-coordinator.service").read_text()
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line)
    assert lines["Restart"] == "on-failure" and lines["WantedBy"] == "default.target"
    argv = shlex.split(lines["ExecStart"])
    assert Path(argv[0]).name == "kimi-coordinator" and argv[1:] == ["--config", str(cfg_path)]
    assert subprocess.run([argv[0], "--version"], capture_output=True).returncode == 0
    assert "systemctl --user enable --now kimi-coordinator.service" in out

    code, out = kimi("service", "install", "--config", str(cfg_path), "--worker", "nobody", "--dir", str(tmp_path))
    assert code == 1 and "no worker named 'nobody'" in out
    assert service.daemon_id(None) == "coordinator"


# -- wired memory ---------------------------------------------------------------------


def test_wired_limit_follows_the_config_and_only_on_macos():
    gib = 1 << 30
    assert wired.limit_bytes(-1, 100 * gib) == 100 * gib  # the GPU's recommended working set
    assert wired.limit_bytes(-1, None) is None
    assert wired.limit_bytes(0, 100 * gib) is None  # leave MLX's default
    assert wired.limit_bytes(48, 100 * gib) == 48 * gib
    assert wired.apply(48, platform="linux") is None


def test_sysctl_warning_gives_the_exact_command_when_the_limit_is_low():
    need = 150 * (1 << 30) + 1
    msg = wired.sysctl_warning("m2", need, "0", str(192 << 30))
    assert "iogpu.wired_limit_mb is 0 (the default, about 147456 MB)" in msg
    assert "`sudo sysctl iogpu.wired_limit_mb=154624`" in msg and "fewer layers" not in msg
    assert wired.sysctl_warning("m2", need, "160000", str(192 << 30)) is None
    assert "fewer layers" in wired.sysctl_warning("m2", 190 << 30, "0", str(192 << 30))
    assert wired.sysctl_warning("m2", need, "", "") is None  # not macOS: nothing to say


# -- warnings on a terminal -----------------------------------------------------------


def test_stderr_lines_read_as_text_while_the_file_keeps_json(tmp_path):
    line = json.dumps(
        {
            "worker": "w1",
            "error": "no reply",
            "event": "worker_not_answering",
            "daemon": "coordinator",
            "level": "warning",
            "timestamp": "2026-01-02T03:04:05.6Z",
            "request_id": None,
        }
    )
    assert log.human(line) == '03:04:05 warning worker_not_answering worker=w1 error="no reply"'
    assert log.human("not json") == "not json"
    script = (
        "from pathlib import Path; from kimizmq import log; "
        f"log.configure('coordinator', Path({str(tmp_path)!r})); log.get_logger().warning('slow', worker='w0')"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert proc.stderr.split(" ", 1)[1] == "warning slow worker=w0\n"
    on_file = json.loads((tmp_path / "coordinator.jsonl").read_text())
    assert on_file["event"] == "slow" and on_file["level"] == "warning"


def test_shipped_example_config_still_loads():
    with open(discovery.CHECKOUT_CONFIG, "rb") as f:
        assert tomllib.load(f)["workers"]
