"""Per-request HeadKV settings (``vllm_xargs`` / ``SamplingParams.extra_args``): the
check that runs as a request arrives, and the budgets a request's own KV size gets."""

import pytest
import torch

from headkv_vllm.core.plan import KeptTable
from headkv_vllm.method.budgets import FULL, BudgetRule
from headkv_vllm.method.request_settings import RequestSettingError, check, request_kv_size

RULE = BudgetRule("headkv", 128, 8, 1.01, True, 3, 2, ((1.0, 0.0), (0.5, 0.5), (0.0, 3.0)))


@pytest.mark.parametrize("value", [64, 9, 2**31 - 1, FULL])
def test_good_values_pass(value):
    check({"headkv_kv_size": value, "other_plugin": [1]}, window=8)
    assert request_kv_size({"headkv_kv_size": value}) == value


@pytest.mark.parametrize("extra, says", [
    ({"headkv_kv_size": 8}, "above the server's window (8)"),
    ({"headkv_kv_size": "64"}, "got '64'"),
    ({"headkv_kv_size": 64.0}, "got 64.0"),
    ({"headkv_kv_size": True}, "got True"),
    ({"headkv_kv_size": 2**31}, "at most 2147483647"),
    ({"headkv_kv_size": "Full"}, 'or "full" (no compression)'),
    ({"headkv_kv_sise": 64}, "not a HeadKV per-request setting; the known one is 'headkv_kv_size'"),
])
def test_bad_values_name_the_field_and_what_is_allowed(extra, says):
    with pytest.raises(RequestSettingError) as err:
        check(extra, window=8)
    field = f"vllm_xargs.{next(iter(extra))}"
    assert err.value.field == field and str(err.value).startswith(field) and says in str(err.value)


def test_keys_of_any_type_and_unchecked_values():
    check({3: "x", None: 1, "headkv_kv_size": 64}, window=8)
    with pytest.raises(RequestSettingError):
        check({3: "x", "headkv_kv_size": "lots"}, window=8)
    # a value that skipped the check counts as the server's size on both sides of the engine
    for value in ("lots", 0, -5, 2**31, 64.0, True, [64]):
        assert request_kv_size({"headkv_kv_size": value}) is None


def test_headkv_keys_on_a_server_without_headkv():
    with pytest.raises(RequestSettingError, match="does not run HeadKV"):
        check({"headkv_kv_size": 64}, window=None)
    check({"other": 1}, window=None)


def test_a_request_size_is_the_server_policy_at_that_size():
    small, server, full = RULE.budgets(32), RULE.budgets(), RULE.budgets(FULL)
    assert server == RULE.budgets(128) and small != server
    # the mean budget is the size asked for, up to rounding per head
    assert abs(sum(map(sum, small.caps)) - 6 * (32 - 8)) <= 6 and abs(sum(map(sum, server.caps)) - 6 * (128 - 8)) <= 6
    assert full.kept(1000) == ((1000, 1000),) * 3  # nothing evicted
    assert RULE.budgets(32) is small  # made once


def test_kept_table_rows_follow_each_request_size():
    table = KeptTable(RULE.budgets(), RULE)
    rows = table.rows([500, 500, 500], (None, 32, FULL))
    assert rows.shape == (3, 3, 2)
    assert torch.equal(rows[:, 0], torch.tensor(RULE.budgets().kept(500), dtype=torch.int32))
    assert torch.equal(rows[:, 1], torch.tensor(RULE.budgets(32).kept(500), dtype=torch.int32))
    assert bool((rows[:, 2] == 500).all())
    assert torch.equal(KeptTable(RULE.budgets()).rows([500], (32,)), rows[:, :1])  # no rule: the server's
