"""``BoundedCache``: the one memo table of the package whose size has a bound.

Each cache of tables made from a client-chosen key (a KV size, a prompt length, a
request id) would otherwise grow for as long as the server runs. The caches differ
only in their bound and what happens at it; both are parameters here:

- ``capacity``: the most total weight held. Weight is 1 per entry unless ``weight``
  says otherwise (e.g. the number of cached ints of a tensor).
- eviction when a ``put`` would pass the capacity: the least recently used entries
  go, one at a time, until the new one fits (``get`` and ``put`` count as a use,
  ``peek`` does not); with ``restart=True`` every entry goes at once (for tables
  that are cheap to remake, where keeping the order would cost every lookup).

The entry just put always stays, even one heavier than the capacity on its own.
Pure Python: the scheduler, the worker and the compute core all import it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MISSING = object()


class BoundedCache(Generic[K, V]):
    def __init__(self, capacity: int, weight: Callable[[V], int] | None = None, restart: bool = False):
        if capacity < 1:
            raise ValueError(f"BoundedCache capacity must be at least 1, got {capacity}.")
        self.capacity = capacity
        self.weight = weight  # None: 1 per entry (a named function: caches inside pickled objects must pickle)
        self.restart = restart
        self.total = 0  # weight held
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value held for ``key`` (now the most recently used), or ``default``."""
        value = self._items.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not self.restart:
            self._items.move_to_end(key)
        return value

    def peek(self, key: K, default: V | None = None) -> V | None:
        """The value held for ``key``, or ``default``; the order of use is left as it is."""
        return self._items.get(key, default)

    def put(self, key: K, value: V) -> V:
        """Hold ``value`` for ``key`` as the most recently used entry (replacing any
        earlier value), evicting as the module says; returns ``value``."""
        self.pop(key)
        weight = self._weigh(value)
        if self.restart and self.total + weight > self.capacity:
            self.clear()
        while self._items and self.total + weight > self.capacity:
            self.pop(next(iter(self._items)))
        self._items[key] = value
        self.total += weight
        return value

    def pop(self, key: K, default: V | None = None) -> V | None:
        value = self._items.pop(key, _MISSING)
        if value is _MISSING:
            return default
        self.total -= self._weigh(value)
        return value

    def clear(self) -> None:
        self._items.clear()
        self.total = 0

    def _weigh(self, value: V) -> int:
        return 1 if self.weight is None else self.weight(value)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        """Keys from the least to the most recently used."""
        return iter(self._items)

    def __repr__(self) -> str:
        return f"BoundedCache({len(self)} entries, weight {self.total} of {self.capacity})"
