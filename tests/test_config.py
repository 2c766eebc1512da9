"""etc/kimi.toml parsing: the shipped file, defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kimizmq.config import ConfigError, load_config, parse_config

SHIPPED = Path(__file__).resolve().parents[1] / "etc" / "kimi.toml"
WORKER = {"name": "a", "host": "127.0.0.1", "memory_gb": 16, "control_port": 6001, "data_port": 6002}


def test_shipped_config_mirrors_the_two_mac_setup_and_runs_locally():
    cfg = load_config(SHIPPED)
    assert [(w.name, w.memory_gb) for w in cfg.workers] == [("m3-ultra", 512.0), ("m2-ultra", 192.0)]
    assert all(w.host == "127.0.0.1" for w in cfg.workers) and cfg.coordinator.host == "127.0.0.1"
    assert cfg.coordinator.api_port == 52415
    assert cfg.model_path == (SHIPPED.parent / "../models/kimi-k2-tiny").resolve()


def test_api_host_defaults_to_the_coordinator_host_and_can_differ(tmp_path):
    base = {"model": {"path": "m"}, "coordinator": {"host": "169.254.1.1"}, "workers": [WORKER]}
    assert parse_config(base, tmp_path / "k.toml").coordinator.api_host == "169.254.1.1"
    base["coordinator"]["api_host"] = "0.0.0.0"
    cfg = parse_config(base, tmp_path / "k.toml")
    assert (cfg.coordinator.api_host, cfg.coordinator.host) == ("0.0.0.0", "169.254.1.1")


def test_cache_limit_defaults_to_mlx_and_must_be_a_number(tmp_path):
    base = {"model": {"path": "m"}, "workers": [WORKER]}
    assert parse_config(base, tmp_path / "k.toml").runtime.cache_limit_gb < 0
    assert parse_config({**base, "runtime": {"cache_limit_gb": 2}}, tmp_path / "k.toml").runtime.cache_limit_gb == 2.0
    with pytest.raises(ConfigError, match="cache_limit_gb"):
        parse_config({**base, "runtime": {"cache_limit_gb": "2GB"}}, tmp_path / "k.toml")


def test_decode_mode_is_compiled_or_eager(tmp_path):
    base = {"model": {"path": "m"}, "workers": [WORKER]}
    assert parse_config(base, tmp_path / "k.toml").runtime.decode == "compiled"
    assert parse_config({**base, "runtime": {"decode": "eager"}}, tmp_path / "k.toml").runtime.decode == "eager"
    for bad in ("fast", "auto", 1):
        with pytest.raises(ConfigError, match="decode"):
            parse_config({**base, "runtime": {"decode": bad}}, tmp_path / "k.toml")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"memory_gb": 0}, "memory_gb"),
        ({"control_port": 70000}, "control_port"),
        ({"layers": [3]}, "layers"),
        ({"colour": "red"}, "unknown keys"),
    ],
)
def test_bad_worker_entries_are_named(tmp_path, change, message):
    data = {"model": {"path": "m"}, "workers": [{**WORKER, **change}]}
    with pytest.raises(ConfigError, match=message):
        parse_config(data, tmp_path / "k.toml")
