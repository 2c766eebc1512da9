"""One pipeline stage's compute: each request's state (a KV cache per attention
layer, a recurrent state per linear-attention layer), the forward pass over
the stage's layers, and sampling on the last stage.

Pure compute, no sockets: the worker daemon feeds it decoded messages.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .checkpoint import text_config
from .logits import LogitsProcessor, ParamsError, make_processors, replayed_tokens
from .prefixcache import Kept, PrefixMissing, PrefixStore
from .shard import Shard

MAX_TOP_LOGPROBS = 20
_MASK64 = (1 << 64) - 1


class StageError(ValueError):
    """A forward request this stage cannot run; sent back to the coordinator.
    `code` names a kind of error the coordinator acts on ("prefix_missing")."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    logprobs: int = 0  # how many top alternatives to return per token

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        """Validate a peer's dict; a bad value raises StageError naming it."""
        kwargs = {}
        for name, f in cls.__dataclass_fields__.items():
            if name not in d:
                continue
            v = d[name]
            want = type(f.default)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise StageError(f"sampling parameter {name} must be a number, got {v!r}")
            if want is int and not isinstance(v, int):
                raise StageError(f"sampling parameter {name} must be an integer, got {v!r}")
            kwargs[name] = want(v)
        p = cls(**kwargs)
        if not (0 <= p.temperature < math.inf):
            raise StageError("temperature must be >= 0")
        if not (0 < p.top_p <= 1) or not (0 <= p.min_p < 1):
            raise StageError("top_p must be in (0, 1] and min_p in [0, 1)")
        if p.top_k < 0 or not 0 <= p.logprobs <= MAX_TOP_LOGPROBS:
            raise StageError(f"top_k must be >= 0 and logprobs in 0..{MAX_TOP_LOGPROBS}")
        return p


@dataclass
class RequestState:
    cache: list | None  # None while the request's cache is in a kept batch
    params: SamplingParams
    offset: int = 0
    last_used: float = field(default_factory=time.monotonic)
    processors: list[LogitsProcessor] = field(default_factory=list)  # last stage: bias, penalties, grammar
    sampled: list[int] = field(default_factory=list)  # last stage, with processors: the tokens so far


@dataclass
class ForwardResult:
    """Activations for the next stage, or (last stage) the sampled token."""

    activations: mx.array | None = None
    extra: tuple[mx.array, ...] = ()  # sent on beside the activations (attention-residual blocks)
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[list] | None = None


def _step_key(seed: int, position: int) -> mx.array:
    """A key that depends only on the request's seed and the position being
    sampled: a replayed request samples exactly what it sampled before."""
    return mx.random.key(((seed & _MASK64) ^ (position * 0x9E3779B97F4A7C15)) & _MASK64)


def _sample_lazy(logits: mx.array, state: RequestState, position: int) -> list[mx.array]:
    """[token, its logprob, (top ids, top logprobs)] for one (1, V) row, not yet
    evaluated. The request's processors shape what is sampled; the logprobs
    returned are the model's own."""
    params = state.params
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    scores = logprobs
    if state.processors:
        sampled = mx.array(state.sampled, dtype=mx.int32)
        for processor in state.processors:
            logits = processor(sampled, logits)
        scores = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if params.temperature == 0:
        token = mx.argmax(scores, axis=-1)
    else:
        filtered = scores
        if params.top_p < 1:
            filtered = apply_top_p(filtered, params.top_p)
        if params.min_p > 0:
            filtered = apply_min_p(filtered, params.min_p)
        if params.top_k > 0:
            filtered = apply_top_k(filtered, params.top_k)
        token = mx.random.categorical(filtered * (1 / params.temperature), key=_step_key(params.seed, position))
    outputs = [token, mx.take_along_axis(logprobs, token[:, None], axis=-1)]
    if params.logprobs:
        top_ids = mx.argpartition(-logprobs, params.logprobs - 1, axis=-1)[:, : params.logprobs]
        outputs += [top_ids, mx.take_along_axis(logprobs, top_ids, axis=-1)]
    return outputs


def _sampled(outputs: list[mx.array], state: RequestState) -> ForwardResult:
    result = ForwardResult(token=int(outputs[0].item()), logprob=float(outputs[1].item()))
    if state.processors:
        state.sampled.append(result.token)
    if len(outputs) > 2:
        pairs = sorted(zip(outputs[2][0].tolist(), outputs[3][0].tolist()), key=lambda p: -p[1])
        result.top_logprobs = [[int(i), float(v)] for i, v in pairs]
    return result


def sample(logits: mx.array, state: RequestState, position: int) -> ForwardResult:
    outputs = _sample_lazy(logits, state, position)
    mx.eval(*outputs)
    return _sampled(outputs, state)


@dataclass
class Step:
    """One forward message for this stage."""

    req: str
    offset: int
    x: mx.array
    sample: bool
    params: dict
    extra: tuple[mx.array, ...] = ()  # the message's other tensors: attention-residual blocks
    prefix: tuple[str, int] | None = None  # a new request's start: (prefix cache entry, its tokens to use)


@dataclass
class KeptBatch:
    """The batched KV caches of requests whose decode steps ran together,
    kept for their next step together (mlx-lm's BatchGenerator keeps its
    batch the same way): merging each request's cache into a batch and
    extracting it again copied every cache twice per step, and the merged
    buffer, exactly full, grew (a third copy) at the next step."""

    reqs: tuple[str, ...]  # row b of every cache is reqs[b]
    caches: list  # a BatchKVCache (attention) or a batched ArraysCache (linear attention) per layer


def _cache_arrays(cache) -> list[mx.array]:
    """The arrays one layer's cache holds: keys and values, or recurrent states."""
    arrays = cache.cache if isinstance(cache, ArraysCache) else (cache.keys, cache.values)
    return [a for a in arrays if a is not None]


def _unbatch(caches: list, states: list[RequestState | None]) -> None:
    """Row b of the batched `caches` becomes states[b]'s own cache (None: a
    request no longer open)."""
    for b, state in enumerate(states):
        if state is not None:
            state.cache = [c.extract(b) for c in caches]
    mx.eval([_cache_arrays(c) for state in states if state is not None for c in state.cache])


class Stage:
    """A shard plus the per-request KV caches it holds."""

    def __init__(
        self,
        shard: Shard,
        *,
        max_requests: int,
        max_context: int,
        compiled_decode: bool = False,
        model_dir: Path | None = None,  # where a grammar's tokenizer is read from
        prefix_cache_bytes: int = 0,
    ):
        self.shard = shard
        self.model_dir = model_dir
        # one-token steps (lone or batched) through Shard.decode, where the model allows it
        self.compiled_decode = compiled_decode and shard.can_compile_decode
        self.max_requests = max_requests
        self.max_context = max_context
        self.requests: dict[str, RequestState] = {}
        self.prefix = PrefixStore(prefix_cache_bytes)  # finished requests' states, by the coordinator's entry id
        self.kept: dict[frozenset[str], KeptBatch] = {}  # by the set of requests
        self.compute_s = 0.0
        self.decode_s = 0.0  # of compute_s, in passes of one token per request
        self.decode_build_s = 0.0  # of decode_s, until the pass's graph was built (and partly started)
        self.forwards = 0  # forward passes, a batched one counting once
        self.batched_forwards = 0
        self.batched_steps = 0  # requests served by batched passes
        self.batched_prompt_steps = 0  # of those, prompt chunks (more than one token each)
        self.kept_batch_steps = 0  # batched decode passes that found their batch kept
        self.tokens_in = 0

    @property
    def first(self) -> bool:
        """Whether this stage takes token ids (it holds layer 0)."""
        return self.shard.first

    @property
    def last(self) -> bool:
        """Whether this stage samples (it holds the model's last layer)."""
        return self.shard.last

    def check_input(self, x: mx.array, extra: tuple[mx.array, ...] = ()) -> None:
        """Shapes and dtypes a peer sent, checked before they reach MLX."""
        config = text_config(self.shard.config)
        if self.first:
            if x.ndim != 2 or x.shape[0] != 1 or x.dtype != mx.int32:
                raise StageError(f"first stage expects int32 token ids of shape (1, L), got {x.dtype} {x.shape}")
            vocab = config.get("vocab_size")
            ids = np.asarray(x)  # on the host already: no device round trip for a range check
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise StageError(f"token ids must be in 0..{vocab - 1}")
        else:
            hidden = config["hidden_size"]
            if x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != hidden:
                raise StageError(f"expected activations of shape (1, L, {hidden}), got {x.shape}")
            if not mx.issubdtype(x.dtype, mx.floating):
                raise StageError(f"activations must be floating point, got {x.dtype}")
        blocks = self.shard.blocks_in
        if len(extra) != (1 if blocks else 0):
            raise StageError(
                f"this stage takes {1 if blocks else 0} tensor(s) beside the "
                f"{'activations' if not self.first else 'token ids'}, got {len(extra)}"
            )
        if blocks:
            want = (blocks, 1, x.shape[1], x.shape[2])
            if tuple(extra[0].shape) != want or not mx.issubdtype(extra[0].dtype, mx.floating):
                raise StageError(
                    f"expected float attention-residual blocks of shape {want} (the blocks begun before "
                    f"layer {self.shard.start}), got {extra[0].dtype} {tuple(extra[0].shape)}"
                )
        if x.shape[1] == 0:
            raise StageError("empty chunk")

    def _admit(self, step: Step) -> RequestState:
        """Check a step against the request's state; a first chunk opens the request."""
        self.check_input(step.x, step.extra)
        state = self.requests.get(step.req)
        if state is None:
            if step.offset != (step.prefix[1] if step.prefix else 0):
                raise StageError(f"unknown request {step.req} at offset {step.offset} (released or never started)")
            if len(self.requests) >= self.max_requests:
                raise StageError(f"stage is full: {self.max_requests} requests in flight")
            state = RequestState(self._start_state(step), SamplingParams.from_dict(step.params), offset=step.offset)
            if self.last:
                try:
                    vocab = text_config(self.shard.config)["vocab_size"]
                    state.processors = make_processors(step.params, vocab, self.model_dir)
                    state.sampled = replayed_tokens(step.params, vocab, self.max_context)
                except ParamsError as e:
                    raise StageError(str(e)) from None
            self.requests[step.req] = state
        elif step.offset != state.offset:
            raise StageError(f"request {step.req}: chunk at offset {step.offset}, expected {state.offset}")
        if step.offset + step.x.shape[1] > self.max_context:
            raise StageError(
                f"request {step.req}: {step.offset + step.x.shape[1]} tokens exceed max_context {self.max_context}"
            )
        return state

    def _start_state(self, step: Step) -> list:
        """A new request's state: empty, or the prefix cache's entry it names."""
        if step.prefix is None:
            return self.shard.make_cache()
        try:
            return self.prefix.take(*step.prefix)
        except (PrefixMissing, ValueError) as e:  # the coordinator runs the request again from 0
            raise StageError(str(e), code="prefix_missing") from None

    def _done(self, state: RequestState, length: int, t0: float) -> None:
        self.compute_s += time.perf_counter() - t0
        self.tokens_in += length
        state.offset += length
        state.last_used = time.monotonic()

    def _check_in(self, reqs: set[str] | frozenset[str]) -> None:
        """Every kept batch holding one of `reqs` gives its requests their own
        caches back (those still open) and is dropped."""
        for key in [k for k in self.kept if not k.isdisjoint(reqs)]:
            kept = self.kept.pop(key)
            _unbatch(kept.caches, [self.requests.get(req) for req in kept.reqs])

    def _run(self, step: Step, state: RequestState) -> ForwardResult:
        """One admitted step on its own."""
        self._check_in({step.req})
        length = step.x.shape[1]
        t0 = time.perf_counter()
        if length == 1 and state.offset > 0 and self.compiled_decode:
            out, extra = self.shard.decode(step.x, state.cache, head=step.sample), []
        else:
            out, *extra = self.shard.forward([step.x, *step.extra], state.cache, head=step.sample)
        built = time.perf_counter()
        if self.last and step.sample:
            result = sample(out[:, -1, :], state, step.offset + length)
        else:
            mx.eval(out, *extra)  # also settles this chunk's cache updates
            result = ForwardResult() if self.last else ForwardResult(out, tuple(extra))
        self.forwards += 1
        if length == 1:
            self.decode_s += time.perf_counter() - t0
            self.decode_build_s += built - t0
        self._done(state, length, t0)
        return result

    def forward_many(self, steps: list[Step]) -> list[ForwardResult | StageError]:
        """Steps of distinct requests that met at this stage. Steps of the same
        length run as one batched forward pass over a batched KV cache (left-
        padded where the requests' pasts differ): decode steps of requests in
        flight together, and prompt chunks of prompts that arrived together.
        On the last stage only steps that sample are batched (a chunk that does
        not sample needs no head)."""
        results: list[ForwardResult | StageError | None] = [None] * len(steps)
        groups: dict[int, list[tuple[int, RequestState]]] = {}
        for i, step in enumerate(steps):
            try:
                state = self._admit(step)
            except StageError as e:
                results[i] = e
                continue
            if step.sample or not self.last:
                groups.setdefault(step.x.shape[1], []).append((i, state))
            else:
                results[i] = self._run(step, state)
        for batch in groups.values():
            if len(batch) == 1:
                i, state = batch[0]
                results[i] = self._run(steps[i], state)
                continue
            for (i, _), r in zip(batch, self._forward_batch([steps[i] for i, _ in batch], [s for _, s in batch])):
                results[i] = r
        return results

    def _forward_batch(self, steps: list[Step], states: list[RequestState]) -> list[ForwardResult]:
        """One batched pass. Decode steps keep their batched caches for the
        requests' next step together (`kept`); prompt chunks give each request
        its own cache back."""
        t0 = time.perf_counter()
        length = steps[0].x.shape[1]
        key = frozenset(s.req for s in steps)
        kept = self.kept.pop(key, None) if length == 1 else None
        if kept is None:
            self._check_in(key)
            order = list(range(len(steps)))  # row b of the batch is steps[order[b]]
            caches = [c.merge([s.cache[j] for s in states]) for j, c in enumerate(states[0].cache)]
        else:
            self.kept_batch_steps += 1
            index = {s.req: k for k, s in enumerate(steps)}
            order = [index[req] for req in kept.reqs]
            caches = kept.caches
        rows, row_states = [steps[k] for k in order], [states[k] for k in order]
        x = mx.concatenate([s.x for s in rows], axis=0)
        if length == 1 and self.compiled_decode and all(st.offset > 0 for st in row_states):
            out, extra = self.shard.decode(x, caches, head=True), []
        else:  # the residual blocks, (blocks, B, L, D), batch along axis 1
            inputs = [x, *(mx.concatenate(parts, axis=1) for parts in zip(*(s.extra for s in rows)))]
            out, *extra = self.shard.forward(inputs, caches, head=True)
        built = time.perf_counter()
        if self.last:
            lazy = [
                _sample_lazy(out[b : b + 1, -1, :], st, step.offset + length)
                for b, (step, st) in enumerate(zip(rows, row_states))
            ]
            mx.eval(lazy)
            by_row = [_sampled(o, st) for o, st in zip(lazy, row_states)]
        else:
            mx.eval(out, *extra)
            by_row = [
                ForwardResult(activations=out[b : b + 1], extra=tuple(e[:, b : b + 1] for e in extra))
                for b in range(len(rows))
            ]
        if length == 1:
            self.kept[key] = KeptBatch(tuple(s.req for s in rows), caches)
            for st in row_states:
                st.cache = None
            self.decode_s += time.perf_counter() - t0
            self.decode_build_s += built - t0
        else:
            _unbatch(caches, row_states)
            self.batched_prompt_steps += len(steps)
        self.forwards += 1
        self.batched_forwards += 1
        self.batched_steps += len(steps)
        for st in states:
            self._done(st, length, t0)
            t0 = time.perf_counter()  # count the pass's time once
        results: list[ForwardResult] = [None] * len(steps)  # type: ignore[list-item]
        for b, k in enumerate(order):
            results[k] = by_row[b]
        return results

    def release(self, req: str, keep: str | None = None) -> tuple[bool, Kept | None]:
        """Free a request's state: (whether this stage held it, and where
        `keep` names a prefix cache entry, what the store kept of it)."""
        self._check_in({req})
        state = self.requests.pop(req, None)
        if state is None or keep is None:
            return state is not None, None
        return True, self.prefix.keep(keep, state.cache, state.offset)

    def cache_bytes(self) -> int:
        """KV caches and recurrent states held, own and in kept batches."""
        own = sum(c.nbytes for s in self.requests.values() if s.cache is not None for c in s.cache)
        return own + sum(c.nbytes for kept in self.kept.values() for c in kept.caches)
