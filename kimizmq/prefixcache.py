"""The prefix cache: the states of finished requests, kept so that a new
request starting with the same tokens prefills only the rest.

The coordinator owns the index (`PrefixIndex`): which tokens each entry
holds, its LRU order and every stage's byte budget. Each stage keeps its part
of every entry (`PrefixStore`) under the coordinator's entry id. Entries are
named, used and evicted by the coordinator on every stage at once, so all
stages use the same prefix length for a request or none does: a stage that
lacks an entry fails the request's first chunk, and the request runs again
from 0 everywhere.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, PromptTrie

_TRIE_MODEL = "model"  # PromptTrie keys its tries by model; the coordinator serves one


def clone_state(cache: list, length: int) -> list:
    """New per-layer state objects for `cache`'s first `length` tokens. The
    arrays are shared: MLX copies a buffer when one side writes to it, so the
    entry stays as it was and each request pays one copy of what it extends."""
    out = []
    for c in cache:
        if isinstance(c, KVCache):
            out.append(KVCache.from_state((c.keys[...], c.values[...], length)))
        elif isinstance(c, ArraysCache):
            out.append(ArraysCache.from_state(([a if a is None else a[...] for a in c.cache], None, None)))
        else:
            raise TypeError(f"the prefix cache cannot keep a {type(c).__name__}")
    return out


def compact(cache: list, length: int) -> list:
    """`cache` holding exactly its first `length` tokens: a KV cache's buffers
    grow in steps of 256 tokens, and an entry should cost what it holds."""
    out = []
    for layer in cache:
        if isinstance(layer, KVCache) and layer.keys is not None and layer.keys.shape[2] > length:
            keys, values = mx.contiguous(layer.keys[..., :length, :]), mx.contiguous(layer.values[..., :length, :])
            layer = KVCache.from_state((keys, values, length))  # noqa: PLW2901 - the compact copy replaces it
        out.append(layer)
    mx.eval([a for c in out for a in ((c.keys, c.values) if isinstance(c, KVCache) else c.cache) if a is not None])
    return out


def trimmable(cache: list) -> bool:
    """Whether a shorter prefix of `cache` can be used: attention caches only
    (a recurrent state holds its whole past)."""
    return all(isinstance(c, KVCache) for c in cache)


# -- a stage's side ----------------------------------------------------------------


@dataclass
class Kept:
    cache: list
    length: int  # tokens it holds
    nbytes: int
    trimmable: bool


class PrefixMissing(LookupError):
    """The coordinator named an entry this stage does not hold (it restarted)."""


class PrefixStore:
    """One stage's parts of the prefix cache's entries, by entry id. It evicts
    nothing on its own (the coordinator drops entries on every stage at once,
    before it asks for a new one where that would not fit) and never holds
    more than its budget: an entry that does not fit is not kept."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: dict[str, Kept] = {}
        self.nbytes = 0
        self.counters = {
            "prefix_hits": 0,
            "prefix_tokens_reused": 0,
            "prefix_kept": 0,
            "prefix_refused": 0,
            "prefix_dropped": 0,
        }

    def keep(self, entry: str, cache: list, length: int) -> Kept | None:
        """Keep a finished request's state; None if it is empty or does not
        fit in what the budget leaves."""
        if length <= 0:
            return None
        cache = compact(cache, length)
        nbytes = sum(c.nbytes for c in cache)
        if self.nbytes + nbytes > self.budget_bytes:
            self.counters["prefix_refused"] += 1
            return None
        kept = self.entries[entry] = Kept(cache, length, nbytes, trimmable(cache))
        self.nbytes += nbytes
        self.counters["prefix_kept"] += 1
        return kept

    def take(self, entry: str, length: int) -> list:
        """A request's own state holding the entry's first `length` tokens."""
        kept = self.entries.get(entry)
        if kept is None:
            raise PrefixMissing(f"prefix cache entry {entry} is not held here (worker restarted?)")
        if length > kept.length or (length < kept.length and not kept.trimmable):
            raise ValueError(f"prefix cache entry {entry} holds {kept.length} tokens, cannot start at {length}")
        self.counters["prefix_hits"] += 1
        self.counters["prefix_tokens_reused"] += length
        return clone_state(kept.cache, length)

    def drop(self, entries: list[str] | None) -> int:
        """Forget the named entries (None: all); how many were held."""
        ids = list(self.entries) if entries is None else [e for e in entries if e in self.entries]
        for e in ids:
            self.nbytes -= self.entries.pop(e).nbytes
        self.counters["prefix_dropped"] += len(ids)
        return len(ids)

    def stats(self) -> dict:
        return {
            **self.counters,
            "prefix_entries": len(self.entries),
            "prefix_bytes": self.nbytes,
            "prefix_budget_bytes": self.budget_bytes,
        }


# -- the coordinator's side --------------------------------------------------------


@dataclass
class Entry:
    id: str
    tokens: list[int]  # the prefix every stage holds (at least)
    trimmable: bool = True
    # worker -> bytes: expected when the entry is made, what the stage kept once it reports
    nbytes: dict[str, int] = field(default_factory=dict)
    announced: bool = False  # its release is on the wire: a request may name it

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class Hit:
    entry: str
    length: int  # tokens the request starts with from the entry


class PrefixIndex:
    """Which token prefixes the stages hold, LRU within each stage's byte
    budget. `finish` names a finished request's state for the stages to keep;
    it is usable once `announce`d (its release sent), as every stage receives
    the release that keeps it before the chunk of a later request that names
    it (one PUSH/PULL path, in order); a stage that could not keep it answers
    that chunk with an error and the request runs from 0 on every stage.
    `lookup` finds the longest usable prefix (mlx-lm's PromptTrie); `ack`
    takes each stage's report."""

    def __init__(self, budgets: dict[str, int]):
        self.budgets = budgets  # worker -> bytes; every worker is a stage
        self.trie = PromptTrie()
        self.entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self.pinned: dict[str, int] = {}  # entries a request named that is not yet on the wire
        self.per_token: dict[str, float] = {}  # worker -> the most bytes per token an entry took there
        self.can_trim = True  # until a stage reports a state that cannot be cut shorter
        self._ids = (f"p{secrets.token_hex(3)}-{i}" for i in itertools.count())
        self.counters = {"hits": 0, "misses": 0, "tokens_reused": 0, "evictions": 0, "entries_kept": 0}

    @property
    def enabled(self) -> bool:
        return bool(self.budgets) and all(b > 0 for b in self.budgets.values())

    # -- requests -------------------------------------------------------------

    def lookup(self, tokens: list[int]) -> Hit | None:
        """The entry sharing the longest prefix with `tokens` and how many of
        its tokens to use: at most all but the last token (whose logits the
        request needs); a recurrent state only at its whole length."""
        if not self.entries or len(tokens) < 2:
            self.counters["misses"] += 1
            return None
        found = self.trie.search(_TRIE_MODEL, tokens)
        limit = len(tokens) - 1
        best: Hit | None = None
        candidates = [
            (found.exact, limit),
            (found.shorter, len(found.shorter or ())),
            (found.longer, found.common_prefix),
        ]
        for path, shared in candidates:
            if not path:
                continue
            entry = self.entries[self.trie.get(_TRIE_MODEL, path)]
            use = min(shared, limit, entry.length)
            if not entry.announced or use <= 0 or (use < entry.length and not entry.trimmable):
                continue
            if best is None or use > best.length:
                best = Hit(entry.id, use)
        if best is None:
            self.counters["misses"] += 1
            return None
        self.entries.move_to_end(best.entry)
        self.counters["hits"] += 1
        self.counters["tokens_reused"] += best.length
        return best

    def pin(self, entry: str) -> None:
        """Kept until `unpin`: a request that named it is not yet on the wire
        (a drop sent now could overtake it)."""
        self.pinned[entry] = self.pinned.get(entry, 0) + 1

    def unpin(self, entry: str) -> None:
        if self.pinned.get(entry, 0) > 1:
            self.pinned[entry] -= 1
        else:
            self.pinned.pop(entry, None)

    def finish(self, tokens: list[int]) -> tuple[str | None, list[str]]:
        """A finished request every stage has run `tokens` of (at least): an
        entry id for its release to keep, or None; and the entries every stage
        must drop first, to make room for it or because it replaces them."""
        if not self.enabled or len(tokens) < 2:
            return None, []
        estimate = {w: math.ceil(len(tokens) * r) for w, r in self.per_token.items()}
        if any(estimate.get(w, 0) > b for w, b in self.budgets.items()):
            return None, []  # larger than a whole budget
        drop = []
        same = self.trie.search(_TRIE_MODEL, tokens).exact
        if same is not None:  # the same tokens again: this one replaces it
            older = self.trie.get(_TRIE_MODEL, same)
            if older in self.pinned:
                return None, []
            drop.append(self._remove(older))
        entry = Entry(next(self._ids), list(tokens), trimmable=self.can_trim, nbytes=estimate)
        self.trie.add(_TRIE_MODEL, entry.tokens, entry.id)
        self.entries[entry.id] = entry
        if entry.trimmable:  # entries that are prefixes of this one only take room
            for _, older in self.trie.pop_prefixes(_TRIE_MODEL, entry.tokens):
                if older in self.pinned:
                    self.trie.add(_TRIE_MODEL, self.entries[older].tokens, older)
                else:
                    drop.append(self._remove(older, in_trie=False))
        drop += self._evict(keep=entry.id)
        held = self.bytes_by_worker()
        if any(held[w] > b for w, b in self.budgets.items()):  # the rest is pinned: no room now
            self._remove(entry.id)
            return None, drop
        self.counters["entries_kept"] += 1
        return entry.id, drop

    def announce(self, entry_id: str) -> None:
        """The release that keeps the entry has been sent: from now on a
        request may name it (its chunk reaches every stage behind the release)."""
        if entry_id in self.entries:
            self.entries[entry_id].announced = True

    def forget(self, entry_id: str) -> list[str]:
        """A stage lacks the entry (a chunk naming it failed there): nobody may use it."""
        return [self._remove(entry_id)] if entry_id in self.entries else []

    # -- the stages' reports ----------------------------------------------------

    def ack(self, entry_id: str, worker: str, length: int, nbytes: int, can_trim: bool) -> list[str]:
        """A stage's report on an entry it was asked to keep; the entries to drop everywhere."""
        entry = self.entries.get(entry_id)
        if entry is None or worker not in self.budgets:
            return [entry_id] if length > 0 else []  # dropped meanwhile (or a stranger's): not kept
        if length > 0:
            self.per_token[worker] = max(self.per_token.get(worker, 0.0), nbytes / length)
            self.can_trim &= can_trim
            entry.trimmable &= can_trim
        if length < entry.length or (not can_trim and length != entry.length):
            return [self._remove(entry_id)]  # it could not keep what the others will use
        entry.nbytes[worker] = nbytes
        return self._evict()

    def clear(self) -> list[str]:
        """Forget every entry (a stage restarted and holds none): the ids to
        drop on the stages that still hold them."""
        ids = list(self.entries)
        self.entries.clear()
        self.trie = PromptTrie()
        return ids

    # -- budget -----------------------------------------------------------------

    def bytes_by_worker(self) -> dict[str, int]:
        return {w: sum(e.nbytes.get(w, 0) for e in self.entries.values()) for w in self.budgets}

    def _evict(self, keep: str | None = None) -> list[str]:
        """Least recently used entries (not `keep`, not pinned) until every
        stage is within its budget."""
        held = self.bytes_by_worker()
        drop = []
        for entry_id in list(self.entries):
            if all(held[w] <= b for w, b in self.budgets.items()):
                break
            if entry_id in self.pinned or entry_id == keep:
                continue
            entry = self.entries[entry_id]
            for w in held:
                held[w] -= entry.nbytes.get(w, 0)
            drop.append(self._remove(entry_id))
            self.counters["evictions"] += 1
        return drop

    def _remove(self, entry_id: str, *, in_trie: bool = True) -> str:
        entry = self.entries.pop(entry_id)
        if in_trie:
            self.trie.pop(_TRIE_MODEL, entry.tokens)
        return entry_id

    def stats(self) -> dict:
        return {
            **self.counters,
            "entries": len(self.entries),
            "bytes_by_worker": self.bytes_by_worker(),
            "budget_bytes_by_worker": dict(self.budgets),
        }
