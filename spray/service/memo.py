"""A bounded, thread-safe memo for what the service computes from rows that never change.

Every entry's key names what it was made from (the engine, a row's id and its creation
time, the review state...), so an entry is never stale: a changed input makes a new key and
the old entry ages out. Least recently used entries go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class Memo(Generic[Value]):
    """At most ``kept`` values by key; :meth:`get_or_make` makes a missing one.

    With ``single_flight``, a missing value is made once: concurrent requests for the same
    key wait for the one result instead of each making it (costly work), while requests
    for other keys, and hits, go on.
    """

    def __init__(self, kept: int, single_flight: bool = False) -> None:
        self.kept = kept
        self.single_flight = single_flight
        self._values: OrderedDict[Hashable, Value] = OrderedDict()
        self._lock = threading.Lock()
        self._making: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable) -> Value | None:
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Value) -> Value:
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.kept:
                self._values.popitem(last=False)
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], Value]) -> Value:
        found = self.get(key)
        if found is not None:
            return found
        if not self.single_flight:
            return self.put(key, make())
        with self._lock:
            making = self._making.setdefault(key, threading.Lock())
        with making:
            found = self.get(key)  # made meanwhile by the request this one waited for
            if found is None:
                found = self.put(key, make())
        with self._lock:
            self._making.pop(key, None)
        return found

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
