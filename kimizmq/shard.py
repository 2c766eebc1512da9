"""Load one stage's slice of a model: layers [start, end), plus the embedding
on the first stage and the final norm and lm_head on the last.

The model classes, sanitize step and per-module quantization come from mlx-lm;
this module only decides which tensors to read. `mx.load` is lazy, so tensors
outside the slice are never read from disk.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import _get_classes, infer_quant_config, load_config

from .checkpoint import stage_tensor_names, tensor_index

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class ShardError(RuntimeError):
    """A shard that cannot be loaded; the message names the file or tensor."""


def compute_dtype(name: str) -> mx.Dtype | None:
    """The activation dtype for `name`; None keeps the checkpoint's own.

    "auto" is float32 on the CPU: MLX's CPU quantized matmul with bfloat16
    activations is slow and off by ~12 %."""
    if name == "auto":
        return mx.float32 if mx.default_device() == mx.cpu else None
    if name not in DTYPES:
        raise ShardError(f"unknown dtype {name!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


DECODE_MODES = ("auto", "compiled", "eager")


def compiled_decode(mode: str) -> bool:
    """Whether one-token steps run as a compiled graph (`runtime.decode`).

    "auto" compiles on a GPU, where building a step's graph in Python op by op
    costs more than the step itself. On the CPU the eager path, which starts
    each layer as soon as it is built, is faster (218 vs 184 tok/s on the test
    model)."""
    if mode not in DECODE_MODES:
        raise ShardError(f"unknown decode mode {mode!r}; expected {', '.join(DECODE_MODES)}")
    if mode == "auto":
        return mx.default_device() != mx.cpu
    return mode == "compiled"


class _PositionCache:
    """mlx-lm's cache interface inside a compiled decode step: the position is
    an array, so one traced graph serves every position; the new entry is
    written into the preallocated buffers and attention reads all of them,
    the mask hiding the slots past the position."""

    def __init__(self, keys: mx.array, values: mx.array, position: mx.array):
        self.keys, self.values, self.offset = keys, values, position

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start = self.offset[None]
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys, self.values


def _make_room(cache: KVCache) -> None:
    """Give `cache` a free slot in a buffer whose length is a multiple of
    KVCache.step, so a compiled step sees few distinct shapes (one trace per
    step's worth of context). mlx-lm's KVCache grows the same way."""
    size = cache.keys.shape[2]
    if size > cache.offset and size % KVCache.step == 0:
        return
    n = (cache.offset // KVCache.step + 1) * KVCache.step
    keep = cache.offset

    def grown(a: mx.array) -> mx.array:
        pad = mx.zeros((*a.shape[:2], n - keep, a.shape[3]), a.dtype)
        return mx.concatenate([a[..., :keep, :], pad], axis=2)

    cache.keys, cache.values = grown(cache.keys), grown(cache.values)


@dataclass
class Shard:
    """A loaded layer range and the one forward pass a stage runs."""

    model: nn.Module
    config: dict
    start: int
    end: int
    first: bool
    last: bool
    nbytes: int
    _decoders: dict = field(default_factory=dict, repr=False)

    @property
    def inner(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> list[nn.Module]:
        return self.inner.layers[self.start : self.end]

    @property
    def eval_per_layer(self) -> bool:
        """Start each layer as soon as its graph is built, so the device computes
        it while Python builds the next (mlx-lm's generate_step gets this overlap
        by building step n+1 while step n runs; a stage waits for its input
        instead). On the CPU a decode step of the test model gets 15 % faster; on
        CUDA each evaluation costs ~0.4 ms and the Kimi-geometry model got 35 %
        slower, so GPUs evaluate a stage's layers at once."""
        return mx.default_device() == mx.cpu

    @property
    def dtype(self) -> mx.Dtype:
        return self.inner.layers[self.start].input_layernorm.weight.dtype

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in range(self.end - self.start)]

    def __call__(self, x: mx.array, cache: list[KVCache], *, head: bool = True) -> mx.array:
        """Token ids (first stage) or activations in; activations out, or on
        the last stage with `head`, the last position's logits."""
        h = self.inner.embed_tokens(x) if self.first else x.astype(self.dtype)
        mask = create_attention_mask(h, cache[0], return_array=True)
        overlap = self.eval_per_layer
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)
            if overlap:
                mx.async_eval(h)
        if not (self.last and head):
            return h
        return self._head(h[:, -1:, :])

    def _head(self, h: mx.array) -> mx.array:
        h = self.inner.norm(h)
        if getattr(self.model.args, "tie_word_embeddings", False):
            return self.inner.embed_tokens.as_linear(h)
        return self.model.lm_head(h)

    def decode(self, x: mx.array, cache: list[KVCache], *, head: bool = True) -> mx.array:
        """`self(x, cache, head=head)` for one token of one request (x of shape
        (1, 1) or (1, 1, hidden)) as a compiled graph: one call instead of a few
        hundred Python-built ops per step, and MLX fuses the elementwise ones.
        The caches must hold the request's prompt already."""
        for c in cache:
            _make_room(c)
        step = self._decoders.get(head)
        if step is None:
            step = self._decoders[head] = mx.compile(lambda *a: self._decode_graph(*a, head=head))
        position = mx.array(cache[0].offset, dtype=mx.int32)
        out, keys, values = step(x, position, [c.keys for c in cache], [c.values for c in cache])
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values = k, v
            c.offset += 1
        return out

    def _decode_graph(self, x, position, keys, values, *, head: bool):
        h = self.inner.embed_tokens(x) if self.first else x.astype(self.dtype)
        mask = (mx.arange(keys[0].shape[2]) <= position)[None, None, None, :]
        views = [_PositionCache(k, v, position) for k, v in zip(keys, values)]
        for layer, c in zip(self.layers, views):
            h = layer(h, mask, cache=c)
        if self.last and head:
            h = self._head(h)
        return h, [c.keys for c in views], [c.values for c in views]


def _trim(model: nn.Module, start: int, end: int, first: bool, last: bool) -> None:
    """Drop every module this stage does not run, keeping parameter names."""
    inner = model.model
    layers = inner.layers[:end]
    layers[:start] = [None] * start
    inner.layers = layers
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    if not first and not (last and tied):
        del inner["embed_tokens"]
    if not last:
        del inner["norm"]
    if (not last or tied) and "lm_head" in model:
        del model["lm_head"]


def _quantize(model: nn.Module, config: dict, weights: dict[str, mx.array]) -> None:
    """mlx-lm's rule: a module named in config["quantization"] takes those
    settings; any other module with saved scales has its bits and group size
    inferred from the tensor shapes (mixed-bit checkpoints load as they are)."""
    quantization = config.get("quantization")
    if quantization is None:
        return

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def load_shard(
    model_dir: str | Path,
    start: int,
    end: int,
    *,
    dtype: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> Shard:
    """Load layers [start, end) of the checkpoint at `model_dir`.

    `progress(done_bytes, total_bytes)` is called as layers are read."""
    loading = iter_load_shard(model_dir, start, end, dtype=dtype)
    while True:
        try:
            done, total = next(loading)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(done, total)


def iter_load_shard(
    model_dir: str | Path, start: int, end: int, *, dtype: str = "auto"
) -> Generator[tuple[int, int], None, Shard]:
    """`load_shard` a module at a time: yields (done_bytes, total_bytes) after
    each one is read and returns the Shard. A daemon runs it on its own loop's
    thread between messages: MLX arrays and streams belong to the thread that
    made them (on CUDA, evaluating another thread's arrays is not safe)."""
    model_dir = Path(model_dir)
    try:
        config = load_config(model_dir)
    except FileNotFoundError:
        raise ShardError(f"{model_dir}: no config.json; is [model] path right?") from None
    n_layers = config.get("num_hidden_layers")
    if not isinstance(n_layers, int) or not 0 <= start < end <= n_layers:
        raise ShardError(f"layer range [{start}, {end}) is not inside the model's {n_layers} layers")
    first, last = start == 0, end == n_layers
    index = tensor_index(model_dir)
    names = stage_tensor_names(index, start, end, first=first, last=last)
    total = sum(index[n].nbytes for n in names)

    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(Path(index[n].file), []).append(n)
    weights: dict[str, mx.array] = {}
    for file, file_names in by_file.items():
        try:
            lazy = mx.load(str(file))
        except (RuntimeError, ValueError, OSError) as e:
            raise ShardError(f"{file}: cannot read safetensors: {e}") from None
        for n in file_names:
            if n not in lazy:
                raise ShardError(f"{file}: tensor {n} listed in the index is missing")
            weights[n] = lazy[n]

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    _trim(model, start, end, first, last)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    _quantize(model, config, weights)
    model.eval()
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ShardError(f"{model_dir}: checkpoint does not match the model: {e}") from None

    target = compute_dtype(dtype)
    if target is not None:
        model.set_dtype(target)  # lazy: the cast happens as each tensor is read

    # Reading happens here, a module at a time, so progress is real. Everything
    # is evaluated on this thread: MLX streams belong to the thread that made them.
    parts: list[nn.Module] = []
    if "embed_tokens" in model.model:
        parts.append(model.model.embed_tokens)
    parts.extend(model.model.layers[start:end])
    parts.extend(m for m in (model.model.get("norm"), model.get("lm_head")) if m is not None)
    sizes = [sum(v.nbytes for _, v in tree_flatten(p.parameters())) for p in parts]
    done = 0
    for part, size in zip(parts, sizes):
        try:
            mx.eval(part.parameters())
        except (RuntimeError, ValueError) as e:
            raise ShardError(f"{model_dir}: reading weights failed: {e}") from None
        done += size
        yield total * done // sum(sizes), total
    # Constants the modules made for themselves (rope frequencies, ...) too.
    mx.eval([v for _, v in tree_flatten(model) if isinstance(v, mx.array)])
    return Shard(model, config, start, end, first, last, nbytes=total)


__all__ = ["DECODE_MODES", "Shard", "ShardError", "compiled_decode", "compute_dtype", "iter_load_shard", "load_shard"]
