"""What constrained decoding and the other logits processors cost per token on
the last stage: the stage's own sampling (kimizmq.stage) on random logits the
width of the model's vocabulary, with no processor, with penalties and a logit
bias, and with an llguidance grammar (a JSON schema, a forced tool call).

    python tools/grammar_cost.py [--kimi-tokenizer ../shared/reference/kimi-k2-instruct] [--tokens 400]

Prints a table (microseconds per sampled token, over the base) and writes
grammar_cost.json. The test model's tokenizer (1,280 ids) is always measured;
with --kimi-tokenizer the real Kimi vocabulary (163,840 ids) too.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kimizmq.grammar import json_schema_grammar, tool_call_grammar  # noqa: E402
from kimizmq.logits import make_processors  # noqa: E402
from kimizmq.stage import RequestState, SamplingParams, sample  # noqa: E402
from kimizmq.testmodel import make_test_model  # noqa: E402
from kimizmq.tokenizer import load_tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}


def cases() -> dict[str, dict]:
    return {
        "none": {},
        "penalties + logit_bias": {
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "repetition_penalty": 1.1,
            "logit_bias": [[i, 1.0] for i in range(0, 600, 2)],
        },
        "json_schema": {"grammar": json_schema_grammar(SCHEMA)},
        "forced tool call": {"grammar": tool_call_grammar([TOOL], parallel=False)},
    }


def measure(model_dir: Path, vocab: int, params: dict, tokens: int) -> dict:
    """Sample `tokens` tokens from random logits through the stage's sampler,
    a fresh request whenever one ends (an end-of-sequence token)."""
    eos = load_tokenizer(model_dir).eos_token_ids
    done, spent, setup, requests = 0, 0.0, 0.0, 0
    while done < tokens:
        t0 = time.perf_counter()
        state = RequestState(None, SamplingParams(temperature=1.0, seed=requests))
        state.processors = make_processors(params, vocab, model_dir)
        setup += time.perf_counter() - t0
        requests += 1
        for position in range(tokens - done):
            logits = mx.random.normal((1, vocab), key=mx.random.key(done))
            mx.eval(logits)
            t0 = time.perf_counter()
            result = sample(logits, state, position)
            spent += time.perf_counter() - t0
            done += 1
            if result.token in eos:
                break
    return {"us_per_token": 1e6 * spent / done, "setup_ms": 1e3 * setup / requests, "requests": requests}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kimi-tokenizer", type=Path, help="a folder with Kimi's tiktoken.model and tokenizer_config.json")
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path("grammar_cost.json"))
    args = ap.parse_args()
    models = {"test model (1,280 ids)": (make_test_model(Path("models/test-kimi-k2-tiny-seed0-layers7")), 1280)}
    if args.kimi_tokenizer:
        kimi = Path(tempfile.mkdtemp()) / "kimi-tokenizer"
        kimi.mkdir()
        for name in ("tiktoken.model", "tokenizer_config.json"):
            (kimi / name).symlink_to(args.kimi_tokenizer.resolve() / name)
        models["Kimi-K2 vocabulary (163,840 ids)"] = (kimi, 163840)
    rows = []
    print(f"{'vocabulary':34} {'processors':24} {'us/token':>9} {'over base':>10} {'setup ms':>9}")
    for label, (model_dir, vocab) in models.items():
        base = None
        for case, params in cases().items():
            r = measure(model_dir, vocab, params, args.tokens)
            base = r["us_per_token"] if base is None else base
            row = {"vocabulary": label, "processors": case, **r, "over_base_us": r["us_per_token"] - base}
            rows.append(row)
            print(f"{label:34} {case:24} {r['us_per_token']:9.0f} {row['over_base_us']:10.0f} {r['setup_ms']:9.1f}")
    out = {"device": str(mx.default_device()), "machine": platform.machine(), "tokens": args.tokens, "rows": rows}
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
