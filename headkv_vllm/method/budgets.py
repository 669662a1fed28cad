"""Per-KV-head token budgets (HeadKV, SnapKV, PyramidKV).

Notation of docs/method.md section 2, per KV head: ``b = kv_size - window``
prefix tokens are chosen per head on average; ``cap[l][h]`` is head (l, h)'s
number of chosen prefix tokens; it keeps ``cap + window`` tokens of a long prompt.

For a prompt of ``n`` tokens only ``n - window`` prefix tokens exist. Caps above
that are clipped and, with ``redistribute=True``, the excess goes to the other
heads of the model (proportionally to their caps, largest remainder first), so
the average kept size stays the one asked for as long as the prompt allows.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from functools import lru_cache

from headkv_vllm.method.bounded import BoundedCache

POLICIES = {  # name -> how its budgets are spread over the heads
    "headkv": "per-head budgets from head scores",
    "snapkv": "uniform",
    "pyramidkv": "linear in depth",
}
PYRAMID_MIN_RATIO = 20  # PyramidKV's default: the top layer keeps b / 20 chosen tokens


def headkv_caps(scores: list[list[float]], kv_size: int, window: int, beta: float) -> list[list[int]]:
    """The authors' allocation: a shared pool split by normalised scores plus a floor."""
    b = kv_size - window
    num_layers, num_heads = len(scores), len(scores[0])
    total = sum(map(sum, scores))
    pool = math.floor(b / beta) * num_layers * num_heads
    min_num = b - math.floor(b / beta)
    # round() is half-to-even, like torch.round in the authors' code
    return [[round(s / total * pool + min_num) for s in row] for row in scores]


def snapkv_caps(num_layers: int, num_heads: int, kv_size: int, window: int) -> list[list[int]]:
    return [[kv_size - window] * num_heads for _ in range(num_layers)]


def pyramidkv_caps(num_layers: int, num_heads: int, kv_size: int, window: int) -> list[list[int]]:
    """Linear in depth from ``2b - b/20`` (first layer) to ``b/20`` (last); mean ``b``."""
    b = kv_size - window
    low = b / PYRAMID_MIN_RATIO
    high = 2 * b - low
    step = (high - low) / max(1, num_layers - 1)
    return [[round(high - layer * step)] * num_heads for layer in range(num_layers)]


def policy_budgets(config, num_layers: int, num_heads: int, scores=None) -> "Budgets":
    """The budgets of ``config`` (a ``HeadKVConfig``: policy, kv_size, window, beta, redistribute)
    for ``num_layers`` x ``num_heads`` heads; the 'headkv' policy splits them by ``scores`` ([layer][head])."""
    if config.policy == "snapkv":
        caps = snapkv_caps(num_layers, num_heads, config.kv_size, config.window)
    elif config.policy == "pyramidkv":
        caps = pyramidkv_caps(num_layers, num_heads, config.kv_size, config.window)
    elif scores is None:
        raise ValueError(f"policy {config.policy!r} needs head scores.")
    else:
        caps = headkv_caps([list(r) for r in scores], config.kv_size, config.window, config.beta)
    return Budgets(tuple(tuple(int(c) for c in r) for r in caps), config.window, config.redistribute)


FULL = "full"  # a per-request KV size: keep every token (no compression)
_FULL_CAP = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class BudgetRule:
    """How a KV size becomes budgets on one server: the policy and its settings, and
    the head scores for 'headkv'. ``kv_size`` is the server's; a request may ask for
    its own (``budgets(kv_size)``), or for :data:`FULL`."""

    policy: str
    kv_size: int
    window: int
    beta: float
    redistribute: bool
    num_layers: int
    num_kv_heads: int
    scores: tuple[tuple[float, ...], ...] | None = None
    # (kv_size, beta) from the score file's calibration: each KV size takes the beta of
    # the calibrated size nearest to it in ratio (ties: the smaller); empty: ``beta``.
    betas: tuple[tuple[int, float], ...] = ()
    # Budget tables made so far, by KV size (clients choose the sizes: least recently used dropped beyond).
    _made: BoundedCache = dataclasses.field(default_factory=lambda: BoundedCache(BudgetRule.MAX_CACHED),
                                            compare=False, hash=False, repr=False)

    MAX_CACHED = 256

    @classmethod
    def from_config(cls, config, num_layers: int, num_kv_heads: int, scores=None, betas=()) -> "BudgetRule":
        return cls(config.policy, config.kv_size, config.window, config.beta, config.redistribute, num_layers,
                   num_kv_heads, None if scores is None else tuple(tuple(float(s) for s in r) for r in scores),
                   tuple(betas))

    def beta_for(self, kv_size: int) -> float:
        if not self.betas:
            return self.beta
        return min(self.betas, key=lambda kb: (Fraction(max(kb[0], kv_size), min(kb[0], kv_size)), kb[0]))[1]

    def budgets(self, kv_size: int | str | None = None) -> "Budgets":
        """The budgets of ``kv_size`` (None: the server's)."""
        key = self.kv_size if kv_size is None else kv_size
        made = self._made.get(key)
        if made is None:
            if key == FULL:
                caps = ((_FULL_CAP,) * self.num_kv_heads,) * self.num_layers
                made = Budgets(caps, self.window, self.redistribute)
            else:
                made = policy_budgets(dataclasses.replace(self, kv_size=key, beta=self.beta_for(key)),
                                      self.num_layers, self.num_kv_heads, self.scores)
            self._made.put(key, made)
        return made


@dataclasses.dataclass(frozen=True)
class Budgets:
    """Caps for every (layer, KV head) and the rule that turns them into kept lengths."""

    caps: tuple[tuple[int, ...], ...]  # [layer][kv_head] chosen prefix tokens for a long prompt
    window: int
    redistribute: bool = True

    @property
    def num_layers(self) -> int:
        return len(self.caps)

    @property
    def num_kv_heads(self) -> int:
        return len(self.caps[0])

    def kept(self, prompt_len: int) -> tuple[tuple[int, ...], ...]:
        """Tokens each head keeps after prefilling ``prompt_len`` tokens (window included)."""
        return _kept(self.caps, self.window, self.redistribute, prompt_len)

    def summary(self) -> dict[str, float]:
        flat = [c + self.window for row in self.caps for c in row]
        return {"min": min(flat), "mean": sum(flat) / len(flat), "max": max(flat)}


@lru_cache(maxsize=4096)
def _kept(caps, window: int, redistribute: bool, n: int) -> tuple[tuple[int, ...], ...]:
    prefix = n - window
    if prefix <= 0:
        return tuple((n,) * len(row) for row in caps)
    flat = [max(0, c) for row in caps for c in row]
    chosen = [min(c, prefix) for c in flat]
    if redistribute:
        chosen = _redistribute(chosen, sum(flat) - sum(chosen), prefix)
    width = len(caps[0])
    return tuple(tuple(c + window for c in chosen[i : i + width]) for i in range(0, len(chosen), width))


def _redistribute(chosen: list[int], excess: int, limit: int) -> list[int]:
    """Give ``excess`` tokens to heads below ``limit``, proportionally to what they hold."""
    chosen = list(chosen)
    while excess > 0:
        open_heads = [i for i, c in enumerate(chosen) if c < limit]
        if not open_heads:
            break
        weights = [chosen[i] + 1 for i in open_heads]
        total = sum(weights)
        shares = [excess * w / total for w in weights]
        grants = [math.floor(s) for s in shares]
        order = sorted(range(len(open_heads)), key=lambda k: (grants[k] - shares[k], open_heads[k]))
        for k in order[: excess - sum(grants)]:
            grants[k] += 1
        given = 0
        for i, g in zip(open_heads, grants):
            take = min(g, limit - chosen[i])
            chosen[i] += take
            given += take
        excess -= given
        if given == 0:
            break
    return chosen
