"""Quantized matmuls shaped around two faults of MLX's CUDA quantized matmul
(mlx 0.32.4; BENCHMARKS.md, "Two MLX CUDA faults"): per-head weights with a
batch in front are computed with one head's weights, so `quantized_matmul`
folds the batch into the rows; the tiled kernel reads one K tile past x, so x
gets room after it. Elsewhere the products are bit-identical (tests/test_qmm.py).

`guard` swaps a loaded model's quantized layers to these calls (a shard does
that on CUDA only) and gives mlx-lm's SwitchGLU its expert indices ready
(`LeanSwitchGLU`): fewer kernels per token where issuing them is the step's cost.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.mla import QuantizedMultiLinear
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

VECTOR_ROWS = 8  # MLX uses its vector kernel below this many rows in all


def with_room(x: mx.array, room: int) -> mx.array:
    """x, as a view at the start of a buffer `room` elements longer."""
    flat = mx.concatenate([x.reshape(-1), mx.zeros((room,), x.dtype)])
    return flat[: x.size].reshape(x.shape)


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    *,
    transpose: bool,
    group_size: int,
    bits: int,
    mode: str,
) -> mx.array:
    """`mx.quantized_matmul` as MLX's CUDA kernels compute it right: per-head
    weights (B, H, M, K) @ (H, N, K) as (H, B * M, K), and room after x where
    MLX would use its tiled kernel."""
    if w.ndim == 3 and x.ndim == 4 and x.shape[0] > 1:
        b, h, m, k = x.shape
        folded = x.transpose(1, 0, 2, 3).reshape(h, b * m, k)
        out = quantized_matmul(
            folded, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits, mode=mode
        )
        return out.reshape(out.shape[0], b, m, -1).transpose(1, 0, 2, 3)
    if x.ndim >= 2 and x.shape[-2] * math.prod(mx.broadcast_shapes(x.shape[:-2], w.shape[:-2])) >= VECTOR_ROWS:
        x = with_room(x, 4 * max(64, group_size))  # four of the kernel's K tiles
    return mx.quantized_matmul(
        x, w, scales=scales, biases=biases, transpose=transpose, group_size=group_size, bits=bits, mode=mode
    )


def _layer_matmul(layer: nn.Module, x: mx.array, transpose: bool = True) -> mx.array:
    """`quantized_matmul` with a quantized layer's weights and settings."""
    return quantized_matmul(
        x,
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        transpose=transpose,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


class GuardedQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        x = _layer_matmul(self, x)
        return x + self["bias"] if "bias" in self else x


class GuardedQuantizedMultiLinear(QuantizedMultiLinear):
    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        return _layer_matmul(self, x, transpose)


class GuardedQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return _layer_matmul(self, x)


_ROWS: dict[tuple, mx.array] = {}  # lhs indices by (x batch shape, indices shape)


def _rows(batch: tuple[int, ...], shape: tuple[int, ...]) -> mx.array:
    """The lhs indices `gather_qmm` derives when given none (x's batch rows,
    broadcast over the experts), as a contiguous constant."""
    rows = _ROWS.get((batch, shape))
    if rows is None:  # made from the host: a plain constant even when first asked for inside mx.compile's trace
        ids = np.arange(math.prod(batch), dtype=np.uint32).reshape(batch)
        rows = _ROWS[(batch, shape)] = mx.array(np.ascontiguousarray(np.broadcast_to(ids, shape)))
    return rows


def _switch(layer: nn.Module, x: mx.array, indices: mx.array) -> mx.array:
    return mx.gather_qmm(
        x,
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        lhs_indices=_rows(x.shape[:-2], indices.shape),
        rhs_indices=indices,
        transpose=True,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


class LeanSwitchGLU(SwitchGLU):
    """mlx-lm's SwitchGLU with its expert indices handed over ready: the rhs
    indices copied contiguous once, the lhs indices a constant, where MLX would
    make and copy both for each of the three `gather_qmm` calls. The same
    products to the bit, ~4 fewer kernels per MoE layer and token."""

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        plain = (
            type(p) is QuantizedSwitchLinear and "bias" not in p and getattr(p, "global_scale", None) is None
            for p in (self.up_proj, self.gate_proj, self.down_proj)
        )
        if indices.size >= 64 or not all(plain):
            return super().__call__(x, indices)  # sorted experts, biases, unquantized or nvfp4 weights: mlx-lm's way
        x = mx.expand_dims(x, (-2, -3))
        idx = mx.contiguous(mx.stop_gradient(indices))
        h = self.activation(_switch(self.up_proj, x, idx), _switch(self.gate_proj, x, idx))
        return _switch(self.down_proj, h, idx).squeeze(-2)


GUARDED = {
    SwitchGLU: LeanSwitchGLU,
    nn.QuantizedLinear: GuardedQuantizedLinear,
    QuantizedMultiLinear: GuardedQuantizedMultiLinear,
    nn.QuantizedEmbedding: GuardedQuantizedEmbedding,
}


def guard(model: nn.Module) -> int:
    """Route every quantized layer of `model` through `quantized_matmul`; the
    layers keep their weights (only their class changes). Returns how many."""
    count = 0
    for _, module in model.named_modules():
        guarded = GUARDED.get(type(module))
        if guarded is not None:
            module.__class__ = guarded
            count += 1
    return count


def needed() -> bool:
    """Whether this process computes on MLX's CUDA backend."""
    cuda = getattr(mx, "cuda", None)  # not in every build (macOS)
    return mx.default_device() == mx.gpu and cuda is not None and cuda.is_available()


__all__ = ["GUARDED", "guard", "needed", "quantized_matmul", "with_room"]
