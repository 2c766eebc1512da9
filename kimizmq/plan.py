"""Which worker holds which layers, decided from measured bytes before anything loads.

Stages follow the order of [[workers]] in kimi.toml: the first holds
embed_tokens, the last the final norm and lm_head. Each stage reserves memory
for its KV caches (max_context x max_concurrent tokens on each of its layers),
a runtime margin and its prefix cache's budget; a worker may use
memory_fraction of its memory (or of max_memory_gb, if lower).

Placement is an exact search over contiguous splits (61 layers and a handful
of workers make that instant):
  memory     minimize the highest (weights + KV) / (usable - margin) over the
             stages, so every worker fills the same share of what it has;
  bandwidth  minimize the slowest stage, weight bytes / bandwidth_gbs, among
             splits where every stage fits.
Ties go to the split whose stages are most even (least sum of squares).
Explicit `layers = [start, end]` are kept as written; the other workers share
what is left, in order.

Memory sizes are in GiB (2^30 bytes): memory_gb = 192 means a 192 GB Mac,
which has 192 GiB of RAM.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from .checkpoint import read_config
from .config import Config, WorkerConfig
from .sizes import (
    LayerSizes,
    cache_bytes_per_layer,
    config_dtype_bytes,
    layer_sizes,
)

GIB = 1 << 30
AUTO_PREFIX_FRACTION = 0.5  # of a stage's free memory the prefix cache takes unless runtime.prefix_cache_gb says
RUNTIME_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
WIRED_LIMIT_HINT = (
    "macOS lets the GPU wire only about 75% of RAM by default; to use more, run "
    "`sudo sysctl iogpu.wired_limit_mb=<MB>` on that Mac and raise [plan] memory_fraction to match"
)


class PlanError(ValueError):
    """No usable plan: which worker is short and by how much, or which override is wrong.

    `plan` is the closest plan found when the model does not fit, None when
    the configuration itself is wrong.
    """

    def __init__(self, message: str, plan: Plan | None = None):
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class StageAssignment:
    worker: str
    start: int  # first layer
    end: int  # one past the last layer
    weight_bytes: int
    reserved_bytes: int  # KV caches + runtime margin + the prefix cache's budget
    memory_bytes: int  # usable: memory_fraction x min(memory_gb, max_memory_gb)
    prefix_cache_bytes: int = 0  # of reserved_bytes: finished requests' states kept for reuse

    @property
    def load_reserve_bytes(self) -> int:
        """What the stage needs beside its weights the moment it loads: the
        prefix cache fills only as requests finish."""
        return self.reserved_bytes - self.prefix_cache_bytes

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def free_bytes(self) -> int:
        """Negative when the stage does not fit."""
        return self.memory_bytes - self.weight_bytes - self.reserved_bytes

    @property
    def layers_phrase(self) -> str:
        """ "layers 0-43", or "layer 5" for one."""
        return f"layer{'s' if self.num_layers > 1 else ''} {self.layers_label}"

    @property
    def layers_label(self) -> str:
        return _span(self.start, self.end)


@dataclass(frozen=True)
class Plan:
    stages: list[StageAssignment]
    total_weight_bytes: int
    estimated: bool
    balance: str = "memory"
    num_layers: int = 0

    @property
    def fits(self) -> bool:
        return all(s.free_bytes >= 0 for s in self.stages)

    def stage(self, worker: str) -> StageAssignment:
        for s in self.stages:
            if s.worker == worker:
                return s
        raise KeyError(f"the plan has no stage for worker {worker!r}")

    def to_json(self) -> dict:
        return {
            "stages": [
                {
                    "worker": s.worker,
                    "start": s.start,
                    "end": s.end,
                    "weight_bytes": s.weight_bytes,
                    "reserved_bytes": s.reserved_bytes,
                    "prefix_cache_bytes": s.prefix_cache_bytes,
                    "memory_bytes": s.memory_bytes,
                }
                for s in self.stages
            ],
            "total_weight_bytes": self.total_weight_bytes,
            "estimated": self.estimated,
            "fits": self.fits,
        }


def _span(start: int, end: int) -> str:
    """Layers [start, end) as people say them, inclusive: [0, 44) is "0-43"."""
    return str(start) if end - start == 1 else f"{start}-{end - 1}"


def format_gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _usable_bytes(cfg: Config, w: WorkerConfig) -> int:
    memory_gb = w.memory_gb if w.max_memory_gb is None else min(w.memory_gb, w.max_memory_gb)
    return int(cfg.plan.memory_fraction * memory_gb * GIB)


def kv_dtype_bytes(cfg: Config, model_config: dict) -> int:
    """Bytes per cached value: the runtime dtype, or for "auto" the checkpoint's
    dtype (what Metal workers compute in; CPU workers use float32)."""
    return RUNTIME_DTYPE_BYTES.get(cfg.runtime.dtype) or config_dtype_bytes(model_config)


def _validate(cfg: Config, n: int) -> None:
    """Reject overrides and settings no plan can honour, saying why."""
    workers = cfg.workers
    src = cfg.path
    if len(workers) > n:
        raise PlanError(
            f"{src}: {len(workers)} workers but the model has only {n} layers; "
            "every worker needs at least one layer, so remove a worker"
        )
    for w in workers:
        if w.max_memory_gb is not None and w.max_memory_gb <= 0:
            raise PlanError(f"{src}: worker {w.name!r}: max_memory_gb must be > 0")
        if w.layers is None:
            continue
        start, end = w.layers
        if end <= start:
            raise PlanError(
                f"{src}: worker {w.name!r}: layers = [{start}, {end}] is empty; "
                "end must be greater than start (end is exclusive)"
            )
        if start < 0 or end > n:
            raise PlanError(
                f"{src}: worker {w.name!r}: layers = [{start}, {end}] is out of range; "
                f"the model has {n} layers, so ranges lie within [0, {n}]"
            )
    explicit = [w for w in workers if w.layers is not None]
    for i, a in enumerate(explicit):
        for b in explicit[i + 1 :]:
            lo, hi = max(a.layers[0], b.layers[0]), min(a.layers[1], b.layers[1])
            if lo < hi:
                raise PlanError(
                    f"{src}: workers {a.name!r} {list(a.layers)} and {b.name!r} "
                    f"{list(b.layers)} overlap on layer(s) {_span(lo, hi)}; "
                    "each layer must belong to exactly one worker"
                )
    for a, b in itertools.pairwise(explicit):
        if b.layers[0] < a.layers[0]:
            raise PlanError(
                f"{src}: worker {b.name!r} {list(b.layers)} is listed after {a.name!r} "
                f"{list(a.layers)} but holds earlier layers; stages run in the order of "
                "[[workers]], so list the workers in layer order"
            )
    # Between consecutive fixed ranges, the automatic workers listed there
    # share the layers left: there must be some, and enough for one each.
    pos = {w.name: i for i, w in enumerate(workers)}
    prev_end, prev_name, prev_idx = 0, "the start", -1
    for w in [*explicit, None]:
        start = n if w is None else w.layers[0]
        idx = len(workers) if w is None else pos[w.name]
        name = "the end" if w is None else f"worker {w.name!r} {list(w.layers)}"
        auto = [x.name for x in workers[prev_idx + 1 : idx]]
        gap = start - prev_end
        if gap > 0 and not auto:
            raise PlanError(
                f"{src}: layer(s) {_span(prev_end, start)} belong to no worker: none "
                f"is listed between {prev_name} and {name} to hold them; widen an "
                "explicit range, or list a worker without `layers` between them"
            )
        if len(auto) > gap:
            who = ", ".join(map(repr, auto))
            raise PlanError(
                f"{src}: worker(s) {who} between {prev_name} and {name} are left "
                f"{gap} layer(s); every worker needs at least one"
            )
        if w is not None:
            prev_end, prev_name, prev_idx = w.layers[1], name, idx
    if cfg.plan.balance == "bandwidth":
        missing = [w.name for w in workers if w.layers is None and not w.bandwidth_gbs]
        if missing:
            raise PlanError(
                f'{src}: [plan] balance = "bandwidth" needs bandwidth_gbs > 0 for '
                f"worker(s) {', '.join(map(repr, missing))}"
            )


def _split(
    n: int,
    fixed: list[tuple[int, int] | None],
    score: Callable[[int, int, int], float],
) -> list[int] | None:
    """Boundaries 0 = b0 < b1 < ... < bW = n minimizing the largest
    score(worker, start, end), then the sum of squared scores; None when every
    split scores infinite."""
    workers = len(fixed)

    def allowed(i: int, j: int, k: int) -> bool:
        return fixed[i] is None or fixed[i] == (j, k)

    best = [[math.inf] * (n + 1) for _ in range(workers + 1)]
    best[0][0] = 0.0
    for i in range(workers):
        for j in range(i, n):
            if best[i][j] == math.inf:
                continue
            for k in range(j + 1, n + 1):
                if allowed(i, j, k):
                    v = max(best[i][j], score(i, j, k))
                    best[i + 1][k] = min(best[i + 1][k], v)
    bottleneck = best[workers][n]
    if bottleneck == math.inf:
        return None
    limit = bottleneck * (1 + 1e-9)

    total = [[math.inf] * (n + 1) for _ in range(workers + 1)]
    back = [[0] * (n + 1) for _ in range(workers + 1)]
    total[0][0] = 0.0
    for i in range(workers):
        for j in range(i, n):
            if total[i][j] == math.inf:
                continue
            for k in range(j + 1, n + 1):
                if allowed(i, j, k):
                    s = score(i, j, k)
                    if s <= limit and total[i][j] + s * s < total[i + 1][k]:
                        total[i + 1][k] = total[i][j] + s * s
                        back[i + 1][k] = j
    bounds = [n]
    for i in range(workers, 0, -1):
        bounds.append(back[i][bounds[-1]])
    return bounds[::-1]


def make_plan(
    config: Config,
    sizes: LayerSizes | None = None,
    *,
    model_config: dict | None = None,
    count_needed: bool = True,
) -> Plan:
    """The placement of every layer; deterministic, raises PlanError when it does not fit.

    `sizes` and `model_config` default to what config.model_path holds. When
    it does not fit, the error says (`count_needed`) how many workers like the
    largest one the model needs.
    """
    if model_config is None:
        model_config = read_config(config.model_path)
    if sizes is None:
        sizes = layer_sizes(config.model_path)
    n = sizes.num_layers
    _validate(config, n)
    workers = config.workers

    rt = config.runtime
    reserve = [0]
    for b in cache_bytes_per_layer(
        model_config, n, kv_dtype_bytes(config, model_config), rt.max_context, rt.max_concurrent
    ):
        reserve.append(reserve[-1] + b)
    margin = int(config.plan.runtime_margin_gb * GIB)
    # An explicit prefix cache budget must fit like the margin; the automatic
    # one takes part of what the placement leaves free.
    prefix_budget = int(rt.prefix_cache_gb * GIB) if rt.prefix_cache_gb >= 0 else None
    fixed_reserve = margin + (prefix_budget or 0)
    usable = [_usable_bytes(config, w) for w in workers]
    for w, u in zip(workers, usable):
        if u <= margin:
            raise PlanError(
                f"{config.path}: worker {w.name!r} may use {format_gib(u)} "
                f"({config.plan.memory_fraction:.0%} of its memory), no more than the "
                f"{format_gib(margin)} runtime margin; raise memory_gb/max_memory_gb or "
                f"memory_fraction. {WIRED_LIMIT_HINT}"
            )

    prefix = [0]
    for b in sizes.layers:
        prefix.append(prefix[-1] + b)

    def weights(j: int, k: int) -> int:
        total = prefix[k] - prefix[j]
        if j == 0 or (k == n and sizes.tied_embeddings):
            total += sizes.embed_bytes
        if k == n:
            total += sizes.head_bytes
        return total

    def memory_score(i: int, j: int, k: int) -> float:
        return (weights(j, k) + reserve[k] - reserve[j]) / max(usable[i] - fixed_reserve, 1)

    def bandwidth_score(i: int, j: int, k: int) -> float:
        if memory_score(i, j, k) > 1:
            return math.inf
        return weights(j, k) / (workers[i].bandwidth_gbs or math.inf)

    fixed = [w.layers for w in workers]
    bounds = None
    if config.plan.balance == "bandwidth":
        bounds = _split(n, fixed, bandwidth_score)
    if bounds is None:  # memory balance, or the closest miss to report
        bounds = _split(n, fixed, memory_score)

    def prefix_bytes(u: int, j: int, k: int) -> int:
        if prefix_budget is not None:
            return prefix_budget
        return max(0, int(AUTO_PREFIX_FRACTION * (u - weights(j, k) - (reserve[k] - reserve[j]) - margin)))

    stages = []
    for w, u, j, k in zip(workers, usable, bounds, bounds[1:]):
        prefix_cache = prefix_bytes(u, j, k)
        stages.append(
            StageAssignment(
                worker=w.name,
                start=j,
                end=k,
                weight_bytes=weights(j, k),
                reserved_bytes=reserve[k] - reserve[j] + margin + prefix_cache,
                memory_bytes=u,
                prefix_cache_bytes=prefix_cache,
            )
        )
    plan = Plan(
        stages=stages,
        total_weight_bytes=sum(s.weight_bytes for s in stages),
        estimated=sizes.estimated,
        balance=config.plan.balance,
        num_layers=n,
    )
    if not plan.fits:
        message = _shortfall_message(config, plan)
        needed = workers_needed(config, sizes, model_config) if count_needed else None
        if needed is not None:
            message += f" {_needed_phrase(config, needed)}"
        raise PlanError(message, plan)
    return plan


def _largest_worker(cfg: Config) -> WorkerConfig:
    return max(cfg.workers, key=lambda w: _usable_bytes(cfg, w))


def workers_needed(cfg: Config, sizes: LayerSizes, model_config: dict) -> int | None:
    """How many workers like the largest of `cfg` the model needs at its
    memory_fraction, reserve and margin (None: not even one per layer fits)."""
    like = _largest_worker(cfg)
    for n in range(1, sizes.num_layers + 1):
        clones = [dataclasses.replace(like, name=f"{like.name}-{i}", layers=None) for i in range(n)]
        try:
            make_plan(dataclasses.replace(cfg, workers=clones), sizes, model_config=model_config, count_needed=False)
        except PlanError:
            continue
        return n
    return None


def _needed_phrase(cfg: Config, n: int) -> str:
    like = _largest_worker(cfg)
    return (
        f"The model needs {n} workers like {like.name!r} ({like.memory_gb:g} GiB, "
        f"{cfg.plan.memory_fraction:.0%} usable = {format_gib(_usable_bytes(cfg, like))})."
    )


def _shortfall_message(cfg: Config, plan: Plan) -> str:
    parts = []
    explicit = False
    for s in plan.stages:
        if s.free_bytes < 0:
            fixed = cfg.worker(s.worker).layers is not None
            explicit = explicit or fixed
            parts.append(
                f"worker {s.worker!r} is {format_gib(-s.free_bytes)} short: for "
                f"{s.layers_phrase}{' (set in kimi.toml)' if fixed else ''} it needs "
                f"{format_gib(s.weight_bytes)} of weights + {format_gib(s.reserved_bytes)} reserved "
                f"and may use {format_gib(s.memory_bytes)}"
            )
    need = sum(s.weight_bytes + s.reserved_bytes for s in plan.stages)
    have = sum(s.memory_bytes for s in plan.stages)
    if need > have:
        total = f"In all {format_gib(need - have)} is missing ({format_gib(need)} needed, {format_gib(have)} usable)."
    else:
        total = (
            f"In all {format_gib(have)} is usable for {format_gib(need)} needed, but no split into whole layers fits."
        )
    fixes = "add memory or a worker, lower [runtime] max_context or max_concurrent"
    if explicit:
        fixes += ", give fewer explicit layers to the short worker"
    return f"the model does not fit: {'; '.join(parts)}. {total} To fix: {fixes}; or: {WIRED_LIMIT_HINT}."
