"""The tiny test model has Kimi-K2's layout, loads with plain mlx-lm, is mixed-bit
(one width only inferable from tensor shapes), decodes to varied tokens, and is
byte-for-byte reproducible."""

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from kimizmq.testmodel import BASE_VOCAB, STAMP_NAME, make_test_model
from kimizmq.tokenizer import load_tokenizer

REFERENCE_CONFIG = Path(__file__).resolve().parent.parent / "etc" / "reference"  # a copy of ../shared/reference


def file_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def loaded(tiny_model):
    before = (tiny_model / "config.json").read_bytes()
    model, config = load_model(tiny_model)
    return model, config, before


def test_config_has_kimi_k2_architecture(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "kimi_k2"
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["num_hidden_layers"] == 7
    assert config["first_k_dense_replace"] == 1
    assert (config["topk_method"], config["scoring_func"]) == ("noaux_tc", "sigmoid")
    assert config["n_shared_experts"] == 1
    assert config["num_experts_per_tok"] < config["n_routed_experts"]
    assert config["rope_scaling"]["type"] == "yarn"
    assert config["torch_dtype"] == "bfloat16"
    assert config["vocab_size"] == BASE_VOCAB + 256
    reference = REFERENCE_CONFIG / "kimi-k2-instruct.config.json"
    assert set(json.loads(reference.read_text())) <= set(config)


def test_weights_are_sharded_with_an_index(tiny_model):
    shards = sorted(tiny_model.glob("model-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((tiny_model / "model.safetensors.index.json").read_text())
    stored = {k: s.name for s in shards for k in mx.load(str(s))}
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == sum(v.nbytes for s in shards for v in mx.load(str(s)).values())


def test_tensors_are_named_as_mlx_lm_names_them(tiny_model):
    names = json.loads((tiny_model / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert "model.layers.0.mlp.switch_mlp.gate_proj.weight" not in names
    for layer in range(1, 7):
        prefix = f"model.layers.{layer}"
        assert f"{prefix}.mlp.switch_mlp.down_proj.scales" in names
        assert f"{prefix}.mlp.shared_experts.up_proj.weight" in names
        assert f"{prefix}.mlp.gate.e_score_correction_bias" in names
        assert f"{prefix}.self_attn.embed_q.weight" in names
        assert f"{prefix}.self_attn.unembed_out.weight" in names
        assert f"{prefix}.self_attn.kv_a_proj_with_mqa.weight" in names
    assert not any("kv_b_proj" in n or ".experts.0." in n for n in names)


def test_unquantized_floats_are_bfloat16(tiny_model):
    weights = {}
    for shard in tiny_model.glob("model-*.safetensors"):
        weights.update(mx.load(str(shard)))
    assert weights["model.norm.weight"].dtype == mx.bfloat16
    assert weights["model.layers.1.mlp.gate.weight"].dtype == mx.bfloat16
    assert weights["lm_head.scales"].dtype == mx.bfloat16
    # mlx_lm.convert leaves the router bias in float32 (Model.cast_predicate).
    assert weights["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32


def test_loads_with_plain_mlx_lm_and_config_untouched(tiny_model, loaded):
    _, _, before = loaded
    assert (tiny_model / "config.json").read_bytes() == before
    assert json.loads(before)["quantization"] == {
        "group_size": 64,
        "bits": 4,
        "model.embed_tokens": {"group_size": 64, "bits": 3},
        "lm_head": {"group_size": 64, "bits": 6},
    }


def test_bits_are_mixed_and_some_only_inferable(loaded):
    model, config, _ = loaded
    bits = {name: m.bits for name, m in model.named_modules() if hasattr(m, "bits")}
    assert bits["model.embed_tokens"] == 3
    assert bits["lm_head"] == 6
    assert bits["model.layers.1.self_attn.q_b_proj"] == 4
    assert bits["model.layers.1.self_attn.embed_q"] == 4
    assert bits["model.layers.1.mlp.switch_mlp.up_proj"] == 4
    assert bits["model.layers.1.self_attn.o_proj"] == 5
    assert bits["model.layers.1.mlp.shared_experts.down_proj"] == 8
    named = {v["bits"] for v in config["quantization"].values() if isinstance(v, dict)}
    named.add(config["quantization"]["bits"])
    assert {5, 8}.isdisjoint(named)
    assert set(bits.values()) == {3, 4, 5, 6, 8}


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    tokens, logprobs = [], []
    for _ in range(n):
        lp = logits - mx.logsumexp(logits)
        token = int(mx.argmax(lp))
        tokens.append(token)
        logprobs.append(float(lp[token]))
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return tokens, logprobs


def test_greedy_decoding_is_varied(tiny_model, loaded):
    model, _, _ = loaded
    model.set_dtype(mx.float32)
    tok = load_tokenizer(tiny_model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me a story about a fox."}])
    tokens, logprobs = greedy(model, prompt, 64)
    assert len(set(tokens)) >= 20
    assert sum(logprobs) / len(logprobs) < -0.3
    assert not tok.eos_token_ids & set(tokens)


def test_same_seed_gives_identical_bytes(tiny_model, tmp_path):
    again = make_test_model(tmp_path / "again", seed=0, num_layers=7)
    assert file_bytes(again) == file_bytes(tiny_model)


def test_existing_model_is_reused_and_other_parameters_replace_it(tiny_model, tmp_path):
    path = make_test_model(tmp_path / "m", seed=1, num_layers=7)
    stamp_time = (path / STAMP_NAME).stat().st_mtime_ns
    assert make_test_model(path, seed=1, num_layers=7) == path
    assert (path / STAMP_NAME).stat().st_mtime_ns == stamp_time
    seed1 = file_bytes(path)
    seed0 = file_bytes(tiny_model)
    assert seed1["model-00002-of-00004.safetensors"] != seed0["model-00002-of-00004.safetensors"]
    assert seed1["tiktoken.model"] == seed0["tiktoken.model"]
    make_test_model(path, seed=0, num_layers=7)
    assert file_bytes(path) == seed0
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_refuses_to_overwrite_other_directories(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_test_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
