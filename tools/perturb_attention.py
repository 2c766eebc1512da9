"""The noise floor of a batched-vs-lone decode comparison: how far does a perturbation of
every layer's attention output (each element times 1 + eps * N(0, 1), about what a
different bf16 kernel changes) move a model's top logprob, teacher-forced, on the CPU in
float32? Slow on 2 cores for the 16-layer Kimi-geometry model (~16 min).

    python tools/perturb_attention.py MODEL_DIR 0.001,0.004
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kimizmq import shard as shard_mod  # noqa: E402
from kimizmq.stage import Stage, Step  # noqa: E402

STEPS = 4
PROMPTS = [[(7 * i + 3 * j) % 900 + 1 for j in range(n)] for i, n in enumerate((20, 33))]


def main() -> int:
    model_dir, epss = sys.argv[1], [float(e) for e in sys.argv[2].split(",")]
    layers = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
    shard = shard_mod.load_shard(model_dir, 0, layers, dtype="float32")
    core, eps, key = shard_mod._attention_core, [0.0], [mx.random.key(1)]

    def noisy(*args, **kwargs):
        out = core(*args, **kwargs)
        key[0], sub = mx.random.split(key[0])
        return out * (1 + eps[0] * mx.random.normal(out.shape, key=sub))

    def run(forced: dict | None) -> tuple[dict, dict]:
        stage = Stage(shard, max_requests=4, max_context=4096, compiled_decode=True)
        tokens, logprobs = {}, {}
        for i, prompt in enumerate(PROMPTS):
            r = f"r{i}"
            res = stage.forward_many([Step(r, 0, mx.array([prompt]), True, {})])[0]
            tokens[r], logprobs[r], offset = [res.token], [res.logprob], len(prompt)
            for k in range(STEPS):
                x = forced[r][k] if forced else tokens[r][-1]
                res = stage.forward_many([Step(r, offset, mx.array([[x]]), True, {})])[0]
                tokens[r].append(res.token)
                logprobs[r].append(res.logprob)
                offset += 1
        return tokens, logprobs

    ref_tokens, ref_logprobs = run(None)
    shard_mod._attention_core = noisy  # Shard.decode looks it up at each call
    for e in epss:
        eps[0] = e
        tokens, logprobs = run(ref_tokens)
        moved = max(abs(a - b) for r in ref_logprobs for a, b in zip(ref_logprobs[r], logprobs[r]))
        same = sum(a == b for r in ref_tokens for a, b in zip(ref_tokens[r], tokens[r]))
        total = sum(len(v) for v in ref_tokens.values())
        print(json.dumps({"eps": e, "max |d top logprob|": round(moved, 4), "greedy tokens same": f"{same}/{total}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
