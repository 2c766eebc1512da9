"""Check MLX's CUDA quantized matmul on the shapes a Kimi-K2 stage runs, plain and
through kimizmq.qmm (the workaround a shard uses on CUDA). Prints, per shape, the
relative error of each against the dequantized product in float32.

    python tools/cuda_qmm_check.py                 # correctness: per-head weights with a batch
    compute-sanitizer --tool memcheck --show-backtrace no python tools/cuda_qmm_check.py --guarded-only
                                                    # reads past x (run the guarded calls alone:
                                                    # a plain call that faults ends the process)

With mlx 0.32.4 on an H100 the plain per-head rows with B > 1 show errors ~1.4 and
the guarded ones ~0.003; under compute-sanitizer the guarded calls report 0 errors.
When a later MLX gets both right, kimizmq.qmm can go. (On the CPU both columns
agree, ~0.15-0.2 off in bf16: MLX's CPU quantized kernels round bf16 activations.)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kimizmq import qmm  # noqa: E402

HIDDEN, HEADS = 7168, 64


def cases(bits: int):
    for b in (1, 8, 16):
        yield f"linear, decode of {b}", (b, 1, HIDDEN), (1536, HIDDEN), True
    for n in (37, 256):
        yield f"linear, prompt chunk of {n}", (1, n, HIDDEN), (1536, HIDDEN), True
    for b in (1, 2, 4, 8):
        yield f"embed_q, decode of {b}", (b, HEADS, 1, 128), (HEADS, 512, 128), True
        yield f"unembed_out, decode of {b}", (b, HEADS, 1, 512), (HEADS, 128, 512), True
    yield "embed_q of a 37-token prompt", (1, 1, 37, 512), (HEADS, 512, 128), False


def relative_error(got: mx.array, want: mx.array) -> float:
    return (mx.abs(got.astype(mx.float32) - want).max() / mx.abs(want).max()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guarded-only", action="store_true", help="skip the plain mx.quantized_matmul calls")
    args = parser.parse_args()
    mx.random.seed(0)
    print(f"mlx {mx.__version__} on {mx.default_device()}")
    print(f"{'bits':>4}  {'shape':<34} {'plain':>8} {'guarded':>8}")
    for bits in (4, 6, 3):
        for name, xs, ws, transpose in cases(bits):
            x = (mx.random.normal(xs) * 0.1).astype(mx.bfloat16)
            wq, scales, biases = mx.quantize(mx.random.normal(ws).astype(mx.bfloat16), 64, bits)
            w = mx.dequantize(wq, scales, biases, 64, bits).astype(mx.float32)
            want = x.astype(mx.float32) @ (w.swapaxes(-1, -2) if transpose else w)
            kw = dict(transpose=transpose, group_size=64, bits=bits)
            plain = "-"
            if not args.guarded_only:
                plain = f"{relative_error(mx.quantized_matmul(x, wq, scales, biases, **kw), want):.4f}"
            guarded = qmm.quantized_matmul(x, wq, scales, biases, mode="affine", **kw)
            mx.synchronize()
            print(f"{bits:>4}  {name:<34} {plain:>8} {relative_error(guarded, want):>8.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
