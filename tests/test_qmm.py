"""kimizmq.qmm: quantized matmuls shaped so MLX's CUDA kernels compute them
right. Here on the CPU, where MLX's own kernels are right, the guarded calls
must give exactly what mx.quantized_matmul gives, and a guarded model exactly
what the model gives."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.models.mla import QuantizedMultiLinear
from mlx_lm.models.switch_layers import SwitchGLU

from kimizmq import qmm
from kimizmq.shard import load_shard
from kimizmq.stage import Stage, Step

SHAPES = {
    # x, w, transpose: what a Kimi-K2 stage multiplies
    "one-token (vector kernel)": ((3, 1, 256), (384, 256), True),
    "decode batch of 8": ((8, 1, 256), (384, 256), True),
    "prompt chunk of 37": ((1, 37, 256), (384, 256), True),
    "prompt chunk of 100": ((1, 100, 256), (384, 256), True),
    "embed_q, one request": ((1, 64, 1, 128), (64, 512, 128), True),
    "embed_q, 4 requests": ((4, 64, 1, 128), (64, 512, 128), True),
    "unembed_out, 3 requests of 2 tokens": ((3, 64, 2, 512), (64, 128, 512), True),
    "embed_q of a prompt (broadcast x)": ((1, 1, 37, 512), (64, 512, 128), False),
    "embed_q of 3 prompts (broadcast x)": ((3, 1, 5, 512), (64, 512, 128), False),
}


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("case", list(SHAPES))
def test_guarded_matmul_is_mlx_quantized_matmul_to_the_bit(case, bits):
    xs, ws, transpose = SHAPES[case]
    mx.random.seed(bits)
    x = mx.random.normal(xs)
    wq, scales, biases = mx.quantize(mx.random.normal(ws), 64, bits)
    want = mx.quantized_matmul(x, wq, scales, biases, transpose=transpose, group_size=64, bits=bits)
    got = qmm.quantized_matmul(x, wq, scales, biases, transpose=transpose, group_size=64, bits=bits, mode="affine")
    assert got.shape == want.shape
    assert mx.array_equal(got, want).item()


def test_with_room_is_the_same_array():
    x = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4)
    roomy = qmm.with_room(x, 256)
    assert roomy.shape == x.shape and roomy.dtype == x.dtype
    assert mx.array_equal(roomy, x).item()


def test_guard_swaps_every_quantized_layer_and_changes_no_output(tiny_model):
    plain, guarded = load_shard(tiny_model, 0, 7), load_shard(tiny_model, 0, 7)
    assert not qmm.needed()  # the CPU: load_shard leaves the layers as they are
    kinds = (nn.QuantizedLinear, QuantizedMultiLinear, nn.QuantizedEmbedding, SwitchGLU)
    before = sum(isinstance(m, kinds) for _, m in guarded.model.named_modules())
    assert not any(type(m) in qmm.GUARDED.values() for _, m in guarded.model.named_modules())
    assert qmm.guard(guarded.model) == before > 0
    swapped = {type(m) for _, m in guarded.model.named_modules() if type(m) in qmm.GUARDED.values()}
    assert qmm.GuardedQuantizedLinear in swapped and qmm.GuardedQuantizedMultiLinear in swapped
    assert qmm.LeanSwitchGLU in swapped
    assert not any(type(m) in qmm.GUARDED for _, m in guarded.model.named_modules())

    # a prompt pass, then decode steps of three requests batched (left-padded)
    prompts = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43, 38], [2, 7]]
    outs = []
    for shard in (plain, guarded):
        logits = [shard(mx.array([p]), shard.make_cache()) for p in prompts]
        caches = [BatchKVCache([9 - len(p) for p in prompts]) for _ in range(7)]
        width = max(len(p) for p in prompts)
        x = mx.array([[0] * (width - len(p)) + p for p in prompts])
        steps = [shard(x, caches)]
        for t in range(3):
            steps.append(shard.decode(mx.array([[t + 1]] * 3), caches))
        mx.eval(logits, steps)
        outs.append((logits, steps))
    for a, b in zip(outs[0][0] + outs[0][1], outs[1][0] + outs[1][1]):
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_lean_experts_compute_mlx_lm_experts_to_the_bit(tiny_model, rows):
    """One decode token per request (the lean path, fewer than 64 (row, expert)
    pairs) and a prompt chunk (mlx-lm's sorted path) through every MoE layer."""
    plain, lean = load_shard(tiny_model, 0, 7), load_shard(tiny_model, 0, 7)
    qmm.guard(lean.model)
    hidden = plain.config["hidden_size"]
    for shape in ((rows, 1, hidden), (1, 5 * rows, hidden)):
        x = mx.random.normal(shape, key=mx.random.key(rows)).astype(plain.dtype)
        pairs = [
            (a.mlp, b.mlp)
            for a, b in zip(plain.layers, lean.layers)
            if isinstance(getattr(b.mlp, "switch_mlp", None), qmm.LeanSwitchGLU)
        ]
        assert pairs
        for a, b in pairs:
            assert mx.array_equal(a(x), b(x)).item()


def test_a_guarded_stage_samples_what_the_plain_one_does(tiny_model):
    """Through Stage: four requests batched, greedy, with logprobs."""
    results = []
    for guard in (False, True):
        shard = load_shard(tiny_model, 0, 7)
        if guard:
            qmm.guard(shard.model)
        stage = Stage(shard, max_requests=8, max_context=256, compiled_decode=True)
        prompts = {f"r{i}": [(7 * i + j) % 200 + 1 for j in range(5 + 3 * i)] for i in range(4)}
        tokens = {r: [] for r in prompts}
        for r, p in prompts.items():
            tokens[r].append(stage.forward_many([Step(r, 0, mx.array([p]), True, {"logprobs": 2})])[0])
        for k in range(4):
            out = stage.forward_many(
                [
                    Step(r, len(p) + k, mx.array([[tokens[r][-1].token]]), True, {"logprobs": 2})
                    for r, p in prompts.items()
                ]
            )
            for r, o in zip(prompts, out):
                tokens[r].append(o)
        results.append({r: [(o.token, o.logprob, o.top_logprobs) for o in v] for r, v in tokens.items()})
    assert results[0] == results[1]


def test_guarded_embedding_head_and_biased_linear_are_unchanged():
    """The tied head (QuantizedEmbedding.as_linear) and a linear layer with a
    bias, which a Kimi-K2 checkpoint has not but another model may."""
    mx.random.seed(1)
    model = nn.Module()
    model.embed = nn.QuantizedEmbedding.from_embedding(nn.Embedding(300, 128), group_size=64, bits=4)
    model.proj = nn.QuantizedLinear.from_linear(nn.Linear(128, 256, bias=True), group_size=64, bits=4)
    h = mx.random.normal((2, 9, 128))
    want = (model.embed.as_linear(h), model.proj(h))
    assert qmm.guard(model) == 2
    assert type(model.embed) is qmm.GuardedQuantizedEmbedding and type(model.proj) is qmm.GuardedQuantizedLinear
    got = (model.embed.as_linear(h), model.proj(h))
    for a, b in zip(want, got):
        assert mx.array_equal(a, b).item()


def test_load_shard_guards_where_needed(tiny_model, monkeypatch):
    """load_shard swaps the layers exactly when qmm.needed() says so (CUDA);
    forced here on the CPU, the guarded shard computes what the plain one does."""
    plain = load_shard(tiny_model, 4, 7)
    monkeypatch.setattr(qmm, "needed", lambda: True)
    guarded = load_shard(tiny_model, 4, 7)
    assert not any(type(m) in qmm.GUARDED.values() for _, m in plain.model.named_modules())
    assert any(type(m) is qmm.GuardedQuantizedMultiLinear for _, m in guarded.model.named_modules())
    assert not any(type(m) in qmm.GUARDED for _, m in guarded.model.named_modules())
    h = mx.random.normal((2, 6, plain.model.args.hidden_size))
    a, b = plain(h, plain.make_cache()), guarded(h, guarded.make_cache())
    assert mx.array_equal(a, b).item()
