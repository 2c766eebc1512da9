"""Where a decode step's time goes, kimizmq's stage against mlx-lm, in one process on one
device (BENCHMARKS.md, "Why decode at one request trails mlx-lm"). Runs anywhere MLX
does; the figures that matter come from a GPU.

    python tools/gpu_decode_probe.py build-eval MODEL_DIR   # build vs evaluate, ms a token
    python tools/gpu_decode_probe.py by-layer MODEL_DIR     # batched vs lone, layer by layer
    python tools/gpu_decode_probe.py lean MODEL_DIR         # qmm.LeanSwitchGLU vs mlx-lm's SwitchGLU
    python tools/gpu_decode_probe.py primitives MODEL_DIR [--ncu]
    python tools/gpu_decode_probe.py hop MODEL_DIR          # a two-stage step in one process, no sockets
    python tools/gpu_decode_probe.py batch MODEL_DIR        # ms per batched decode step of 1, 2, 4, 8 requests

`primitives` counts the operations in one decode step's graph. With --ncu it also runs one
step of each between cudaProfilerStart/Stop, for
`ncu --profile-from-start off --metrics gpu__time_duration.sum --csv python tools/... --ncu`.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import io
import json
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kimizmq import qmm, wire  # noqa: E402
from kimizmq import shard as shard_mod  # noqa: E402
from kimizmq.stage import Stage, Step  # noqa: E402

PROMPT = list(range(1, 33))
PROMPT_LEN = len(PROMPT)
VIEWS = {"Reshape", "Slice", "Transpose", "ExpandDims", "Broadcast", "Squeeze", "Split", "Unflatten", "Flatten"}
VIEWS |= {"StopGradient", "AsStrided"}


def layers_of(model_dir: str) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]


def mlx_lm_loop(model, n: int) -> float:
    """mlx-lm's generate_step (step t+1 built while step t runs): ms a token."""
    t = [time.perf_counter() for _ in generate_step(mx.array(PROMPT), model, max_tokens=n)]
    return 1e3 * (t[-1] - t[0]) / (len(t) - 1)


def stage_loop(shard, req: str, n: int, forced: list[int] | None = None):
    """A Stage decoding greedily (or fed `forced` tokens): ms a token, or [(token, logprob)]."""
    stage = Stage(shard, max_requests=4, max_context=4096, compiled_decode=True)
    x, offset, got = mx.array([PROMPT], dtype=mx.int32), 0, []
    for i in range(n):
        r = stage.forward_many([Step(req, offset, x, True, {})])[0]
        offset += x.shape[1]
        got.append((r.token, r.logprob))
        x = mx.array([[forced[i] if forced else r.token]], dtype=mx.int32)
        if i == 0:
            t0 = time.perf_counter()
    stage.release(req)
    return got if forced else 1e3 * (time.perf_counter() - t0) / (n - 1)


def mlx_lm_reference(model, n: int) -> list[tuple[int, float]]:
    """mlx-lm's greedy tokens and their logprobs."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([PROMPT]), cache=cache)[:, -1]
    out = []
    for _ in range(n):
        lp = logits - mx.logsumexp(logits, -1, keepdims=True)
        t = mx.argmax(lp, -1).item()
        out.append((t, lp[0, t].item()))
        logits = model(mx.array([[t]]), cache=cache)[:, -1]
    return out


def build_eval(args) -> None:
    model, _ = load_model(Path(args.model))
    shard = shard_mod.load_shard(args.model, 0, layers_of(args.model))

    def mlx_lm_serial():
        cache = make_prompt_cache(model)
        y = mx.argmax(model(mx.array([PROMPT]), cache=cache)[:, -1], -1)
        mx.eval(y)
        b = e = 0.0
        for _ in range(args.tokens):
            t0 = time.perf_counter()
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1], -1)
            t1 = time.perf_counter()
            mx.eval(y)
            b, e = b + t1 - t0, e + time.perf_counter() - t1
        return 1e3 * b / args.tokens, 1e3 * e / args.tokens

    def kimizmq(every: int, req: str):
        shard_mod.GPU_DECODE_EVAL_EVERY = every  # GPUs only; the CPU starts every layer
        stage = Stage(shard, max_requests=4, max_context=4096, compiled_decode=True)
        token = stage.forward_many([Step(req, 0, mx.array([PROMPT], dtype=mx.int32), True, {})])[0].token
        cache, b, e = stage.requests[req].cache, 0.0, 0.0
        for _ in range(args.tokens):
            t0 = time.perf_counter()
            y = mx.argmax(shard.decode(mx.array([[token]], dtype=mx.int32), cache, head=True)[:, -1], -1)
            t1 = time.perf_counter()
            mx.eval(y)
            b, e = b + t1 - t0, e + time.perf_counter() - t1
            token = y.item()
        stage.release(req)
        return 1e3 * b / args.tokens, 1e3 * e / args.tokens

    every = shard_mod.GPU_DECODE_EVAL_EVERY  # the shipped cadence (GPUs; the CPU starts every layer either way)
    for warm in (lambda: mlx_lm_loop(model, args.tokens), mlx_lm_serial, lambda: kimizmq(0, "w0")):
        warm()
    res: dict[str, list] = {}
    for r in range(args.rounds):
        res.setdefault("mlx-lm loop ms", []).append(mlx_lm_loop(model, args.tokens))
        res.setdefault("mlx-lm build/eval ms", []).append(mlx_lm_serial())
        res.setdefault("kimizmq, one start, build/eval ms", []).append(kimizmq(0, f"a{r}"))
        res.setdefault(f"kimizmq, every {every} started, build/eval ms", []).append(kimizmq(every, f"b{r}"))
    out = {}
    for k, v in res.items():
        if isinstance(v[0], tuple):
            out[k] = [round(statistics.median(x[i] for x in v), 2) for i in (0, 1)]
        else:
            out[k] = round(statistics.median(v), 2)
    print(Path(args.model).name, mx.default_device(), json.dumps(out))


def by_layer(args) -> None:
    shard = shard_mod.load_shard(args.model, 0, layers_of(args.model))
    lens = (20, 33, 27, 40)
    prompts = [[(7 * i + 3 * j) % 900 + 1 for j in range(n)] for i, n in enumerate(lens)]
    caches = [shard.make_cache() for _ in lens]
    for p, cache in zip(prompts, caches):
        mx.eval(shard(mx.array([p], dtype=mx.int32), cache, head=False))
        mx.eval([[c.keys, c.values] for c in cache])
    batched = [BatchKVCache.merge([c[j] for c in caches]) for j in range(len(shard.layers))]
    h = [shard.inner.embed_tokens(mx.array([[t]], dtype=mx.int32)) for t in (5, 77, 300, 901)]

    def rel(a, b):
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        return (mx.linalg.norm(a - b) / mx.maximum(mx.linalg.norm(b), 1e-30)).item()

    worst = {"attention": 0.0, "mlp": 0.0}
    for i, layer in enumerate(shard.layers):
        attn, mlp_in, mlp, nxt = [], [], [], []
        for r in range(len(lens)):  # each request alone
            a = layer.self_attn(layer.input_layernorm(h[r]), None, cache=caches[r][i])
            m_in = layer.post_attention_layernorm(h[r] + a)
            m = layer.mlp(m_in)
            attn.append(a)
            mlp_in.append(m_in)
            mlp.append(m)
            nxt.append(h[r] + a + m)
        x = mx.concatenate(h, axis=0)  # the same inputs, batched
        a = layer.self_attn(
            layer.input_layernorm(x), create_attention_mask(x, batched[i], return_array=True), cache=batched[i]
        )
        m = layer.mlp(mx.concatenate(mlp_in, axis=0))
        ea = max(rel(a[r : r + 1], attn[r]) for r in range(len(lens)))
        em = max(rel(m[r : r + 1], mlp[r]) for r in range(len(lens)))
        line = f"layer {i:2d}: attention rel {ea:.4f}  mlp rel {em:.4f}"
        if "gate" in layer.mlp:
            chosen = layer.mlp.gate(mx.concatenate(mlp_in, axis=0))[0]
            differ = sum(
                len(set(chosen[r].reshape(-1).tolist()) ^ set(layer.mlp.gate(mlp_in[r])[0].reshape(-1).tolist())) // 2
                for r in range(len(lens))
            )
            line += f" router experts differing {differ}"
        print(line, flush=True)
        worst = {"attention": max(worst["attention"], ea), "mlp": max(worst["mlp"], em)}
        h = nxt
    print("worst", {k: round(v, 4) for k, v in worst.items()}, "device", mx.default_device())


def plain_experts(shard) -> int:
    """Give a loaded shard mlx-lm's own SwitchGLU back; how many were lean."""
    n = 0
    for _, m in shard.model.named_modules():
        if type(m) is qmm.LeanSwitchGLU:
            m.__class__ = SwitchGLU
            n += 1
    return n


def lean(args) -> None:
    model, _ = load_model(Path(args.model))
    layers = layers_of(args.model)
    lean_shard, plain_shard = shard_mod.load_shard(args.model, 0, layers), shard_mod.load_shard(args.model, 0, layers)
    if not any(type(m) is qmm.LeanSwitchGLU for _, m in lean_shard.model.named_modules()):
        qmm.guard(lean_shard.model)  # the CPU: guarded by hand, to compare
    print("lean modules given back to mlx-lm in the plain shard:", plain_experts(plain_shard), flush=True)
    ref = mlx_lm_reference(model, args.tokens)
    forced = [t for t, _ in ref]
    for name, shard in (("lean", lean_shard), ("plain", plain_shard)):
        got = stage_loop(shard, "x" + name, args.tokens, forced)
        agree = sum(a[0] == b[0] for a, b in zip(got, ref))
        diff = max(abs(a[1] - b[1]) for a, b in zip(got, ref))
        print(
            f"{name}: argmax agrees with mlx-lm at {agree}/{args.tokens} teacher-forced steps, max |logprob diff| {diff:.5f}"
        )
    res: dict[str, list[float]] = {}
    mlx_lm_loop(model, args.tokens)  # warm up
    stage_loop(lean_shard, "w0", args.tokens)
    stage_loop(plain_shard, "w1", args.tokens)
    for r in range(args.rounds):
        res.setdefault("mlx-lm", []).append(mlx_lm_loop(model, args.tokens))
        res.setdefault("1 stage lean", []).append(stage_loop(lean_shard, f"a{r}", args.tokens))
        res.setdefault("1 stage plain", []).append(stage_loop(plain_shard, f"b{r}", args.tokens))
        print(r, {k: round(v[-1], 3) for k, v in res.items()}, flush=True)
    print("median ms", {k: round(statistics.median(v), 3) for k, v in res.items()})
    print("min ms", {k: round(min(v), 3) for k, v in res.items()})


def primitives(args) -> None:
    model, _ = load_model(Path(args.model))
    shard = shard_mod.load_shard(args.model, 0, layers_of(args.model))
    shard_mod.Shard.decode_eval_every = property(lambda self: 0)  # one graph for the whole step, nothing started

    def count(out) -> str:
        f = io.StringIO()
        mx.export_to_dot(f, out)
        c = Counter(re.findall(r'label\s*=\s*"([A-Za-z_0-9]+)', f.getvalue()))
        return f"{sum(c.values())} primitives, {sum(v for k, v in c.items() if k not in VIEWS)} not views"

    cache = make_prompt_cache(model)
    y = mx.argmax(model(mx.array([PROMPT]), cache=cache)[:, -1], -1)
    stage = Stage(shard, max_requests=4, max_context=4096, compiled_decode=True)
    token = stage.forward_many([Step("p", 0, mx.array([PROMPT], dtype=mx.int32), True, {})])[0].token
    kv = stage.requests["p"].cache
    yk = mx.array([token])
    for _ in range(3):  # warm: compiled segments traced, kernels built
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], -1)
        yk = mx.argmax(shard.decode(yk.reshape(1, 1).astype(mx.int32), kv, head=True)[:, -1], -1)
        mx.eval(y, yk)
    y1 = mx.argmax(model(y[:, None], cache=cache)[:, -1], -1)
    print("mlx-lm step:", count(y1), flush=True)
    yk1 = mx.argmax(shard.decode(yk.reshape(1, 1).astype(mx.int32), kv, head=True)[:, -1], -1)
    print("kimizmq step:", count(yk1), flush=True)
    mx.eval(y1, yk1)
    if not args.ncu:
        return
    cudart = None
    for path in glob.glob(str(Path(mx.__file__).parents[2] / "nvidia/**/libcudart.so*"), recursive=True) + [
        "libcudart.so.13",
        "libcudart.so",
    ]:
        try:
            cudart = ctypes.CDLL(path)
            break
        except OSError:
            continue
    if cudart is None:
        raise SystemExit("--ncu: no libcudart found")
    for rep in range(2):  # one step each between cudaProfilerStart/Stop; a step ends with its argmax kernel
        mx.synchronize()
        cudart.cudaProfilerStart()
        y1 = mx.argmax(model(y1[:, None], cache=cache)[:, -1], -1)
        mx.eval(y1)
        cudart.cudaProfilerStop()
        mx.synchronize()
        cudart.cudaProfilerStart()
        yk1 = mx.argmax(shard.decode(yk1.reshape(1, 1).astype(mx.int32), kv, head=True)[:, -1], -1)
        mx.eval(yk1)
        cudart.cudaProfilerStop()
        print("profiled round", rep, "(mlx-lm, then kimizmq)", flush=True)


def hop(args) -> None:
    """A two-stage step in one process, without sockets: each stage's compute, and
    what carrying its output to the next stage costs (wire.encode, wire.decode), per
    token; then the same layers as one stage."""
    n = layers_of(args.model)
    shards = shard_mod.load_shard(args.model, 0, n // 2), shard_mod.load_shard(args.model, n // 2, n)
    stages = [Stage(s, max_requests=4, max_context=4096, compiled_decode=True) for s in shards]

    def pipeline(req: str, tokens: int) -> dict[str, float]:
        ids, offset, parts = mx.array([PROMPT], dtype=mx.int32), 0, {}
        for i in range(tokens + 1):
            t = [time.perf_counter()]
            act = stages[0].forward_many([Step(req, offset, ids, False, {})])[0].activations
            t.append(time.perf_counter())
            head = {"req": req, "seq": i, "offset": offset, "sample": True, "params": {}}
            frames = wire.encode("forward", head, [act])
            t.append(time.perf_counter())
            act = wire.decode(frames).tensors[0]
            t.append(time.perf_counter())
            token = stages[1].forward_many([Step(req, offset, act, True, {})])[0].token
            t.append(time.perf_counter())
            ids = wire.decode(wire.encode("forward", head, [mx.array([[token]], dtype=mx.int32)])).tensors[0]
            t.append(time.perf_counter())
            offset += PROMPT_LEN if i == 0 else 1
            if i == 0:
                continue  # the prompt
            for k, name in enumerate(["stage 1", "encode", "decode", "stage 2", "token there"]):
                parts[name] = parts.get(name, 0.0) + 1e3 * (t[k + 1] - t[k]) / tokens
        for s in stages:
            s.release(req)
        parts["total"] = sum(parts.values())
        return parts

    whole = shard_mod.load_shard(args.model, 0, n)
    pipeline("w", 8)
    stage_loop(whole, "w", 8)
    for r in range(args.rounds):
        parts = pipeline(f"p{r}", args.tokens)
        print(
            r,
            {k: round(v, 3) for k, v in parts.items()},
            "one stage:",
            round(stage_loop(whole, f"s{r}", args.tokens), 3),
            flush=True,
        )


def batch(args) -> None:
    """ms per batched decode step of B requests (one stage, all layers), and what
    one MoE layer's parts take for B tokens in isolation."""
    n = layers_of(args.model)
    shard = shard_mod.load_shard(args.model, 0, n)
    stage = Stage(shard, max_requests=16, max_context=4096, compiled_decode=True)
    reqs = [f"r{i}" for i in range(8)]
    for r in reqs:
        stage.forward_many([Step(r, 0, mx.array([PROMPT], dtype=mx.int32), False, {})])
    offsets = dict.fromkeys(reqs, PROMPT_LEN)

    def step(group: list[str]) -> None:
        stage.forward_many([Step(r, offsets[r], mx.array([[3]], dtype=mx.int32), True, {}) for r in group])
        for r in group:
            offsets[r] += 1

    def timed(f, reps: int) -> float:
        for _ in range(3):
            f()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        return 1e3 * (time.perf_counter() - t0) / reps

    for b in (1, 2, 4, 8):
        print(f"B={b}: {timed(lambda g=reqs[:b]: step(g), args.tokens):.3f} ms a step", flush=True)
    moe = next(layer.mlp for layer in shard.layers if hasattr(layer.mlp, "switch_mlp"))
    hidden = shard.config["hidden_size"]
    for b in (1, 2, 4, 8):
        x = mx.random.normal((b, 1, hidden)).astype(shard.dtype)
        inds, _ = moe.gate(x)
        parts = {
            "gate": lambda x=x: mx.eval(moe.gate(x)),
            "routed experts": lambda x=x, inds=inds: mx.eval(moe.switch_mlp(x, inds)),
            "shared expert": lambda x=x: mx.eval(moe.shared_experts(x)),
            "attention in (q_a_proj)": lambda x=x: mx.eval(shard.layers[1].self_attn.q_a_proj(x)),
        }
        print(f"B={b}: " + ", ".join(f"{k} {1e3 * timed(f, 50):.0f} us" for k, f in parts.items()), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["build-eval", "by-layer", "lean", "primitives", "hop", "batch"])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ncu", action="store_true", help="primitives: also profile one step of each")
    args = ap.parse_args()
    modes = {
        "build-eval": build_eval,
        "by-layer": by_layer,
        "lean": lean,
        "primitives": primitives,
        "hop": hop,
        "batch": batch,
    }
    modes[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
