"""Sizing every published Kimi layout: what each layer takes once mlx-lm has
loaded it (MXFP4 and int4 group sizes, FP8 dequantized), the per-request
state a hybrid model reserves, and `kimi plan` for Kimi K3 at its real size."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from kimizmq.checkpoint import read_config
from kimizmq.cli import main
from kimizmq.config import load_config
from kimizmq.plan import GIB, PlanError, make_plan
from kimizmq.shard import load_shard
from kimizmq.sizes import cache_bytes_per_layer, estimate_layer_sizes, layer_sizes, recurrent_state_bytes
from kimizmq.stage import Stage, Step
from tests.test_checkpoints import fp8_model, int4_model, k3_model, k25_model  # noqa: F401 - fixtures
from tests.test_plan import assert_shortfall, write_toml

REFERENCE = Path(__file__).resolve().parents[1] / "etc" / "reference"
K3_TOTAL_SIZE = 1_560_860_324_864  # metadata.total_size of K3's safetensors index, vision tower included


def cluster(tmp_path: Path, model: Path, macs: int) -> Path:
    """kimi.toml for `macs` 512 GB Macs, in a folder of its own."""
    folder = tmp_path / f"{macs}-macs"
    folder.mkdir()
    return write_toml(folder, model, {f"mac{i + 1}": 512 for i in range(macs)})


def model_dir(tmp_path: Path, config_file: str) -> Path:
    """A directory holding only a published config.json."""
    d = tmp_path / config_file.removesuffix(".config.json")
    d.mkdir()
    shutil.copy(REFERENCE / config_file, d / "config.json")
    return d


@pytest.mark.parametrize("fixture", ["fp8_model", "int4_model", "k25_model", "k3_model"])
def test_sizes_equal_what_mlx_lm_holds_per_layer(fixture, request):
    """For each published layout, the bytes the planner counts per layer, from
    the safetensors headers and from config.json alone, are the bytes of the
    parameters mlx-lm's own load_model holds for that layer: int4 gains its
    biases, MXFP4 keeps one scale byte per 32 values, FP8 becomes bfloat16,
    kv_b_proj is split."""
    model = request.getfixturevalue(fixture)
    loaded, _ = load_model(model, lazy=True)
    lm = loaded.get("language_model", loaded)
    held = [sum(v.nbytes for _, v in tree_flatten(layer.parameters())) for layer in lm.model.layers]
    headers = layer_sizes(model)
    assert list(headers.layers) == held
    assert list(estimate_layer_sizes(read_config(model)).layers) == held
    assert headers.embed_bytes == lm.model.embed_tokens.weight.nbytes


def test_k3_at_its_real_size_needs_four_512_gb_macs(tmp_path):
    """Kimi K3's published config.json (MXFP4 experts): sized within 0.1 % of
    the published checkpoint (whose total also counts the vision tower no
    stage loads); two 512 GB Macs are refused saying how short each is and
    how many Macs it needs; four get a plan that fits."""
    k3 = model_dir(tmp_path, "kimi-k3.config.json")
    sizes = layer_sizes(k3)
    assert sizes.total_bytes == pytest.approx(K3_TOTAL_SIZE, rel=1e-3)
    assert sizes.total_bytes < K3_TOTAL_SIZE

    two = load_config(cluster(tmp_path, k3, 2))
    with pytest.raises(PlanError) as err:
        make_plan(two)
    msg = str(err.value)
    assert_shortfall(err.value, {"mac1": 512, "mac2": 512}, more_than_gib=300)
    assert "needs 4 workers like 'mac1' (512 GiB, 75% usable = 384.0 GiB)" in msg

    with pytest.raises(PlanError):
        make_plan(load_config(cluster(tmp_path, k3, 3)))
    four = make_plan(load_config(cluster(tmp_path, k3, 4)))
    assert four.fits and four.stages[-1].end == 93
    assert all(s.weight_bytes + s.reserved_bytes <= 0.75 * 512 * GIB for s in four.stages)

    runner = CliRunner()
    refused = runner.invoke(main, ["plan", "--config", str(two.path)])
    assert refused.exit_code == 1 and "needs 4 workers like 'mac1'" in refused.stderr
    fits = runner.invoke(main, ["plan", "--config", str(tmp_path / "4-macs" / "kimi.toml")])
    assert fits.exit_code == 0, fits.output
    assert "recurrent state on 69 linear-attention layers" in fits.output
    assert "KV cache on 24 attention layers" in fits.output


def test_k3_reserves_kv_on_mla_layers_and_fixed_state_on_linear_ones(tmp_path):
    """8192 tokens x 8 requests: an MLA layer reserves (512 + 64) values per
    token, a Kimi Delta Attention layer its recurrent state once per request,
    whatever the context."""
    config = read_config(model_dir(tmp_path, "kimi-k3.config.json"))
    per_layer = cache_bytes_per_layer(config, 93, 2, 8192, 8)
    state = (4 - 1) * 3 * 96 * 128 * 2 + 96 * 128 * 128 * 4
    assert recurrent_state_bytes(config, 2) == state
    assert per_layer[3] == per_layer[91] == per_layer[92] == (512 + 64) * 2 * 8192 * 8  # 1-based 4, 92, 93: MLA
    assert per_layer[0] == per_layer[90] == state * 8  # 1-based 1 and 91: KDA
    assert cache_bytes_per_layer(config, 93, 2, 65536, 8)[0] == state * 8


def test_recurrent_state_size_is_what_a_k3_stage_holds(k3_model):  # noqa: F811
    """The planner's recurrent state per request and layer is exactly what a
    K3 stage's ArraysCache holds after a prompt (float32 activations here)."""
    shard = load_shard(k3_model, 0, 3)  # linear-attention layers only
    stage = Stage(shard, max_requests=2, max_context=64)
    stage.forward_many([Step("r", 0, mx.array([[5, 6, 7, 8, 9]], dtype=mx.int32), False, {})])
    assert stage.cache_bytes() == 3 * recurrent_state_bytes(read_config(k3_model), 4)


def test_fp8_original_is_sized_as_mlx_lm_holds_it_in_bfloat16(tmp_path):
    """Kimi-K2-Instruct as Moonshot publishes it (FP8, block 128): mlx-lm
    dequantizes it to bfloat16, so it is planned at about 2 TB, twice the
    958.5 GiB on disk, and `kimi plan` says so and how to shrink it."""
    fp8 = model_dir(tmp_path, "kimi-k2-instruct-fp8.config.json")
    sizes = layer_sizes(fp8)
    assert 2.0e12 < sizes.total_bytes < 2.1e12
    assert sizes.total_bytes == pytest.approx(2 * 958.5 * GIB, rel=0.01)
    result = CliRunner().invoke(main, ["plan", "--config", str(write_toml(tmp_path, fp8, {"a": 512, "b": 512}))])
    assert result.exit_code == 1
    assert "FP8 weights counted at their bfloat16 size" in result.output
    assert "mlx_lm.convert -q" in result.output


def test_k25_and_nvfp4_k26_count_their_group_sizes_exactly(tmp_path):
    """Kimi-K2.5 (int4 group 32, nested text_config) and NVIDIA's NVFP4 K2.6
    (group 16, hf_quant_config.json) against the FP8 original of the same
    architecture, which mlx-lm holds in bfloat16: a MoE layer differs only
    in its routed experts, 2 bytes a weight there against 4 bits + a bf16
    scale and bias per 32 (int4) or 4 bits + a byte per 16 (NVFP4)."""
    bf16 = layer_sizes(model_dir(tmp_path, "kimi-k2-instruct-fp8.config.json"))
    k25 = layer_sizes(model_dir(tmp_path, "kimi-k2.5.config.json"))
    nvfp4 = model_dir(tmp_path, "nvidia-Kimi-K2.6-NVFP4.config.json")
    shutil.copy(REFERENCE / "nvidia-Kimi-K2.6-NVFP4.hf_quant_config.json", nvfp4 / "hf_quant_config.json")
    k26 = layer_sizes(nvfp4)
    assert k25.num_layers == k26.num_layers == 61
    weights = 384 * 3 * 7168 * 2048  # routed-expert weights in one MoE layer
    assert bf16.layers[1] - k25.layers[1] == weights * 2 - (weights // 2 + weights // 32 * 4)
    assert bf16.layers[1] - k26.layers[1] == weights * 2 - (weights // 2 + weights // 16)
    assert bf16.layers[0] == k25.layers[0] == k26.layers[0]  # the dense layer stays bfloat16
    assert bf16.embed_bytes == k25.embed_bytes == k26.embed_bytes
