"""The planner: byte sizes without loading, placement, reserves, `kimi plan`."""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from kimizmq.checkpoint import CheckpointError, layer_of, stage_tensor_names, tensor_index
from kimizmq.cli import main
from kimizmq.config import load_config
from kimizmq.memory import available_memory_bytes, check_stage_memory, vm_stat_available_bytes
from kimizmq.plan import GIB, PlanError, make_plan
from kimizmq.sizes import LayerSizes, estimate_layer_sizes, kv_bytes_per_token_per_layer, layer_sizes

REFERENCE = Path(__file__).resolve().parents[1] / "etc" / "reference"  # a copy of ../shared/reference
KIMI_CONFIG = REFERENCE / "kimi-k2-instruct.config.json"
KIMI = {"m3-ultra": 512, "m2-ultra": 192}
STAGE_KEYS = {
    "worker",
    "start",
    "end",
    "weight_bytes",
    "reserved_bytes",
    "prefix_cache_bytes",
    "memory_bytes",
}


def write_toml(
    tmp_path: Path,
    model_dir: Path,
    workers: dict[str, float],
    *,
    extra: dict[str, dict] | None = None,
    plan: str = "",
    runtime: str = "max_context = 8192\nmax_concurrent = 8",
) -> Path:
    """A kimi.toml with one [[workers]] entry per name; `extra` adds keys to a worker."""
    lines = [
        f'[model]\npath = "{model_dir}"',
        f"[runtime]\n{runtime}",
        f"[plan]\n{plan}",
    ]
    for i, (name, memory_gb) in enumerate(workers.items()):
        lines.append(
            f'[[workers]]\nname = "{name}"\nhost = "127.0.0.1"\nmemory_gb = {memory_gb}\n'
            f"control_port = {53000 + 2 * i}\ndata_port = {53001 + 2 * i}"
        )
        for key, value in (extra or {}).get(name, {}).items():
            lines.append(f"{key} = {json.dumps(value)}")
    path = tmp_path / "kimi.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def kimi_dir(tmp_path: Path) -> Path:
    """A model directory holding only Kimi-K2-Instruct's config.json."""
    model = tmp_path / "kimi-k2"
    model.mkdir()
    shutil.copy(KIMI_CONFIG, model / "config.json")
    return model


def kimi_cfg(tmp_path, kimi_dir, workers=KIMI, **kw):
    return load_config(write_toml(tmp_path, kimi_dir, workers, **kw))


def plan_cli(*args: str):
    return CliRunner().invoke(main, ["plan", *args])


# --- Kimi-K2 at its real size ---------------------------------------------------------


def assert_shortfall(err: PlanError, memory_gib: dict[str, float], more_than_gib: float) -> None:
    """The error names every worker short by more than `more_than_gib`, and
    says in all what the plan needs beyond 75 % of the workers' memory."""
    msg = str(err)
    short = dict(re.findall(r"worker '(\w+)' is ([\d.]+) GiB short", msg))
    assert set(short) == set(memory_gib) and all(float(v) > more_than_gib for v in short.values())
    missing = float(re.search(r"In all ([\d.]+) GiB is missing", msg).group(1))
    need = sum(s.weight_bytes + s.reserved_bytes for s in err.plan.stages)
    assert missing == pytest.approx((need - 0.75 * sum(memory_gib.values()) * GIB) / GIB, abs=0.05)


def test_kimi_on_512_and_192_gb_fits_with_about_44_layers_on_the_large_mac(tmp_path, kimi_dir):
    plan = make_plan(kimi_cfg(tmp_path, kimi_dir))
    big, small = plan.stages
    print(f"\nkimi plan: {[(s.worker, s.start, s.end) for s in plan.stages]}")
    assert plan.fits and plan.estimated
    assert (big.worker, big.start, small.end) == ("m3-ultra", 0, 61)
    assert big.end == small.start
    assert 43 <= big.num_layers <= 45
    assert 430e9 < plan.total_weight_bytes < 470e9  # ~450 GB at the illustrative 3/6 bits
    assert plan.total_weight_bytes == big.weight_bytes + small.weight_bytes
    assert big.memory_bytes == int(0.75 * 512 * GIB)


def test_kimi_sizes_estimated_per_module_bits(kimi_dir):
    sizes = layer_sizes(kimi_dir)
    assert sizes.estimated and sizes.num_layers == 61
    # 6-bit embeddings: 163840 x 7168 x (6/8 + 2 x 2 bytes / 64-groups)
    assert sizes.embed_bytes == 163840 * 7168 * 6 // 8 + 163840 * 7168 // 64 * 4
    assert sizes.layers[0] < sizes.layers[1] == sizes.layers[60]  # layer 0 dense, rest MoE
    assert sizes.head_bytes == sizes.embed_bytes + 7168 * 2  # lm_head + final norm


def test_two_192_gb_workers_are_refused_saying_who_is_short_and_by_how_much(tmp_path, kimi_dir):
    cfg = kimi_cfg(tmp_path, kimi_dir, {"a": 192, "b": 192})
    with pytest.raises(PlanError) as err:
        make_plan(cfg)
    msg = str(err.value)
    print(f"\n{msg}")
    assert "does not fit" in msg
    assert_shortfall(err.value, {"a": 192, "b": 192}, more_than_gib=50)
    assert "iogpu.wired_limit_mb" in msg

    result = plan_cli("--config", str(cfg.path))
    assert result.exit_code == 1
    assert "worker 'a' is" in result.stderr and "GiB short" in result.stderr
    assert "Traceback" not in result.output


def test_kimi_plan_prints_the_table_and_says_sizes_are_estimated(tmp_path, kimi_dir):
    result = plan_cli("--config", str(write_toml(tmp_path, kimi_dir, KIMI)))
    print(f"\n{result.output}")
    assert result.exit_code == 0, result.output
    assert "estimated from config.json" in result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line}
    assert rows["m3-ultra"][1] == "0-44" and rows["m3-ultra"][2:4] == ["[0,", "45)"]
    assert rows["m2-ultra"][1] == "45-60"
    assert "fits." in result.output


def test_plan_json_matches_the_schema(tmp_path, kimi_dir):
    result = plan_cli("--config", str(write_toml(tmp_path, kimi_dir, KIMI)), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert {"stages", "total_weight_bytes"} <= set(doc)
    assert doc["estimated"] is True
    end = 0
    for stage in doc["stages"]:
        assert set(stage) == STAGE_KEYS
        assert all(isinstance(stage[k], int) for k in STAGE_KEYS - {"worker"})
        assert stage["start"] == end < stage["end"]
        end = stage["end"]
    assert end == 61
    assert doc["total_weight_bytes"] == sum(s["weight_bytes"] for s in doc["stages"])


# --- exact sizes from the safetensors headers -----------------------------------------


def write_checkpoint(path: Path, num_layers: int = 4, *, big: int = 0) -> dict[str, mx.array]:
    """A small checkpoint over two files plus an index; `big` pads layer 0."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"model.embed_tokens.weight": mx.zeros((32, 16), dtype=mx.bfloat16)}
    for i in range(num_layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.self_attn.q_proj.weight"] = mx.zeros((16, 2 + i), dtype=mx.uint32)
        tensors[f"{p}.self_attn.q_proj.scales"] = mx.zeros((16, 1), dtype=mx.bfloat16)
        tensors[f"{p}.input_layernorm.weight"] = mx.ones((16,), dtype=mx.float32)
    if big:
        tensors["model.layers.0.mlp.big.weight"] = mx.zeros((big,), dtype=mx.uint8)
    tensors["model.norm.weight"] = mx.ones((16,), dtype=mx.bfloat16)
    tensors["lm_head.weight"] = mx.zeros((32, 16), dtype=mx.float16)
    names = list(tensors)
    files = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, file_names in files.items():
        mx.save_safetensors(
            str(path / file),
            {n: tensors[n] for n in file_names},
            metadata={"format": "mlx"},
        )
        weight_map.update(dict.fromkeys(file_names, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "llama", "num_hidden_layers": num_layers, "hidden_size": 16}
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def test_exact_sizes_are_the_sum_of_tensor_bytes_per_layer(tmp_path):
    tensors = write_checkpoint(tmp_path / "m")
    sizes = layer_sizes(tmp_path / "m")
    assert not sizes.estimated and not sizes.tied_embeddings
    for i in range(4):
        want = sum(t.nbytes for n, t in tensors.items() if n.startswith(f"model.layers.{i}."))
        assert sizes.layers[i] == want
    assert sizes.embed_bytes == tensors["model.embed_tokens.weight"].nbytes
    assert sizes.head_bytes == tensors["model.norm.weight"].nbytes + tensors["lm_head.weight"].nbytes
    assert sizes.total_bytes == sum(t.nbytes for t in tensors.values())

    index = tensor_index(tmp_path / "m")
    info = index["model.layers.2.self_attn.q_proj.weight"]
    assert (info.file.name, info.dtype, info.shape, info.nbytes) == (
        "model-00002-of-00002.safetensors",
        "U32",
        (16, 4),
        16 * 4 * 4,
    )
    first = stage_tensor_names(index, 0, 2, first=True, last=False)
    last = stage_tensor_names(index, 2, 4, first=False, last=True)
    assert set(first) | set(last) == set(tensors) and not set(first) & set(last)
    assert "model.embed_tokens.weight" in first and {
        "model.norm.weight",
        "lm_head.weight",
    } <= set(last)
    assert {layer_of(n) for n in last} == {2, 3, None}


def test_reading_sizes_reads_headers_not_tensor_data(tmp_path):
    io = Path("/proc/self/io")
    if not io.exists():
        pytest.skip("needs /proc/self/io (Linux) to count bytes read")
    write_checkpoint(tmp_path / "m", big=64 << 20)
    data = sum(f.stat().st_size for f in (tmp_path / "m").glob("*.safetensors"))

    def rchar() -> int:
        return int(re.search(r"rchar: (\d+)", io.read_text()).group(1))

    before = rchar()
    sizes = layer_sizes(tmp_path / "m")
    read = rchar() - before
    assert sizes.layers[0] > 64 << 20
    assert data > 64 << 20
    assert read < 64 * 1024, f"read {read} bytes of a {data}-byte checkpoint"


def test_truncated_corrupt_and_missing_files_are_named(tmp_path):
    write_checkpoint(tmp_path / "m")
    shard = tmp_path / "m" / "model-00002-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: truncated"):
        layer_sizes(tmp_path / "m")

    shard.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: corrupt header"):
        tensor_index(tmp_path / "m")

    shard.unlink()
    with pytest.raises(
        CheckpointError,
        match=r"names model-00002-of-00002.safetensors, which is missing",
    ):
        layer_sizes(tmp_path / "m")

    write_checkpoint(tmp_path / "n")
    index_path = tmp_path / "n" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"puts 'model.layers.9.mlp.weight' in model-00001"):
        tensor_index(tmp_path / "n")

    (tmp_path / "n" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json is missing"):
        layer_sizes(tmp_path / "n")


def test_a_layer_without_tensors_is_reported(tmp_path):
    write_checkpoint(tmp_path / "m", num_layers=4)
    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 6}))
    with pytest.raises(CheckpointError, match=r"no tensors for layer\(s\) 4-5"):
        layer_sizes(tmp_path / "m")


def test_estimate_matches_a_checkpoint_quantized_by_mlx_lm(tmp_path):
    """The config-only estimate of a tiny kimi_k2 equals the bytes mlx-lm writes."""
    from mlx import nn
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.utils import _get_classes, quantize_model

    config = json.loads(KIMI_CONFIG.read_text())
    config.update(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        n_routed_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
    )
    del config["quantization"]
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.update(
        tree_map_with_path(
            lambda p, v: v if "e_score_correction_bias" in p else v.astype(mx.bfloat16),
            model.parameters(),
        )
    )

    def mixed(path: str, module: nn.Module):
        return {"group_size": 32, "bits": 6} if path in ("model.embed_tokens", "lm_head") else True

    model, config = quantize_model(model, config, group_size=32, bits=3, quant_predicate=mixed)
    exact_dir, estimate_dir = tmp_path / "exact", tmp_path / "estimate"
    for d in (exact_dir, estimate_dir):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(exact_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))

    exact, estimate = layer_sizes(exact_dir), layer_sizes(estimate_dir)
    assert estimate.estimated and not exact.estimated
    assert estimate.layers == exact.layers
    assert (estimate.embed_bytes, estimate.head_bytes) == (
        exact.embed_bytes,
        exact.head_bytes,
    )


def test_estimate_refuses_an_unknown_moe_architecture():
    with pytest.raises(CheckpointError, match="cannot estimate sizes of model_type 'mixtral'"):
        estimate_layer_sizes({"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 8})


def test_tied_embeddings_put_embed_tokens_on_the_last_stage_too():
    index = {
        "model.embed_tokens.weight": 1,
        "model.layers.0.x": 1,
        "model.layers.1.x": 1,
        "model.norm.weight": 1,
    }
    assert stage_tensor_names(index, 1, 2, first=False, last=True) == [
        "model.embed_tokens.weight",
        "model.layers.1.x",
        "model.norm.weight",
    ]
    sizes = LayerSizes((10, 10), embed_bytes=5, head_bytes=1, estimated=False, tied_embeddings=True)
    assert sizes.stage_bytes(1, 2, first=False, last=True) == 16
    assert sizes.stage_bytes(0, 2, first=True, last=True) == 26


def test_kv_cache_size_mla_versus_standard_attention():
    kimi = json.loads(KIMI_CONFIG.read_text())
    assert kv_bytes_per_token_per_layer(kimi, 2) == (512 + 64) * 2
    llama = {"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
    assert kv_bytes_per_token_per_layer(llama, 2) == 2 * 8 * 128 * 2
    assert kv_bytes_per_token_per_layer({**llama, "head_dim": 256}, 4) == 2 * 8 * 256 * 4


# --- placement and overrides ----------------------------------------------------------

UNIFORM = LayerSizes((GIB,) * 20, embed_bytes=GIB // 2, head_bytes=GIB // 2, estimated=False)
STANDARD = {"num_attention_heads": 8, "num_key_value_heads": 8, "hidden_size": 1024}


def uniform_plan(tmp_path, workers, **kw):
    cfg = load_config(write_toml(tmp_path, tmp_path / "model", workers, **kw))
    return make_plan(cfg, UNIFORM, model_config=STANDARD)


def spans(plan):
    return [(s.worker, s.start, s.end) for s in plan.stages]


def test_memory_balance_splits_in_proportion_and_reserves_kv_per_layer(tmp_path):
    plan = uniform_plan(
        tmp_path,
        {"a": 32, "b": 16},
        plan="runtime_margin_gb = 1.0",
        runtime="max_context = 1024\nmax_concurrent = 4",
    )
    assert spans(plan) == [("a", 0, 14), ("b", 14, 20)]  # 23 : 11 GiB after margins
    kv_layer = 2 * 8 * 128 * 2 * 1024 * 4
    assert [s.reserved_bytes - s.prefix_cache_bytes for s in plan.stages] == [
        14 * kv_layer + GIB,
        6 * kv_layer + GIB,
    ]
    assert plan.stages[0].weight_bytes == 14 * GIB + GIB // 2
    assert plan == uniform_plan(
        tmp_path,
        {"a": 32, "b": 16},
        plan="runtime_margin_gb = 1.0",
        runtime="max_context = 1024\nmax_concurrent = 4",
    )


def test_the_prefix_cache_budget_is_part_of_each_stage_reserve(tmp_path):
    def plan_with(setting: str):
        return uniform_plan(
            tmp_path,
            {"a": 32, "b": 16},
            plan="runtime_margin_gb = 1.0",
            runtime=f"max_context = 1024\nmax_concurrent = 4\n{setting}",
        )

    auto = plan_with("")
    for s in auto.stages:  # half of what the stage would have free without it
        assert s.prefix_cache_bytes > 0
        assert abs(s.prefix_cache_bytes - (s.free_bytes + s.prefix_cache_bytes) / 2) <= 1
        assert s.load_reserve_bytes == s.reserved_bytes - s.prefix_cache_bytes
    explicit = plan_with("prefix_cache_gb = 4")
    assert [s.prefix_cache_bytes for s in explicit.stages] == [4 * GIB, 4 * GIB]
    assert explicit.fits
    assert [s.prefix_cache_bytes for s in plan_with("prefix_cache_gb = 0").stages] == [0, 0]
    with pytest.raises(PlanError, match="does not fit"):
        plan_with("prefix_cache_gb = 14")  # b may use 12 GiB in all


def test_every_worker_gets_a_layer(tmp_path):
    plan = uniform_plan(tmp_path, {"big": 400, "tiny1": 8, "tiny2": 8})
    assert [s.num_layers for s in plan.stages] == [18, 1, 1]
    with pytest.raises(PlanError, match="3 workers but the model has only 2 layers"):
        cfg = load_config(write_toml(tmp_path, tmp_path, {"a": 64, "b": 64, "c": 64}))
        make_plan(cfg, LayerSizes((1, 1), 1, 1, False), model_config=STANDARD)


def test_max_memory_gb_caps_what_a_worker_is_given(tmp_path):
    free = uniform_plan(tmp_path, {"a": 64, "b": 64})
    capped = uniform_plan(tmp_path, {"a": 64, "b": 64}, extra={"a": {"max_memory_gb": 16}})
    assert spans(free) == [("a", 0, 10), ("b", 10, 20)]
    assert capped.stages[0].memory_bytes == 12 * GIB
    assert capped.stages[0].num_layers < 10
    assert all(s.free_bytes >= 0 for s in capped.stages)


def test_bandwidth_balance_evens_stage_times_within_memory(tmp_path):
    bw = {"a": {"bandwidth_gbs": 800}, "b": {"bandwidth_gbs": 400}}
    by_memory = uniform_plan(tmp_path, {"a": 40, "b": 40}, extra=bw)
    by_bandwidth = uniform_plan(tmp_path, {"a": 40, "b": 40}, extra=bw, plan='balance = "bandwidth"')
    assert spans(by_memory) == [("a", 0, 10), ("b", 10, 20)]
    assert spans(by_bandwidth) == [
        ("a", 0, 14),
        ("b", 14, 20),
    ]  # 14.5 / 800 vs 6.5 / 400
    # Time evens out only as far as memory allows: 16 GB leave "a" 12 - 2 GiB for
    # 0.5 GiB of embeddings and 1.25 GiB (weights + KV) per layer: 7 layers.
    capped = uniform_plan(tmp_path, {"a": 16, "b": 40}, extra=bw, plan='balance = "bandwidth"')
    assert spans(capped)[0] == ("a", 0, 7) and capped.fits
    with pytest.raises(PlanError, match=r"needs bandwidth_gbs > 0 for worker\(s\) 'b'"):
        uniform_plan(
            tmp_path,
            {"a": 40, "b": 40},
            extra={"a": bw["a"]},
            plan='balance = "bandwidth"',
        )


def test_explicit_layers_are_honoured_and_the_rest_filled_in_order(tmp_path):
    plan = uniform_plan(tmp_path, {"a": 64, "b": 64, "c": 64}, extra={"b": {"layers": [3, 5]}})
    assert spans(plan) == [("a", 0, 3), ("b", 3, 5), ("c", 5, 20)]
    plan = uniform_plan(
        tmp_path,
        {"a": 64, "b": 64},
        extra={"a": {"layers": [0, 4]}, "b": {"layers": [4, 20]}},
    )
    assert spans(plan) == [("a", 0, 4), ("b", 4, 20)]


TWO = {"a": 64, "b": 64}


@pytest.mark.parametrize(
    ("workers", "extra", "reason"),
    [
        (
            TWO,
            {"a": {"layers": [0, 8]}, "b": {"layers": [10, 20]}},
            r"layer\(s\) 8-9 belong to no worker",
        ),
        (
            TWO,
            {"a": {"layers": [0, 12]}, "b": {"layers": [10, 20]}},
            r"overlap on layer\(s\) 10-11",
        ),
        (TWO, {"b": {"layers": [10, 21]}}, r"out of range; the model has 20 layers"),
        (TWO, {"a": {"layers": [-1, 5]}}, r"out of range"),
        (TWO, {"a": {"layers": [5, 5]}}, r"is empty; end must be greater than start"),
        (
            TWO,
            {"a": {"layers": [10, 20]}, "b": {"layers": [0, 10]}},
            r"listed after 'a' \[10, 20\] but holds earlier",
        ),
        (
            TWO,
            {"b": {"layers": [0, 10]}},
            r"'a' between the start and worker 'b' \[0, 10\] are left 0",
        ),
        (
            {**TWO, "c": 64},
            {"a": {"layers": [0, 19]}, "c": {"layers": [19, 20]}},
            r"'b' between .* are left 0",
        ),
        (
            TWO,
            {"a": {"layers": [0, 20]}},
            r"'b' between worker 'a' \[0, 20\] and the end are left 0",
        ),
    ],
)
def test_wrong_explicit_layers_are_rejected_with_a_reason(tmp_path, workers, extra, reason):
    with pytest.raises(PlanError, match=reason) as err:
        uniform_plan(tmp_path, workers, extra=extra)
    assert err.value.plan is None


def test_an_explicit_range_too_large_for_its_worker_is_short(tmp_path):
    with pytest.raises(PlanError) as err:
        uniform_plan(tmp_path, {"a": 8, "b": 64}, extra={"a": {"layers": [0, 15]}})
    msg = str(err.value)
    assert re.search(r"worker 'a' is [\d.]+ GiB short: for layers 0-14 \(set in kimi", msg)
    assert "worker 'b'" not in msg and "fewer explicit layers" in msg


def test_cli_reports_bad_configs_and_models_with_exit_2(tmp_path, kimi_dir):
    missing = plan_cli("--config", str(write_toml(tmp_path, tmp_path / "nowhere", KIMI)))
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    assert missing.exc_info[0] is SystemExit
    (tmp_path / "bad.toml").write_text("[model\n")
    bad = plan_cli("--config", str(tmp_path / "bad.toml"))
    assert bad.exit_code == 2 and "not valid TOML" in bad.stderr
    override = plan_cli(
        "--config",
        str(write_toml(tmp_path, kimi_dir, KIMI, extra={"m2-ultra": {"layers": [44, 62]}})),
    )
    assert override.exit_code == 2 and "out of range" in override.stderr


# --- this machine ---------------------------------------------------------------------


def test_available_memory_is_positive_and_at_most_total():
    free = available_memory_bytes()
    assert free > 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total = int(re.search(r"MemTotal:\s+(\d+)", meminfo.read_text()).group(1)) * 1024
        assert free <= total


def test_a_stage_larger_than_free_memory_is_refused(tmp_path):
    stage = uniform_plan(tmp_path, {"a": 64, "b": 64}).stages[1]
    need = stage.weight_bytes + stage.reserved_bytes
    check_stage_memory(stage, available=need)
    with pytest.raises(PlanError, match=r"worker 'b' needs .* but only 1.0 GiB is free now"):
        check_stage_memory(stage, available=GIB)


VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               10000.
Pages active:                            400000.
Pages inactive:                          200000.
Pages speculative:                         3000.
Pages throttled:                              0.
Pages wired down:                        900000.
Pages purgeable:                           5000.
"Translation faults":                 123456789.
"""


def test_macos_free_memory_counts_free_inactive_and_speculative_pages():
    assert vm_stat_available_bytes(VM_STAT) == (10000 + 200000 + 3000) * 16384
