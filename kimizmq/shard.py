"""Load one stage's slice of a model: layers [start, end), plus the embedding
on the first stage and the final norm and lm_head on the last.

The model classes, sanitize step and per-module quantization come from mlx-lm;
this module only decides which tensors to read. `mx.load` is lazy, so tensors
outside the slice are never read from disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask, create_ssm_mask, scaled_dot_product_attention
from mlx_lm.models.cache import ArraysCache, KVCache
from mlx_lm.models.deepseek_v3 import DeepseekV3Attention
from mlx_lm.models.kimi_k3 import KimiK3TextModel, ResidualBlocks, _attn_res_mix
from mlx_lm.utils import _get_classes, _takes_global_scale, infer_quant_config, load_config

from . import qmm
from .checkpoint import (
    CheckpointError,
    check_layer_count,
    loaded_nbytes,
    mlx_quantization,
    stage_tensor_names,
    tensor_index,
    text_config,
)
from .config import DECODE_MODES

GPU_DECODE_EVAL_EVERY = 2  # compiled segments per async_eval in Shard.decode on a GPU (decode_eval_every)
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


def compiled_decode(mode: str) -> bool:
    """Whether one-token steps run through Shard.decode (`runtime.decode`):
    "compiled" replays traced segments (faster on CPU and GPU alike), "eager"
    builds every step op by op."""
    if mode not in DECODE_MODES:
        raise ShardError(f"unknown decode mode {mode!r}; expected {', '.join(DECODE_MODES)}")
    return mode == "compiled"


def _attention_in(attn: nn.Module, x: mx.array, position: mx.array) -> tuple[mx.array, ...]:
    """mlx-lm's DeepseekV3Attention for one token, up to the KV cache, op for op:
    (absorbed q_nope, q_pe * scale, kv_latent, k_pe), roped at `position`."""
    B, L, _ = x.shape
    if attn.q_lora_rank is None:
        q = attn.q_proj(x)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q = q.reshape(B, L, attn.num_heads, attn.q_head_dim).transpose(0, 2, 1, 3)
    q_nope, q_pe = mx.split(q, [attn.qk_nope_head_dim], axis=-1)
    compressed_kv = attn.kv_a_proj_with_mqa(x)
    compressed_kv, k_pe = mx.split(compressed_kv, [attn.kv_lora_rank], axis=-1)
    k_pe = k_pe.reshape(B, L, 1, attn.qk_rope_head_dim).transpose(0, 2, 1, 3)
    kv_latent = attn.kv_a_layernorm(compressed_kv)
    q_pe = attn.rope(q_pe, position)
    k_pe = attn.rope(k_pe, position)
    kv_latent = mx.expand_dims(kv_latent, axis=1)
    return attn.embed_q(q_nope), q_pe * attn.scale, kv_latent, k_pe


def _attention_core(attn: nn.Module, cache, mask: mx.array | None, q_nope, q_pe, kv_latent, k_pe) -> mx.array:
    """The part whose shapes grow with the context: cache update and attention
    (`mask`: the left padding of a batch)."""
    kv_latent, k_pe = cache.update_and_fetch(kv_latent, k_pe)
    pe_scores = q_pe @ k_pe.swapaxes(-1, -2)
    if mask is not None:
        pe_scores = mx.where(mask, pe_scores, mx.array(mx.finfo(pe_scores.dtype).min, pe_scores.dtype))
    return scaled_dot_product_attention(q_nope, kv_latent, kv_latent, cache=cache, scale=attn.scale, mask=pe_scores)


def _language_model(model: nn.Module) -> nn.Module:
    """The module holding `model` (the decoder) and `lm_head`: mlx-lm's
    kimi_k25 and kimi_k3 wrap it as `language_model`, next to vision config."""
    return model.get("language_model", model)


def _head(model: nn.Module, h: mx.array) -> mx.array:
    lm = _language_model(model)
    h = lm.model.norm(h)
    if getattr(lm.args, "tie_word_embeddings", False):
        return lm.model.embed_tokens.as_linear(h)
    return lm.lm_head(h)


def residual_blocks_in(config: dict, start: int) -> int:
    """How many attention-residual blocks (Kimi K3) enter the stage whose
    first layer is `start`: one per block begun before it (mlx-lm's
    pipeline sends the same count); 0 for a model without them."""
    size = text_config(config).get("attn_res_block_size")
    return 0 if size is None else -(-start // size)


def _attention_out(attn: nn.Module, out: mx.array) -> mx.array:
    out = attn.unembed_out(out)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(out.shape[0], 1, -1))


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
        """Start each layer of a prompt pass (`__call__`) as soon as its graph
        is built, so the device computes it while Python builds the next: on
        the CPU only, since on CUDA an eager evaluation costs more than it hides."""
        return mx.default_device() == mx.cpu

    @property
    def decode_eval_every(self) -> int:
        """Shard.decode starts (`mx.async_eval`) every this many compiled
        segments as soon as they are built: every layer on the CPU, every
        second on a GPU, where one segment is too little work to pay for its
        evaluation."""
        return 1 if mx.default_device() == mx.cpu else GPU_DECODE_EVAL_EVERY

    @property
    def dtype(self) -> mx.Dtype:
        return self.inner.layers[self.start].input_layernorm.weight.dtype

    @property
    def kimi_k3(self) -> bool:
        """mlx-lm's Kimi K3 decoder: linear and MLA layers, attention residuals."""
        return isinstance(self.inner, KimiK3TextModel)

    @property
    def blocks_in(self) -> int:
        """Attention-residual blocks that arrive with the hidden state (Kimi K3)."""
        return residual_blocks_in(self.config, self.start)

    @property
    def blocks_out(self) -> int:
        """Attention-residual blocks this stage sends on with its output."""
        return 0 if self.last else residual_blocks_in(self.config, self.end)

    def make_cache(self) -> list:
        """One request's state per layer, as mlx-lm's make_cache gives it: a
        KVCache per attention layer, an ArraysCache (convolution and
        recurrent state) per linear-attention layer."""
        return [ArraysCache(size=2) if getattr(layer, "is_linear", False) else KVCache() for layer in self.layers]

    def forward(self, inputs: list[mx.array], cache: list, *, head: bool = True) -> list[mx.array]:
        """Like `__call__`, for a message of several tensors: the hidden state
        (or token ids), then what the model carries beside it across a stage
        boundary (Kimi K3: its attention-residual blocks, (blocks, B, L, D)).
        Returns the same for the next stage, or the last stage's logits."""
        if not self.kimi_k3:
            return [self(inputs[0], cache, head=head)]
        return self._forward_k3(inputs, cache, head)

    def _forward_k3(self, inputs: list[mx.array], cache: list, head: bool) -> list[mx.array]:
        """mlx-lm's KimiK3TextModel pass over this stage's layers, its
        pipeline's send and receive replaced by the message's tensors."""
        inner, x = self.inner, inputs[0]
        eps = inner.args.rms_norm_eps
        h = inner.embed_tokens(x) if self.first else x.astype(self.dtype)
        blocks = ResidualBlocks(eps) if inner.use_attn_res else None
        if blocks is not None and self.blocks_in:
            blocks.raw = inputs[1].astype(h.dtype)
            xf = blocks.raw.astype(mx.float32)
            blocks.inv_rms = mx.rsqrt((xf * xf).mean(axis=-1) + eps)
        linear = [i for i, layer in enumerate(self.layers) if layer.is_linear]
        attention = [i for i, layer in enumerate(self.layers) if not layer.is_linear]
        ssm_mask = create_ssm_mask(h, cache[linear[0]]) if linear else None
        attn_mask = create_attention_mask(h, cache[attention[0]], return_array=True) if attention else None
        overlap = self.eval_per_layer
        for layer, c in zip(self.layers, cache):
            h, blocks = layer(h, mask=ssm_mask if layer.is_linear else attn_mask, cache=c, blocks=blocks)
            if overlap:
                mx.async_eval(h)
        if not self.last:
            return [h] if blocks is None else [h, blocks.raw]
        if blocks is not None:
            if inner._output_res_w_eff is None:
                inner._output_res_w_eff = inner.output_attn_res_norm.weight.astype(
                    mx.float32
                ) * inner.output_attn_res_proj.weight.reshape(-1)
            h = _attn_res_mix(blocks, h, inner._output_res_w_eff, eps)
        return [_head(self.model, h[:, -1:, :])] if head else [h]

    def __call__(self, x: mx.array, cache: list[KVCache], *, head: bool = True) -> mx.array:
        """Token ids (first stage) or activations in; activations out, or on
        the last stage with `head`, the last position's logits."""
        if self.kimi_k3:
            if self.blocks_in or self.blocks_out:
                raise ShardError("this stage's messages carry attention-residual blocks: use Shard.forward")
            return self._forward_k3([x], cache, head)[0]
        h = self.inner.embed_tokens(x) if self.first else x.astype(self.dtype)
        mask = create_attention_mask(h, cache[0], return_array=True)
        overlap = self.eval_per_layer
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)
            if overlap:
                mx.async_eval(h)
        if not (self.last and head):
            return h
        return _head(self.model, h[:, -1:, :])

    @property
    def can_compile_decode(self) -> bool:
        """Shard.decode knows mlx-lm's DeepseekV3 attention (Kimi-K2's, K2.5's);
        other models decode eagerly."""
        return not self.kimi_k3 and all(isinstance(layer.self_attn, DeepseekV3Attention) for layer in self.layers)

    def decode(self, x: mx.array, cache: list, *, head: bool = True) -> mx.array:
        """`self(x, cache, head=head)` for one token per request, x of shape
        (B, 1) or (B, 1, hidden), with everything between two attention cores
        compiled: a stage makes len(layers) + 1 compiled calls and a few ops per
        layer instead of a few hundred Python-built ops, and MLX fuses the
        elementwise ones. The attention core (cache update, scores over each
        request's exact context) runs as mlx-lm runs it, so the result is
        mlx-lm's to the bit; positions are arrays, so one trace per segment and
        batch size serves every position. `cache`: a KVCache per layer (one
        request) or a BatchKVCache per layer; it must hold the prompt already."""
        first = cache[0]
        position = first.offset if isinstance(first.offset, mx.array) else mx.array(first.offset, dtype=mx.int32)
        mask = create_attention_mask(x, first, return_array=True)  # None for one request
        every = self.decode_eval_every
        h, *attn_in = self._segment(-1, head)(x, position)
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            out = _attention_core(layer.self_attn, c, mask, *attn_in)
            h, *attn_in = self._segment(i, head)(h, out, position)
            if every and (i + 1) % every == 0:
                mx.async_eval(h, *attn_in)
        return h

    def _segment(self, i: int, head: bool) -> Callable:
        """Compiled: layer i's attention output, residual and MLP (i >= 0), then
        layer i + 1's attention input; after the last layer, the head."""
        key = (i, head and self.last)
        fn = self._decoders.get(key)
        if fn is None:
            # The closure holds the modules, not the Shard: no reference cycle,
            # so dropping a stage frees its weights at once, not at the next GC.
            model, first, dtype, layers = self.model, self.first, self.dtype, self.layers
            nxt = layers[i + 1] if i + 1 < len(layers) else None

            def segment(*args):
                if i < 0:
                    x, position = args
                    h = model.model.embed_tokens(x) if first else x.astype(dtype)
                else:
                    h, out, position = args
                    layer = layers[i]
                    h = h + _attention_out(layer.self_attn, out)
                    h = h + layer.mlp(layer.post_attention_layernorm(h))
                if nxt is not None:
                    return (h, *_attention_in(nxt.self_attn, nxt.input_layernorm(h), position))
                return (_head(model, h) if key[1] else h,)

            fn = self._decoders[key] = mx.compile(segment)
        return fn


def _trim(model: nn.Module, start: int, end: int, first: bool, last: bool) -> None:
    """Drop every module this stage does not run, keeping parameter names."""
    lm = _language_model(model)
    inner = lm.model
    layers = inner.layers[:end]
    layers[:start] = [None] * start
    inner.layers = layers
    tied = bool(getattr(lm.args, "tie_word_embeddings", False))
    if not first and not (last and tied):
        del inner["embed_tokens"]
    if not last:
        for name in ("norm", "output_attn_res_proj", "output_attn_res_norm"):
            if name in inner:
                del inner[name]
    if (not last or tied) and "lm_head" in lm:
        del lm["lm_head"]


def _quantize(model: nn.Module, quantization: dict | None, weights: dict[str, mx.array]) -> None:
    """mlx-lm's rule: a module named in the quantization block takes those
    settings; any other module with saved scales has its bits and group size
    inferred from the tensor shapes (mixed-bit checkpoints load as they are,
    and so do compressed-tensors ones, whose unpacked modules have no scales)."""
    if quantization is None:
        return

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        params = infer_quant_config(path, module, weights)
        if f"{path}.global_scale" in weights and _takes_global_scale(module):
            params["global_scale"] = True
        return params

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


class ShardLoader:
    """Layers [start, end) of the checkpoint at `model_dir`, read a module at a time.

    Making one reads only config.json and the safetensors headers, so `index`
    (every tensor of the checkpoint), `names` (the shard's), `nbytes` (its
    weight bytes on disk) and `loaded_bytes` (the memory they take once
    loaded) are known, and a checkpoint with more layers than its config says
    is refused, before a tensor is read. Iterating reads
    the shard, yielding (done_bytes, total_bytes) after each module, and leaves
    it in `shard`. A daemon iterates on its own loop's thread between messages:
    MLX arrays and streams belong to the thread that made them (on CUDA,
    evaluating another thread's arrays is not safe)."""

    def __init__(self, model_dir: str | Path, start: int, end: int, *, dtype: str = "auto"):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ShardError(f"model directory {self.model_dir} does not exist; is [model] path right?")
        try:
            self.config = load_config(self.model_dir)
        except FileNotFoundError:
            raise ShardError(f"{self.model_dir}: no config.json; is [model] path right?") from None
        n_layers = text_config(self.config).get("num_hidden_layers")
        if not isinstance(n_layers, int) or not 0 <= start < end <= n_layers:
            raise ShardError(f"layer range [{start}, {end}) is not inside the model's {n_layers} layers")
        self.start, self.end, self.dtype = start, end, dtype
        self.first, self.last = start == 0, end == n_layers
        self.index = index = tensor_index(self.model_dir)
        try:
            check_layer_count(index, text_config(self.config), self.model_dir)
        except CheckpointError as e:
            raise ShardError(str(e)) from None
        self.names = names = stage_tensor_names(index, start, end, first=self.first, last=self.last)
        self.nbytes = sum(index[n].nbytes for n in names)
        # FP8 counts as bfloat16: the memory the loaded shard takes, not its bytes on disk
        self.loaded_bytes = sum(loaded_nbytes(n, index[n], index) for n in names)
        self._by_file: dict[Path, list[str]] = {}
        for n in names:
            self._by_file.setdefault(Path(index[n].file), []).append(n)
        self.shard: Shard | None = None

    def __iter__(self) -> Iterator[tuple[int, int]]:
        model_dir, start, end, first, last = self.model_dir, self.start, self.end, self.first, self.last
        weights: dict[str, mx.array] = {}
        for file, file_names in self._by_file.items():
            try:
                lazy = mx.load(str(file))
            except (RuntimeError, ValueError, OSError) as e:
                raise ShardError(f"{file}: cannot read safetensors: {e}") from None
            for n in file_names:
                if n not in lazy:
                    raise ShardError(f"{file}: tensor {n} listed in the index is missing")
                weights[n] = lazy[n]

        model_class, args_class = _get_classes(self.config)
        model = model_class(args_class.from_dict(self.config))
        if hasattr(model, "sanitize"):  # before _trim: kimi_k3's walks every layer module
            weights = model.sanitize(weights)
        _trim(model, start, end, first, last)
        try:
            quantization = mlx_quantization(self.config, model_dir)
        except CheckpointError as e:
            raise ShardError(f"{model_dir}: {e}") from None
        _quantize(model, quantization, weights)
        if qmm.needed():
            qmm.guard(model)  # around two faults of MLX's CUDA quantized matmul (kimizmq/qmm.py)
        model.eval()
        try:
            model.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise ShardError(f"{model_dir}: checkpoint does not match the model: {e}") from None

        target = compute_dtype(self.dtype)
        if target is not None:
            model.set_dtype(target)  # lazy: the cast happens as each tensor is read

        # Reading happens here, a module at a time, so progress is real.
        parts: list[nn.Module] = []
        lm = _language_model(model)
        if "embed_tokens" in lm.model:
            parts.append(lm.model.embed_tokens)
        parts.extend(lm.model.layers[start:end])
        parts.extend(m for m in (lm.model.get("norm"), lm.get("lm_head")) if m is not None)
        sizes = [sum(v.nbytes for _, v in tree_flatten(p.parameters())) for p in parts]
        done = 0
        for part, size in zip(parts, sizes):
            try:
                mx.eval(part.parameters())
            except (RuntimeError, ValueError) as e:
                raise ShardError(f"{model_dir}: reading weights failed: {e}") from None
            done += size
            yield self.nbytes * done // sum(sizes), self.nbytes
        # Constants the modules made for themselves (rope frequencies, ...) too.
        mx.eval([v for _, v in tree_flatten(model) if isinstance(v, mx.array)])
        self.shard = Shard(model, self.config, start, end, first, last, nbytes=self.nbytes)


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
    loader = ShardLoader(model_dir, start, end, dtype=dtype)
    for done, total in loader:
        if progress is not None:
            progress(done, total)
    return loader.shard


__all__ = [
    "DECODE_MODES",
    "Shard",
    "ShardError",
    "ShardLoader",
    "compiled_decode",
    "compute_dtype",
    "load_shard",
    "residual_blocks_in",
]
