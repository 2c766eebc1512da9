"""etc/kimi.toml parsing: the shipped file, defaults, and errors that name the key."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from kimizmq.config import (
    PLAN_RANGES,
    RUNTIME_RANGES,
    ConfigError,
    PlanConfig,
    RuntimeConfig,
    load_config,
    parse_config,
)

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
        ({"memory_gb": math.nan}, "memory_gb"),
        ({"memory_gb": math.inf}, "memory_gb"),
        ({"max_memory_gb": -1}, "max_memory_gb"),
        ({"bandwidth_gbs": 0}, "bandwidth_gbs"),
        ({"control_port": 70000}, "control_port"),
        ({"layers": [3]}, "layers"),
        ({"colour": "red"}, "unknown key 'colour'"),
    ],
)
def test_bad_worker_entries_are_named(tmp_path, change, message):
    data = {"model": {"path": "m"}, "workers": [{**WORKER, **change}]}
    with pytest.raises(ConfigError, match=message):
        parse_config(data, tmp_path / "k.toml")


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("runtime", "prefill_chunk", 0),
        ("runtime", "max_context", -5),
        ("runtime", "max_concurrent", 0),
        ("runtime", "max_queue", -1),
        ("runtime", "load_timeout_s", 0),
        ("runtime", "heartbeat_interval_s", 0.0),
        ("runtime", "liveness_timeout_s", -1.0),
        ("runtime", "recovery_timeout_s", -0.5),
        ("runtime", "request_idle_timeout_s", math.inf),
        ("runtime", "cache_limit_gb", math.nan),
        ("runtime", "stream_interval_ms", -1),
        ("runtime", "stream_interval_ms", 1001),
        ("runtime", "stream_interval_ms", math.nan),
        ("plan", "memory_fraction", 0),
        ("plan", "memory_fraction", 1.5),
        ("plan", "runtime_margin_gb", -1),
    ],
)
def test_numbers_outside_their_range_are_named(tmp_path, section, key, value):
    """A setting no daemon could run with (a zero chunk, a negative context, NaN)
    is refused when the file is read, naming the key and the rule."""
    data = {"model": {"path": "m"}, "workers": [WORKER], section: {key: value}}
    with pytest.raises(ConfigError, match=rf"\[{section}\]: {key} must be a finite number"):
        parse_config(data, tmp_path / "k.toml")


def test_every_numeric_setting_has_a_range(tmp_path):
    """A new number in [runtime] or [plan] needs its bounds in the table; the
    defaults are inside them, and so are the edges."""
    for cls, ranges in ((RuntimeConfig, RUNTIME_RANGES), (PlanConfig, PLAN_RANGES)):
        numeric = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, (int, float))}
        assert numeric == set(ranges), cls.__name__
    cfg = parse_config({"model": {"path": "m"}, "workers": [WORKER]}, tmp_path / "k.toml")
    assert cfg.runtime == RuntimeConfig() and cfg.plan == PlanConfig()
    edges = {"stream_interval_ms": 0, "max_queue": 0, "recovery_timeout_s": 0, "prefill_chunk": 1}
    assert parse_config({"model": {"path": "m"}, "workers": [WORKER], "runtime": edges}, tmp_path / "k.toml")
    top = {
        "model": {"path": "m"},
        "workers": [WORKER],
        "runtime": {"stream_interval_ms": 1000},
        "plan": {"memory_fraction": 1},
    }
    assert parse_config(top, tmp_path / "k.toml").plan.memory_fraction == 1.0


@pytest.mark.parametrize(
    "data,message",
    [
        ({"security": {"apikey": "s3cret"}}, r"\[security\]: unknown key 'apikey'; did you mean 'api_key'\?"),
        ({"security": {"curve_dri": "keys"}}, r"\[security\]: unknown key 'curve_dri'; did you mean 'curve_dir'\?"),
        ({"coordinator": {"api_prot": 8000}}, r"\[coordinator\]: unknown key 'api_prot'; did you mean 'api_port'\?"),
        ({"logging": {"dri": "log"}}, r"\[logging\]: unknown key 'dri'; did you mean 'dir'\?"),
        (
            {"runtime": {"liveness_timeout": 9.0}},
            r"unknown key 'liveness_timeout'; did you mean 'liveness_timeout_s'\?",
        ),
        ({"securty": {"api_key": "s3cret"}}, r"unknown section 'securty'; did you mean 'security'\?"),
        ({"security": {"api_key": 12345}}, r"\[security\]: api_key"),
        ({"security": {"api_key": " "}}, r"\[security\]: api_key is empty"),
        ({"security": {"curve_dir": ""}}, r"\[security\]: curve_dir is empty"),
        ({"security": {"curve_dir": ["keys"]}}, r"\[security\]: curve_dir"),
        ({"security": "open"}, r"\[security\] must be a table"),
        ({"logging": {"dir": 3}}, r"\[logging\]: dir"),
    ],
)
def test_a_misspelt_or_unreadable_setting_stops_the_daemon_naming_the_nearest_key(tmp_path, data, message):
    """A typo must never pass silently: `apikey` would leave the API open and
    `curve_dri` the sockets on plain TCP."""
    base = {"model": {"path": "m"}, "workers": [WORKER]}
    with pytest.raises(ConfigError, match=message):
        parse_config({**base, **data}, tmp_path / "k.toml")


def test_a_misspelt_model_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"\[model\]: unknown key 'nmae'; did you mean 'name'\?"):
        parse_config({"model": {"path": "m", "nmae": "x"}, "workers": [WORKER]}, tmp_path / "k.toml")
