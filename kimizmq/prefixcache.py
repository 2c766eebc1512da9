"""The prefix cache: the states of finished requests, kept so that a new
request starting with the same tokens prefills only the rest.

The coordinator owns the index (`PrefixIndex`): which tokens each entry
holds, its LRU order and every stage's byte budget. Each stage keeps its part
of every entry (`PrefixStore`) under the coordinator's entry id. An entry is
used only once every stage has reported it kept, and evicted on every stage
at once, so all stages use the same prefix length for a request or none does.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

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
    nothing on its own: the coordinator drops entries on every stage at once."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: dict[str, Kept] = {}
        self.nbytes = 0
        self.counters = {"prefix_hits": 0, "prefix_tokens_reused": 0, "prefix_kept": 0, "prefix_dropped": 0}

    def keep(self, entry: str, cache: list, length: int) -> Kept | None:
        """Keep a finished request's state; None if it is empty or alone
        larger than the whole budget."""
        nbytes = sum(c.nbytes for c in cache)
        if length <= 0 or nbytes > self.budget_bytes:
            return None
        self.drop([entry])
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
    tokens: list[int]
    acks: dict[str, tuple[int, int, bool]] = field(default_factory=dict)  # worker -> (length, bytes, trimmable)
    length: int = 0  # tokens usable on every stage, once complete
    trimmable: bool = True

    def bytes_on(self, worker: str) -> int:
        return self.acks[worker][1] if worker in self.acks else 0


@dataclass
class Hit:
    entry: str
    length: int  # tokens the request starts with from the entry


class PrefixIndex:
    """Which token prefixes every stage holds, LRU within each stage's byte
    budget. `lookup` finds the longest usable prefix (mlx-lm's PromptTrie);
    `finish` names a finished request's state for the stages to keep; `ack`
    takes each stage's report and says what to drop everywhere."""

    def __init__(self, budgets: dict[str, int]):
        self.budgets = budgets  # worker -> bytes; every worker is a stage
        self.trie = PromptTrie()
        self.entries: OrderedDict[str, Entry] = OrderedDict()  # usable, least recently used first
        self.pending: dict[str, Entry] = {}  # waiting for every stage's report
        self.pinned: dict[str, int] = {}  # entries a request named that is not yet on the wire
        self._ids = (f"p{secrets.token_hex(3)}-{i}" for i in itertools.count())
        self.counters = {"hits": 0, "misses": 0, "tokens_reused": 0, "evictions": 0, "entries_kept": 0}
        self.started = time.monotonic()

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
            if use <= 0 or (use < entry.length and not entry.trimmable):
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

    def finish(self, tokens: list[int]) -> str | None:
        """An entry id for a finished request whose stages hold `tokens` (or
        a part of them): its release asks each stage to keep its state."""
        if not self.enabled or len(tokens) < 2:
            return None
        entry = Entry(next(self._ids), list(tokens))
        self.pending[entry.id] = entry
        return entry.id

    # -- the stages' reports ----------------------------------------------------

    def ack(self, entry_id: str, worker: str, length: int, nbytes: int, can_trim: bool) -> list[str]:
        """A stage's report on a kept entry; the entries to drop everywhere."""
        entry = self.pending.get(entry_id)
        if entry is None or worker not in self.budgets:
            return [entry_id] if entry_id not in self.entries else []
        entry.acks[worker] = (length, nbytes, can_trim)
        if length <= 0:  # a stage did not keep it: nobody may use it
            del self.pending[entry_id]
            return [entry_id]
        if len(entry.acks) < len(self.budgets):
            return self._evict()
        del self.pending[entry_id]
        lengths = [a[0] for a in entry.acks.values()]
        entry.trimmable = all(a[2] for a in entry.acks.values())
        entry.length = min(*lengths, len(entry.tokens))
        if not entry.trimmable and len(set(lengths)) > 1:
            return [entry_id]  # recurrent states of different lengths: no common prefix
        entry.tokens = entry.tokens[: entry.length]
        drop = []
        old = self.trie.search(_TRIE_MODEL, entry.tokens).exact
        if old is not None:  # the same tokens again: keep one of them
            older = self.trie.get(_TRIE_MODEL, old)
            if older in self.pinned:
                return [entry_id]
            drop.append(self._remove(older))
        self.trie.add(_TRIE_MODEL, entry.tokens, entry.id)
        if entry.trimmable:  # entries that are prefixes of this one only take room
            for _, older in self.trie.pop_prefixes(_TRIE_MODEL, entry.tokens):
                if older in self.pinned:
                    self.trie.add(_TRIE_MODEL, self.entries[older].tokens, older)
                else:
                    drop.append(self._remove(older, in_trie=False))
        self.entries[entry.id] = entry
        self.counters["entries_kept"] += 1
        return drop + self._evict()

    def clear(self) -> list[str]:
        """Forget every entry (a stage restarted and holds none): the ids to
        drop on the stages that still hold them."""
        ids = [*self.entries, *self.pending]
        self.entries.clear()
        self.pending.clear()
        self.trie = PromptTrie()
        return ids

    # -- budget -----------------------------------------------------------------

    def bytes_by_worker(self) -> dict[str, int]:
        everything = [*self.entries.values(), *self.pending.values()]
        return {w: sum(e.bytes_on(w) for e in everything) for w in self.budgets}

    def _evict(self) -> list[str]:
        """Least recently used entries until every stage is within its budget."""
        held = self.bytes_by_worker()
        drop = []
        for entry_id in list(self.entries):
            if all(held[w] <= b for w, b in self.budgets.items()):
                break
            if entry_id in self.pinned:
                continue
            entry = self.entries[entry_id]
            for w in held:
                held[w] -= entry.bytes_on(w)
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
