"""What the last stage does to the logits before it samples: logit bias,
presence / frequency / repetition penalties (mlx-lm's processors) and a
grammar that constrains the output (kimizmq.grammar).

Each is built once per request from the forward header's `params` and called
as mlx-lm calls its processors: `processor(tokens, logits) -> logits`, with
`tokens` the tokens sampled so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
REPETITION_CONTEXT = 20  # tokens the repetition penalty looks back over (mlx-lm's default)
PENALTY_CONTEXT = 1 << 20  # presence / frequency penalties see every generated token


class ParamsError(ValueError):
    """A processor parameter a peer sent that cannot be used."""


def _number(params: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = params.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi and math.isfinite(v)):
        raise ParamsError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _ids(params: dict, name: str, vocab: int, limit: int) -> list[int]:
    ids = params.get(name, [])
    if (
        not isinstance(ids, list)
        or len(ids) > limit
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)
    ):
        raise ParamsError(f"{name} must be a list of at most {limit} token ids in 0..{vocab - 1}")
    return ids


def replayed_tokens(params: dict, vocab: int, max_context: int) -> list[int]:
    """The tokens a replayed request had sampled before (`sampled`): its processors start from them."""
    return list(_ids(params, "sampled", vocab, max_context))


def make_processors(params: dict, vocab: int, model_dir: Path | None) -> list[LogitsProcessor]:
    """The request's processors, in the order they run: bias, bans,
    penalties, grammar. Each is called with the tokens sampled so far."""
    bias = params.get("logit_bias", [])
    if (
        not isinstance(bias, list)
        or len(bias) > MAX_LOGIT_BIAS
        or not all(
            isinstance(p, list)
            and len(p) == 2
            and isinstance(p[0], int)
            and 0 <= p[0] < vocab
            and isinstance(p[1], (int, float))
            and -100 <= p[1] <= 100
            for p in bias
        )
    ):
        raise ParamsError(f"logit_bias must be up to {MAX_LOGIT_BIAS} [token id, bias in [-100, 100]] pairs")
    processors = make_logits_processors(
        logit_bias={int(t): float(b) for t, b in bias} or None,
        presence_penalty=_number(params, "presence_penalty", 0.0, -2.0, 2.0),
        presence_context_size=PENALTY_CONTEXT,
        frequency_penalty=_number(params, "frequency_penalty", 0.0, -2.0, 2.0),
        frequency_context_size=PENALTY_CONTEXT,
    )
    if banned := _ids(params, "ban", vocab, MAX_LOGIT_BIAS):
        ban = mx.array(banned)
        processors.append(lambda _, logits: logits.at[:, ban].add(-mx.inf))
    repetition = _number(params, "repetition_penalty", 1.0, 1e-3, 10.0)
    if repetition != 1.0:
        # over the prompt's tail (`recent`) and what was sampled since, as mlx-lm does
        (penalty,) = make_logits_processors(repetition_penalty=repetition, repetition_context_size=REPETITION_CONTEXT)
        recent = mx.array(_ids(params, "recent", vocab, REPETITION_CONTEXT), dtype=mx.int32)
        processors.append(lambda tokens, logits: penalty(mx.concatenate([recent, tokens]), logits))
    if "grammar" in params:
        from .grammar import GrammarConstraint

        if model_dir is None:
            raise ParamsError("this stage was loaded without a model directory: it cannot read a grammar")
        try:
            processors.append(GrammarConstraint(params["grammar"], vocab, model_dir))
        except ValueError as e:  # a grammar that does not compile, a tokenizer that does not load
            raise ParamsError(f"grammar: {e}") from None
    return processors
