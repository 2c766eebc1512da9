"""Shard loading: a stage reads only its own layers, infers unlisted bit widths,
and the chained stages compute what the whole model computes."""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from mlx_lm.utils import _get_classes, load_model

from kimizmq.checkpoint import stage_tensor_names, tensor_index
from kimizmq.shard import Shard, ShardError, compiled_decode, load_shard


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("start,end", [(0, 2), (2, 5), (5, 7)])
def test_worker_reads_only_its_layers_bytes(tiny_model, start, end):
    index = tensor_index(tiny_model)
    n_layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    names = stage_tensor_names(index, start, end, first=start == 0, last=end == n_layers)
    shard_bytes = sum(index[n].nbytes for n in names)
    all_bytes = sum(i.nbytes for i in index.values())
    _get_classes(
        json.loads((tiny_model / "config.json").read_text())
    )  # model code is read once per process, not per shard
    before = _rchar()
    shard = load_shard(tiny_model, start, end)
    read = _rchar() - before
    assert shard.nbytes == shard_bytes
    assert shard_bytes < 0.6 * all_bytes
    # headers, config and tokenizer-free metadata are a few KB on top
    assert read <= 1.1 * shard_bytes, f"read {read} bytes for a {shard_bytes}-byte shard"


def test_unlisted_bit_widths_are_inferred(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    listed = {v["bits"] for v in config["quantization"].values() if isinstance(v, dict)} | {
        config["quantization"]["bits"]
    }
    shard = load_shard(tiny_model, 0, config["num_hidden_layers"])
    bits = {
        path: m.bits
        for path, m in shard.model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    unlisted = {b for b in bits.values() if b not in listed}
    assert unlisted, f"the test model must have a bit width config.json does not name; got {set(bits.values())}"
    assert bits["model.embed_tokens"] == config["quantization"]["model.embed_tokens"]["bits"]


def test_chained_stages_equal_the_whole_model(tiny_model):
    prompt = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]], dtype=mx.int32)
    ref, _ = load_model(tiny_model)
    ref.set_dtype(mx.float32)
    want = ref(prompt, cache=make_prompt_cache(ref))[:, -1, :]
    stages = [load_shard(tiny_model, a, b) for a, b in [(0, 3), (3, 4), (4, 7)]]
    h = prompt
    for s in stages:
        h = s(h, s.make_cache())
    np.testing.assert_allclose(np.array(h[:, -1, :]), np.array(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [None, (0, 4)], ids=["whole", "first-stage"])
def test_compiled_decode_equals_the_eager_pass_to_the_bit(tiny_model, split):
    """300 one-token steps through Shard.decode give exactly the eager pass's
    outputs (the attention core runs as mlx-lm runs it; only the segments
    between cores are compiled), past the caches' growth at 256 slots and from
    caches whose buffers end at the prompt (as BatchKVCache.extract leaves them)."""
    shard = load_shard(tiny_model, *(split or (0, 7)))
    assert shard.can_compile_decode
    prompt = mx.array([[3, 14, 15, 92, 65, 35, 89, 79] * 3], dtype=mx.int32)
    eager, compiled = shard.make_cache(), shard.make_cache()
    shard(prompt, eager)
    shard(prompt, compiled)
    for c in compiled:
        c.keys, c.values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
    tok = mx.array([[7]], dtype=mx.int32)
    for i in range(300):
        want = shard(tok, eager)
        got = shard.decode(tok, compiled)
        np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=f"step {i}")
        if shard.last:
            tok = mx.argmax(want[:, -1, :], axis=-1, keepdims=True).astype(mx.int32)
        else:
            tok = mx.array([[(i * 37) % 1000 + 1]], dtype=mx.int32)
    assert [c.offset for c in compiled] == [c.offset for c in eager] == [24 + 300] * len(eager)


@pytest.mark.parametrize("every", [1, 2, 0], ids=["start-every-layer", "start-every-2-layers", "evaluate-once"])
def test_compiled_batched_decode_equals_the_eager_pass_to_the_bit(tiny_model, every, monkeypatch):
    """Decode steps of requests in flight together (a BatchKVCache, left-padded
    where their pasts differ) through Shard.decode give the eager batched pass's
    outputs, however often the layers are started (every layer on the CPU,
    every second on a GPU)."""
    monkeypatch.setattr(Shard, "decode_eval_every", every)
    shard = load_shard(tiny_model, 0, 7)
    assert shard.decode_eval_every == every
    prompts = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43, 38], [2, 7]]

    def batch() -> list[BatchKVCache]:
        caches = []
        for p in prompts:
            c = shard.make_cache()
            shard(mx.array([p], dtype=mx.int32), c)
            caches.append(c)
        return [BatchKVCache.merge([c[j] for c in caches]) for j in range(len(caches[0]))]

    eager, compiled = batch(), batch()
    tok = mx.array([[7], [8], [9]], dtype=mx.int32)
    for i in range(40):
        want = shard(tok, eager)
        got = shard.decode(tok, compiled)
        np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=f"step {i}")
        tok = mx.argmax(want[:, -1, :], axis=-1, keepdims=True).astype(mx.int32)


def test_decode_mode_is_compiled_or_eager():
    assert compiled_decode("compiled") and not compiled_decode("eager")
    with pytest.raises(ShardError, match="unknown decode mode 'fast'"):
        compiled_decode("fast")


def test_missing_safetensors_file_is_named(tiny_model, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises((ShardError, ValueError), match=victim.name):
        load_shard(broken, 0, 7)


def test_layer_range_outside_the_model_is_refused(tiny_model):
    with pytest.raises(ShardError, match="layer range"):
        load_shard(tiny_model, 3, 99)
