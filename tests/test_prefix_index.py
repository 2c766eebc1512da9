"""The prefix cache's two halves on their own: the coordinator's index (which
prefix a request may use, what every stage must drop) and a stage's store
(a kept state cloned at a prefix computes exactly what a fresh prefill does)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache
from mlx_lm.utils import load_model

from kimizmq.prefixcache import PrefixIndex, PrefixMissing, PrefixStore

MB = 1 << 20


def kept(index: PrefixIndex, tokens: list[int], *, lengths=None, nbytes=MB, trim=True) -> tuple[str, list[str]]:
    """Finish a request holding `tokens` and have every stage report it kept;
    the entry id and what the index asked to drop."""
    entry, drop = index.finish(tokens)
    assert entry is not None
    index.announce(entry)
    for w in index.budgets:
        length = (lengths or {}).get(w, len(tokens))
        drop += index.ack(entry, w, length, nbytes, trim)
    return entry, drop


def test_the_longest_shared_prefix_is_used_and_the_last_token_always_computed():
    index = PrefixIndex({"a": 100 * MB, "b": 100 * MB})
    turn1 = list(range(10, 30))
    entry, drop = kept(index, turn1)
    assert drop == []
    # a second turn: the first conversation, then more
    hit = index.lookup([*turn1, 7, 8, 9])
    assert (hit.entry, hit.length) == (entry, 20)
    # diverging inside the entry: the common part (trimmed)
    hit = index.lookup([*turn1[:12], 1, 2, 3])
    assert (hit.entry, hit.length) == (entry, 12)
    # the very same prompt: all but its last token
    assert index.lookup(turn1).length == 19
    # nothing in common
    assert index.lookup([1, 2, 3]) is None
    assert index.stats()["hits"] == 3 and index.stats()["misses"] == 1


def test_an_entry_is_usable_at_once_and_gone_when_a_stage_did_not_keep_it():
    """The next request may name an entry before the stages report it kept:
    each stage gets the release that keeps it first. A stage that then says it
    kept nothing (it did not hold the request, or had no room) removes it."""
    index = PrefixIndex({"a": 100 * MB, "b": 100 * MB})
    tokens = list(range(40))
    entry, _ = index.finish(tokens)
    assert index.lookup([*tokens, 1]) is None  # its release is not on the wire yet
    index.announce(entry)
    assert index.lookup([*tokens, 1]).length == 40  # no report yet
    assert index.ack(entry, "a", 41, MB, True) == []  # a stage may hold more than the entry names
    assert index.ack(entry, "b", 0, 0, True) == [entry]
    assert index.lookup([*tokens, 1]) is None
    assert index.bytes_by_worker() == {"a": 0, "b": 0}
    again, _ = index.finish(tokens)
    index.announce(again)
    assert index.forget(again) == [again] and index.lookup([*tokens, 1]) is None


def test_recurrent_states_are_used_only_at_their_whole_length():
    index = PrefixIndex({"a": 100 * MB})
    tokens = list(range(30))
    entry, _ = kept(index, tokens, trim=False)
    assert (index.lookup([*tokens, 5]).entry, index.lookup([*tokens, 5]).length) == (entry, 30)
    assert index.lookup(tokens[:20] + [99, 98]) is None  # would need trimming
    assert index.lookup(tokens) is None  # the last token must be computed: 29 < 30
    # stages of different lengths have no common recurrent state
    two = PrefixIndex({"a": 100 * MB, "b": 100 * MB})
    other, _ = two.finish(list(range(100, 130)))
    assert two.ack(other, "a", 30, MB, False) == []
    assert two.ack(other, "b", 29, MB, False) == [other]
    assert two.lookup(list(range(100, 131))) is None


def test_least_recently_used_entries_go_when_any_stage_is_over_budget():
    index = PrefixIndex({"a": 3 * MB, "b": 10 * MB})
    first, _ = kept(index, list(range(0, 10)))
    second, _ = kept(index, list(range(100, 110)))
    third, _ = kept(index, list(range(200, 210)))
    assert index.lookup(list(range(0, 12))).entry == first  # first is now the most recent
    fourth, drop = kept(index, list(range(300, 310)))
    assert drop == [second]  # a's budget holds three
    assert set(index.entries) == {first, third, fourth}
    assert index.stats()["evictions"] == 1
    assert index.bytes_by_worker()["a"] <= 3 * MB


def test_a_pinned_entry_is_not_evicted_until_its_request_is_on_the_wire():
    index = PrefixIndex({"a": 2 * MB})
    first, _ = kept(index, list(range(0, 10)))
    hit = index.lookup(list(range(0, 12)))
    index.pin(hit.entry)
    second, _ = kept(index, list(range(100, 110)))
    _, drop = kept(index, list(range(200, 210)))
    assert first not in drop and second in drop
    index.unpin(hit.entry)
    _, drop = kept(index, list(range(300, 310)))
    assert first in drop


def test_an_entry_that_extends_another_replaces_it():
    index = PrefixIndex({"a": 100 * MB})
    short, _ = kept(index, list(range(20)))
    longer, drop = kept(index, list(range(30)))
    assert drop == [short]
    assert index.lookup(list(range(25)) + [1]).entry == longer
    again, drop = kept(index, list(range(30)))
    assert drop == [longer] and set(index.entries) == {again}


def test_clear_forgets_everything_held_and_pending():
    index = PrefixIndex({"a": 100 * MB})
    done, _ = kept(index, list(range(20)))
    waiting, _ = index.finish(list(range(50, 70)))
    assert sorted(index.clear()) == sorted([done, waiting])
    assert index.lookup(list(range(21))) is None
    assert index.ack(waiting, "a", 20, MB, True) == [waiting]  # a late report is dropped


def test_off_when_a_budget_is_zero():
    assert PrefixIndex({"a": 0, "b": MB}).finish(list(range(10))) == (None, [])


# -- a stage's store, on a real model ----------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model):
    m, _ = load_model(tiny_model)
    m.set_dtype(mx.float32)
    return m


def prefill(model, tokens: list[int], cache=None):
    cache = cache if cache is not None else make_prompt_cache(model)
    logits = model(mx.array([tokens]), cache=cache)[:, -1, :]
    mx.eval(logits)
    return logits, cache


def test_a_state_cloned_at_a_prefix_computes_what_a_fresh_prefill_does(model):
    turn1 = [5, 17, 99, 230, 41, 7, 300, 12, 64, 8, 150, 77, 3, 201]
    turn2 = turn1[:9] + [45, 11, 90, 33, 120]
    _, cache = prefill(model, turn1)
    store = PrefixStore(budget_bytes=1 << 30)
    assert store.keep("e1", cache, len(turn1)) is not None
    fresh, _ = prefill(model, turn2)
    # two requests from the same entry, one after the other: neither disturbs the entry
    for _ in range(2):
        clone = store.take("e1", 9)
        reused, clone = prefill(model, turn2[9:], clone)
        np.testing.assert_allclose(np.array(reused), np.array(fresh), rtol=1e-4, atol=1e-4)
        assert clone[0].offset == len(turn2)
    assert store.entries["e1"].cache[0].offset == len(turn1)
    assert store.stats()["prefix_hits"] == 2 and store.stats()["prefix_tokens_reused"] == 18


def test_the_store_refuses_what_it_cannot_serve():
    store = PrefixStore(budget_bytes=1 << 20)
    cache = [KVCache()]
    cache[0].update_and_fetch(mx.ones((1, 2, 4, 8)), mx.ones((1, 2, 4, 8)))
    assert store.keep("small", cache, 4) is not None
    with pytest.raises(PrefixMissing):
        store.take("other", 2)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        store.take("small", 5)
    big = [KVCache()]
    big[0].update_and_fetch(mx.ones((1, 64, 300, 32)), mx.ones((1, 64, 300, 32)))
    assert store.keep("big", big, 300) is None  # alone larger than the budget
    recurrent = [ArraysCache(2)]
    recurrent[0][0] = mx.ones((1, 3, 4))
    store.keep("rec", recurrent, 6)
    with pytest.raises(ValueError, match="cannot start at 5"):
        store.take("rec", 5)
    assert len(store.take("rec", 6)) == 1
    assert store.drop(None) == 2 and store.nbytes == 0
