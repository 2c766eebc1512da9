"""Every Kimi layout as published loads unedited and passes the oracle: over
1, 2 and 3 real worker processes the greedy tokens equal single-process
mlx-lm's on the same files, logprobs within 1e-4.

Layouts (kimizmq/testlayouts.py): Kimi-K2-Thinking's compressed-tensors int4,
Kimi-K2.5's nested `kimi_k25` with a vision tower, Kimi K3's hybrid linear /
MLA attention with attention residuals and MXFP4 experts."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import jinja2
import jinja2.ext
import mlx.core as mx
import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kimizmq.checkpoint import stage_tensor_names, tensor_index
from kimizmq.local import LocalCluster, write_config
from kimizmq.shard import load_shard
from kimizmq.stage import Stage, StageError, Step
from kimizmq.testlayouts import (
    INT4_QUANTIZATION_CONFIG,
    K3_SPECIAL_TOKEN_OFFSETS,
    MXFP4_QUANTIZATION_CONFIG,
    make_layout_model,
)
from kimizmq.tokenizer import load_tokenizer
from tests.conftest import REPO
from tests.support import complete_ids, greedy_body, log_events, open_stream, post_json, wait_until, worker_stats
from tests.test_pipeline import reference_greedy

N_TOKENS = 24
PROMPT = [5, 17, 99, 230, 41, 7, 300, 12, 64, 8, 150, 77, 3, 201, 45, 11, 90, 33, 120, 6, 250, 19, 88, 140]
K3_LAYERS = 14  # two attention-residual blocks of 12; MLA at 0-based 3, 7, 11, 13


REFERENCE = REPO.parent / "shared" / "reference"  # ../shared/reference: real Kimi metadata
K2_THINKING_TEMPLATE = REFERENCE / "kimi-k2-thinking" / "chat_template.jinja"
K3_TEMPLATE = REFERENCE / "kimi-k3" / "chat_template.llama-cpp-port.jinja"


def _published(template: Path) -> Path | None:
    return template if template.is_file() else None


@pytest.fixture(scope="module")
def int4_model():
    """K2-Thinking's layout, with its chat template where ../shared/reference has it."""
    template = _published(K2_THINKING_TEMPLATE)
    name = f"test-layout-int4-layers7{'-template' if template else ''}"
    return make_layout_model(REPO / "models" / name, "int4", num_layers=7, chat_template=template)


@pytest.fixture(scope="module")
def kvb_model():
    return make_layout_model(REPO / "models" / "test-layout-kvb-layers7", "kvb", num_layers=7)


@pytest.fixture(scope="module")
def fp8_model():
    return make_layout_model(REPO / "models" / "test-layout-fp8-layers7", "fp8", num_layers=7)


@pytest.fixture(scope="module")
def k25_model():
    return make_layout_model(REPO / "models" / "test-layout-k25-layers7", "k25", num_layers=7)


@pytest.fixture(scope="module")
def k3_model():
    """K3's layout, with (the llama.cpp port of) its chat template where ../shared/reference has it."""
    template = _published(K3_TEMPLATE)
    name = f"test-layout-k3-layers{K3_LAYERS}{'-template' if template else ''}"
    return make_layout_model(REPO / "models" / name, "k3", num_layers=K3_LAYERS, chat_template=template)


def _oracle(model, tmp_path, n_workers, layers):
    ref_tokens, ref_logprobs = reference_greedy(model, PROMPT, N_TOKENS)
    assert len(set(ref_tokens)) >= 6, "the test model must give varied tokens for this oracle to bite"
    cfg = write_config(tmp_path / "kimi.toml", model, n_workers, layers=layers)
    with LocalCluster(cfg) as cluster:
        health = cluster.health()[1]
        if layers:
            assert [(s["start"], s["end"]) for s in health["stages"]] == layers
        lp = complete_ids(cluster.api, PROMPT, N_TOKENS)["logprobs"]
    assert lp["token_ids"] == ref_tokens
    np.testing.assert_allclose(lp["token_logprobs"], ref_logprobs, rtol=1e-4, atol=1e-6)


SPLITS_7 = [(1, None), (2, None), (3, [(0, 1), (1, 5), (5, 7)])]


@pytest.mark.parametrize("n_workers,layers", SPLITS_7, ids=["1-stage", "2-stages", "3-stages"])
def test_k2_thinking_int4_compressed_tensors_equals_mlx_lm(int4_model, tmp_path, n_workers, layers):
    _oracle(int4_model, tmp_path, n_workers, layers)


def test_older_mlx_conversion_with_quantized_kv_b_proj_equals_mlx_lm(kvb_model, tmp_path):
    _oracle(kvb_model, tmp_path, 2, None)


def test_fp8_original_dequantized_on_load_equals_mlx_lm(fp8_model, tmp_path):
    _oracle(fp8_model, tmp_path, 2, None)


@pytest.mark.parametrize("n_workers,layers", SPLITS_7, ids=["1-stage", "2-stages", "3-stages"])
def test_k25_nested_text_model_equals_mlx_lm(k25_model, tmp_path, n_workers, layers):
    _oracle(k25_model, tmp_path, n_workers, layers)


@pytest.mark.parametrize(
    "n_workers,layers",
    [
        (1, None),
        # after MLA layer 3, before linear layer 4, inside the first residual block
        (2, [(0, 4), (4, K3_LAYERS)]),
        # and after linear layer 12, before the last (MLA) layer, inside the second block
        (3, [(0, 4), (4, 13), (13, K3_LAYERS)]),
    ],
    ids=["1-stage", "2-stages-inside-a-block", "3-stages-inside-both-blocks"],
)
def test_k3_hybrid_attention_residuals_equal_mlx_lm(k3_model, tmp_path, n_workers, layers):
    _oracle(k3_model, tmp_path, n_workers, layers)


def test_k3_concurrent_requests_batch_recurrent_states_exactly(k3_model, tmp_path):
    """Requests decoding together at a K3 stage run as one batched pass over
    batched KV caches and ArraysCache states (kept between steps), and each
    gets exactly its own tokens; every state is freed at the end."""
    prompts = [PROMPT[i : i + 6 + i] for i in range(4)]
    refs = [reference_greedy(k3_model, p, 16)[0] for p in prompts]
    cfg = write_config(tmp_path / "kimi.toml", k3_model, 2, layers=[(0, 4), (4, K3_LAYERS)])
    with LocalCluster(cfg) as cluster:
        before = worker_stats(cluster.cfg)
        got: dict[int, list[int]] = {}

        def run(i: int) -> None:
            got[i] = complete_ids(cluster.api, prompts[i], 16)["logprobs"]["token_ids"]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        after = worker_stats(cluster.cfg)
    assert [got.get(i) for i in range(len(prompts))] == refs
    batched = {n: s["batched_forwards"] - before[n]["batched_forwards"] for n, s in after.items()}
    assert any(b > 0 for b in batched.values()), f"no step was batched: {batched}"
    assert all(s["active_requests"] == [] and s["cache_bytes"] == 0 for s in after.values()), after


def test_k3_recurrent_states_start_a_later_turn_only_at_their_whole_length(k3_model, tmp_path):
    """K3's linear-attention layers hold a recurrent state that cannot be cut
    shorter: a turn that extends the whole conversation starts from the prefix
    cache; one that diverges inside it runs from 0; both equal mlx-lm."""

    def turn(api: str, prompt: list[int]) -> tuple[list[int], list[float], int]:
        status, out = post_json(api, "/v1/completions", greedy_body(prompt, 8))
        assert status == 200, out
        lp = out["choices"][0]["logprobs"]
        return lp["token_ids"], lp["token_logprobs"], out["usage"]["prompt_tokens_details"]["cached_tokens"]

    cfg = write_config(tmp_path / "kimi.toml", k3_model, 2, layers=[(0, 4), (4, K3_LAYERS)])
    with LocalCluster(cfg) as cluster:
        first, _, _ = turn(cluster.api, PROMPT)
        second = PROMPT + first + PROMPT[:9]
        tokens, logprobs, cached = turn(cluster.api, second)
        assert cached == len(PROMPT) + len(first) - 1
        diverging = PROMPT[:10] + [7, 8, 9]
        tokens2, logprobs2, cached2 = turn(cluster.api, diverging)
        assert cached2 == 0
    for prompt, got, lps in ((second, tokens, logprobs), (diverging, tokens2, logprobs2)):
        ref_tokens, ref_logprobs = reference_greedy(k3_model, prompt, 8)
        assert got == ref_tokens
        np.testing.assert_allclose(lps, ref_logprobs, rtol=1e-4, atol=1e-5)


def test_k3_stage_refuses_missing_or_misshapen_residual_blocks(k3_model):
    """A K3 stage inside a residual block needs the blocks beside the hidden
    state, exactly (blocks begun before its first layer, 1, L, hidden); a
    message without them, or with the wrong count, is refused by name and
    opens no request."""
    stage = Stage(load_shard(k3_model, 4, 13), max_requests=4, max_context=256)
    h = mx.zeros((1, 3, 128))
    bad = {
        "missing": (),
        "two blocks": (mx.zeros((2, 1, 3, 128)),),
        "other length": (mx.zeros((1, 1, 2, 128)),),
        "ints": (mx.zeros((1, 1, 3, 128), dtype=mx.int32),),
    }
    for what, extra in bad.items():
        (result,) = stage.forward_many([Step(what, 0, h, False, {}, extra)])
        assert isinstance(result, StageError) and ("tensor" in str(result) or "blocks" in str(result)), (what, result)
    assert stage.requests == {}
    (ok,) = stage.forward_many([Step("r", 0, h, False, {}, (mx.zeros((1, 1, 3, 128)),))])
    assert ok.activations.shape == (1, 3, 128) and ok.extra[0].shape == (2, 1, 3, 128)


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("fixture", ["k25_model", "k3_model"])
def test_vision_weights_are_never_read(fixture, request):
    """The whole text model loaded on one stage reads its own bytes and not
    one of the vision tower's (a file of its own, as the published K3 keeps it)."""
    model = request.getfixturevalue(fixture)
    index = tensor_index(model)
    vision = sum(i.nbytes for n, i in index.items() if n.startswith(("vision_tower.", "mm_projector.")))
    n_layers = K3_LAYERS if fixture == "k3_model" else 7
    text = sum(index[n].nbytes for n in stage_tensor_names(index, 0, n_layers, first=True, last=True))
    assert vision > 0.2 * text, "reading the vision file must show past the 10 % slack below"

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

    before = rchar()
    load_shard(model, 0, n_layers)
    assert rchar() - before <= 1.1 * text


@pytest.mark.skipif(not K3_TEMPLATE.is_file(), reason=f"needs {K3_TEMPLATE} (../shared/reference)")
def test_k3_chat_renders_its_template_with_its_special_tokens(k3_model):
    """The K3 model's chat prompt is its template's text, byte for byte, with
    K3's markers as their special ids (<|open|> = first special + 3, ...),
    and its end of message stops generation."""
    tok = load_tokenizer(k3_model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say <|sep|> café"}]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    want = env.from_string(K3_TEMPLATE.read_text()).render(messages=messages, add_generation_prompt=True)
    ids = tok.apply_chat_template(messages)
    assert tok.decode(ids) == want
    first = 1024  # the tiny vocabulary's first special id
    for token in ("<|open|>", "<|sep|>", "<|close|>", "<|end_of_msg|>"):
        assert tok.encode(token, allow_special=True) == [first + K3_SPECIAL_TOKEN_OFFSETS[token]]
    assert ids.count(first + K3_SPECIAL_TOKEN_OFFSETS["<|sep|>"]) == want.count("<|sep|>") - 1  # one is user text
    assert first + K3_SPECIAL_TOKEN_OFFSETS["<|end_of_msg|>"] in tok.eos_token_ids


@pytest.mark.skipif(not K2_THINKING_TEMPLATE.is_file(), reason=f"needs {K2_THINKING_TEMPLATE}")
def test_k2_thinking_chat_uses_its_published_template(int4_model):
    tok = load_tokenizer(int4_model)
    text = tok.decode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert (int4_model / "chat_template.jinja").read_bytes() == K2_THINKING_TEMPLATE.read_bytes()
    assert text.endswith("<|im_assistant|>assistant<|im_middle|>") and "<|im_user|>user<|im_middle|>Hi" in text


def test_layouts_are_written_as_published(fp8_model, int4_model, k3_model):
    """The tiny models hold what the published files hold: Hugging Face names
    and dtypes (FP8 e4m3 Linears with block scales, per-expert int32-packed
    int4 with bf16 scales, K3's
    byte-packed MXFP4 experts, kv_b_proj, torch-shaped convolutions), the
    published quantization blocks verbatim, the vision tower in its own file."""
    reference = REPO / "etc" / "reference"
    k25 = json.loads((reference / "kimi-k2.5.config.json").read_text())
    k3 = json.loads((reference / "kimi-k3.config.json").read_text())
    assert k25["text_config"]["quantization_config"] == INT4_QUANTIZATION_CONFIG
    assert k3["text_config"]["quantization_config"] == MXFP4_QUANTIZATION_CONFIG

    fp8 = tensor_index(fp8_model)
    scaled = [n.removesuffix("_scale_inv") for n in fp8 if n.endswith(".weight_scale_inv")]
    assert len(scaled) > 7 * 5 and {fp8[n].dtype for n in scaled} == {"F8_E4M3"}
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in scaled
    assert fp8["model.layers.1.mlp.gate.weight"].dtype == fp8["lm_head.weight"].dtype == "BF16"

    int4 = tensor_index(int4_model)
    expert = "model.layers.1.mlp.experts.0.down_proj"
    assert [int4[f"{expert}.{k}"].dtype for k in ("weight_packed", "weight_scale", "weight_shape")] == [
        "I32",
        "BF16",
        "I32",
    ]
    assert int4["model.layers.1.self_attn.kv_b_proj.weight"].dtype == "BF16"
    assert not [n for n in int4 if "switch_mlp" in n or "embed_q" in n or n.endswith(".scales")]

    index = tensor_index(k3_model)
    w1 = index["language_model.model.layers.1.block_sparse_moe.experts.0.w1.weight_packed"]
    assert (w1.dtype, w1.shape) == ("U8", (64, 32))  # two 4-bit values a byte
    assert index["language_model.model.layers.1.block_sparse_moe.experts.0.w1.weight_scale"].shape == (64, 2)
    assert index["language_model.model.layers.0.self_attn.q_conv1d.weight"].shape == (64, 1, 4)
    assert "language_model.model.layers.3.self_attn.kv_b_proj.weight" in index
    assert "language_model.model.output_attn_res.proj_weight" in index
    assert {index[n].file.name for n in index if n.startswith("vision_tower.")} == {"model-vision.safetensors"}


def test_k3_request_replayed_after_a_worker_loss_completes_identically(k3_model, tmp_path):
    """The worker holding K3's later layers is killed mid-stream and
    restarted: the request is replayed from its tokens, every recurrent state
    and KV cache rebuilt, and the stream ends with mlx-lm's tokens."""
    n = 40
    ref_tokens, _ = reference_greedy(k3_model, PROMPT, n)
    runtime = {"heartbeat_interval_s": 0.2, "liveness_timeout_s": 1.0, "prefill_chunk": 4, "stream_interval_ms": 0}
    cfg = write_config(tmp_path / "kimi.toml", k3_model, 2, layers=[(0, 4), (4, K3_LAYERS)], runtime=runtime)
    with LocalCluster(cfg) as cluster:
        victim = cluster.workers["w1"]
        ids: list[int] = []
        with open_stream(cluster.api, greedy_body(PROMPT, n)) as stream:
            for line in stream:
                if not line.startswith(b"data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                ids += (choice.get("logprobs") or {}).get("token_ids", [])
                if len(ids) == 8 and victim.poll() is None:
                    os.kill(victim.pid, signal.SIGKILL)
                    victim.wait()
                    wait_until(lambda: cluster.health()[1].get("status") == "degraded", "the coordinator to notice")
                    cluster.start_worker("w1")
        replays = log_events(cluster, "coordinator", "request_replayed")
    assert ids == ref_tokens
    assert len(replays) == 1
