"""``BoundedCache`` (``headkv_vllm.method.bounded``), and the caches built on it keeping
their bounds: least recently used dropped by count or by weight, or restarted."""

import pickle

import pytest

from headkv_vllm.method.bounded import BoundedCache
from headkv_vllm.method.budgets import BudgetRule
from headkv_vllm.method.layout import PageCounter


def test_least_recently_used_goes_first():
    cache = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a use: "b" is now the oldest
    cache.put("c", 3)
    assert list(cache) == ["a", "c"] and "b" not in cache and cache.get("b") is None


def test_peek_leaves_the_order_of_use():
    cache = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.peek("a") == 1 and cache.peek("x", 0) == 0
    cache.put("c", 3)
    assert list(cache) == ["b", "c"]


def test_put_again_replaces_and_refreshes():
    cache = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)
    cache.put("c", 3)
    assert list(cache) == ["a", "c"] and cache.get("a") == 10 and cache.total == 2


def test_weighted_entries_evict_until_the_new_one_fits():
    cache = BoundedCache(10, weight=len)
    for key, value in (("a", "xxxx"), ("b", "xxx"), ("c", "xx")):
        cache.put(key, value)
    assert cache.total == 9
    cache.put("d", "xxxxx")  # 9 + 5 > 10: "a" goes, and 5 + 5 fits
    assert list(cache) == ["b", "c", "d"] and cache.total == 10
    cache.put("b", "x")  # a smaller value for a held key frees weight
    assert cache.total == 8 and list(cache) == ["c", "d", "b"]


def test_the_entry_just_put_stays_even_when_too_heavy():
    cache = BoundedCache(3, weight=len)
    cache.put("a", "xx")
    cache.put("big", "xxxxxx")
    assert list(cache) == ["big"] and cache.total == 6
    cache.put("b", "x")  # the heavy one is the least recently used: it goes
    assert list(cache) == ["b"] and cache.total == 1


def test_restart_drops_everything_at_the_bound_and_keeps_no_order():
    cache = BoundedCache(3, restart=True)
    for key in "abc":
        cache.put(key, key)
    assert cache.get("a") == "a" and list(cache) == ["a", "b", "c"]  # a lookup does not reorder
    cache.put("b", "B")  # a held key: replaced, nothing dropped
    assert len(cache) == 3
    cache.put("d", "d")
    assert list(cache) == ["d"] and cache.total == 1


def test_pop_clear_and_bad_capacity():
    cache = BoundedCache(4, weight=len)
    cache.put("a", "xy")
    assert cache.pop("a") == "xy" and cache.pop("a", "gone") == "gone" and cache.total == 0
    cache.put("b", "x")
    cache.clear()
    assert len(cache) == 0 and cache.total == 0
    with pytest.raises(ValueError, match="at least 1"):
        BoundedCache(0)


def test_budget_rule_keeps_its_bound_and_pickles():
    """Requests choose KV sizes: the rule keeps the tables of the most recently asked ones,
    and travels between processes (inside the KV-cache specs) with its cache."""
    rule = BudgetRule("snapkv", 64, 8, 1.0, True, num_layers=2, num_kv_heads=2)
    rule._made.capacity = 3
    for kv_size in (16, 32, 48, 16, 80):
        rule.budgets(kv_size)
    assert list(rule._made) == [48, 16, 80]
    assert rule.budgets(16) is rule.budgets(16)
    copy = pickle.loads(pickle.dumps(rule))
    assert copy == rule and list(copy._made) == [48, 80, 16] and copy.budgets(48) == rule.budgets(48)


def test_page_counter_restarts_its_tables_and_counts_the_same():
    kept = lambda n: (min(n, 20), min(n, 7))  # noqa: E731
    bounded, roomy = PageCounter(kept, 4, max_tables=2), PageCounter(kept, 4)
    for prompt in (30, 40, 50, 30, 60):
        for tokens in (prompt, prompt + 5, prompt + 17):
            assert bounded.pages(prompt, tokens) == roomy.pages(prompt, tokens)
    assert len(bounded._tables) <= 2 and len(roomy._tables) == 4
