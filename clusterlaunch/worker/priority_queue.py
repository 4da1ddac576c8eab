"""A priority queue of tasks with cheap removal, for the worker's state machine."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator
from typing import Generic, Protocol, TypeAlias, TypeVar

__all__ = ["PriorityQueue"]


class _Prioritized(Hashable, Protocol):
    #: Lower comes first.
    priority: tuple[int, ...]
    #: Unique; breaks ties between equal priorities.
    serial: int


T = TypeVar("T", bound=_Prioritized)

#: (priority, serial, token, item): serials are unique, so items are never compared.
_Entry: TypeAlias = tuple[tuple[int, ...], int, int, T]


class PriorityQueue(Generic[T]):
    """Items ordered by priority (then serial), lowest first, with cheap removal.

    A removed item's heap entry stays behind and is skipped when it surfaces; the heap
    is rebuilt when such leftovers outnumber the live entries. An item added again gets
    a new token, which tells its live entry from the leftovers.
    """

    __slots__ = ("_heap", "_live", "_tokens")

    def __init__(self) -> None:
        self._heap: list[_Entry[T]] = []
        self._live: dict[T, int] = {}
        self._tokens = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, item: T) -> bool:
        return item in self._live

    def __iter__(self) -> Iterator[T]:
        return iter(self._live)

    def add(self, item: T) -> None:
        if item in self._live:
            return
        token = next(self._tokens)
        self._live[item] = token
        heapq.heappush(self._heap, (item.priority, item.serial, token, item))

    def discard(self, item: T) -> None:
        if self._live.pop(item, None) is not None and len(self._heap) > 2 * len(self._live) + 32:
            self._heap = [entry for entry in self._heap if self._is_live(entry)]
            heapq.heapify(self._heap)

    def peek(self) -> T | None:
        heap = self._heap
        while heap and not self._is_live(heap[0]):
            heapq.heappop(heap)
        return heap[0][3] if heap else None

    def pop(self) -> T:
        item = self.peek()
        if item is None:
            raise IndexError("pop from an empty queue")
        heapq.heappop(self._heap)
        del self._live[item]
        return item

    def _is_live(self, entry: _Entry[T]) -> bool:
        return self._live.get(entry[3]) == entry[2]
