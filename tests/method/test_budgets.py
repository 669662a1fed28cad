import pytest

from headkv_vllm.method.budgets import Budgets, headkv_caps, policy_budgets, pyramidkv_caps, snapkv_caps
from headkv_vllm.method.config import HeadKVConfig


def skewed(num_layers=4, num_heads=3):
    return [[float((l * num_heads + h) % 5 == 0) * (l + 1) + 0.01 * h for h in range(num_heads)] for l in range(num_layers)]


def test_headkv_formula_by_hand():
    # b = 120, beta 1.2: pool = floor(100) * L * H, min_num = 20
    scores = [[1.0, 0.0], [0.0, 1.0]]
    caps = headkv_caps(scores, kv_size=128, window=8, beta=1.2)
    assert caps == [[round(0.5 * 400 + 20), 20], [20, round(0.5 * 400 + 20)]]


def test_headkv_mean_is_the_asked_budget():
    caps = headkv_caps(skewed(8, 4), kv_size=128, window=8, beta=1.01)
    flat = [c for row in caps for c in row]
    assert abs(sum(flat) / len(flat) - 120) < 1
    assert min(flat) < 10 and max(flat) > 300  # skewed


def test_snapkv_and_pyramidkv_means():
    assert snapkv_caps(3, 2, 64, 8) == [[56, 56]] * 3
    pyr = pyramidkv_caps(10, 2, 128, 8)
    flat = [c for row in pyr for c in row]
    assert abs(sum(flat) / len(flat) - 120) <= 1
    assert [row[0] for row in pyr] == sorted((row[0] for row in pyr), reverse=True)


def test_long_prompt_keeps_caps_plus_window():
    b = Budgets(((5, 50), (100, 0)), window=8)
    assert b.kept(10_000) == ((13, 58), (108, 8))


def test_short_prompt_keeps_everything():
    b = Budgets(((5, 50), (100, 0)), window=8)
    assert b.kept(6) == ((6, 6), (6, 6))
    assert b.kept(8) == ((8, 8), (8, 8))


@pytest.mark.parametrize("prompt_len", [20, 40, 60, 90, 200])
def test_redistribution_keeps_the_average(prompt_len):
    caps = ((5, 50), (100, 1))
    b = Budgets(caps, window=8, redistribute=True)
    kept = [k for row in b.kept(prompt_len) for k in row]
    assert all(k <= prompt_len for k in kept)
    asked = sum(c + 8 for row in caps for c in row)
    assert sum(kept) == min(asked, 4 * prompt_len)
    no_redis = [k for row in Budgets(caps, 8, redistribute=False).kept(prompt_len) for k in row]
    assert no_redis == [min(c + 8, prompt_len) for row in caps for c in row]


@pytest.mark.parametrize("policy", ["headkv", "snapkv", "pyramidkv"])
def test_policy_budgets_use_the_policy_caps(policy):
    config = HeadKVConfig(kv_size=64, policy=policy, beta=1.2, window=4, redistribute=False)
    budgets = policy_budgets(config, 4, 3, skewed())
    want = {"headkv": headkv_caps(skewed(), 64, 4, 1.2), "snapkv": snapkv_caps(4, 3, 64, 4),
            "pyramidkv": pyramidkv_caps(4, 3, 64, 4)}[policy]
    assert budgets == Budgets(tuple(map(tuple, want)), 4, False)


def test_headkv_budgets_need_scores():
    with pytest.raises(ValueError, match="'headkv' needs head scores"):
        policy_budgets(HeadKVConfig(), 4, 3)
