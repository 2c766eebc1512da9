"""Constrained decoding with llguidance: grammars for `response_format` and
forced tool calls, and the logits processor that keeps the last stage's
sampling inside one.

llguidance (guidance-ai) compiles JSON schemas and Lark grammars (Kimi's
special tokens included, written `<|name|>`) against the model's own
tokenizer and computes each step's allowed-token mask on the CPU, token by
token, with no precomputation: what a stage needs when any request may bring
a new schema. The grammar travels to the last stage as a string in the
forward header's params; the coordinator validates it first.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from .tokenizer import TiktokenTokenizer, Tokenizer, load_tokenizer
from .toolcalls import ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END

MAX_GRAMMAR_BYTES = 32 * 1024  # the forward header that carries it is at most 64 KiB
MAX_PARALLEL_CALLS = 8  # calls in one forced section
COMPACT = {"whitespace_flexible": False}  # JSON without free whitespace: random weights would write only that


class GrammarError(ValueError):
    """A schema or grammar that cannot constrain this model's output."""


def lltokenizer(tokenizer: Tokenizer) -> LLTokenizer:
    """The tokenizer as llguidance sees it; every end-of-sequence token ends a grammar."""
    eos = sorted(tokenizer.eos_token_ids)
    if isinstance(tokenizer, TiktokenTokenizer):
        from llguidance.tiktoken import lltokenizer_from_encoding

        return lltokenizer_from_encoding(tokenizer.encoding, eos_token=eos)
    from llguidance.hf import from_tokenizer

    return from_tokenizer(tokenizer.hf, eos_token=eos)


@functools.cache
def _model_lltokenizer(model_dir: Path) -> LLTokenizer:
    return lltokenizer(load_tokenizer(model_dir))


def json_schema_grammar(schema: dict) -> str:
    """A grammar for one JSON value valid against `schema`, compact."""
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)
    except ValueError as e:
        raise GrammarError(f"not a usable JSON schema: {e}") from None


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal is a JSON string


def tool_call_grammar(tools: list[dict], *, parallel: bool) -> str:
    """A grammar for a Kimi tool-call section calling only `tools` (OpenAI
    function tools), each call's arguments valid against its parameters."""
    rules, names = [], []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        schema = {**(fn.get("parameters") or {"type": "object"}), "x-guidance": COMPACT}
        names.append(f"call{i}")
        rules.append(
            f"call{i}: {CALL_BEGIN} {_lark_string('functions.' + fn['name'] + ':')} /[0-9]{{1,3}}/ "
            f"{ARGUMENT_BEGIN} %json {json.dumps(schema)} {CALL_END}"
        )
    calls = f"call{{1,{MAX_PARALLEL_CALLS}}}" if parallel else "call"
    lark = "\n".join(
        [f"start: {SECTION_BEGIN} {calls} {SECTION_END}", f"call: {' | '.join(names)}", *rules],
    )
    return LLMatcher.grammar_from_lark(lark)


def check_grammar(grammar: str, tokenizer: LLTokenizer) -> None:
    """Raise GrammarError unless `grammar` compiles for `tokenizer`."""
    if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the schema is too large: its grammar is over {MAX_GRAMMAR_BYTES} bytes")
    error = LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise GrammarError(error)


class GrammarConstraint:
    """A logits processor (mlx-lm's shape) allowing only tokens that keep the
    output inside the grammar; once it is complete, only end-of-sequence."""

    def __init__(self, grammar: object, vocab: int, model_dir: Path):
        if not isinstance(grammar, str):
            raise GrammarError("grammar must be a string")
        self.tokenizer = _model_lltokenizer(model_dir)
        self.matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.vocab = vocab
        self.consumed = 0
        self.bitmask = allocate_token_bitmask(1, self.tokenizer.vocab_size)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size > self.consumed:
            self.matcher.consume_tokens(tokens[self.consumed :].tolist())
            self.consumed = tokens.size
        if self.matcher.is_error():  # a token it did not allow: only a bug gets here
            raise GrammarError(f"the output left its grammar: {self.matcher.get_error()}")
        fill_next_token_bitmask(self.matcher, self.bitmask)
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: self.vocab]
        if allowed.size < self.vocab:  # the model's head is wider than its tokenizer
            allowed = np.pad(allowed, (0, self.vocab - allowed.size))
        return mx.where(mx.array(allowed.astype(bool)), logits, -mx.inf)
