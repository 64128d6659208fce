"""A small thread-safe LRU: the server's text-embedding cache and thumbnail cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRU(OrderedDict):
    """At most `size` entries, the least recently used dropped first; every access under `lock`."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.lock = threading.Lock()

    def lookup(self, key: Hashable) -> Any:
        """The cached value (now the most recent), or None."""
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
        return None

    def put(self, key: Hashable, value: Any) -> None:
        with self.lock:
            self[key] = value
            if len(self) > self.size:
                self.popitem(last=False)

    def get_or(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The cached value, else `make()` cached (made outside the lock: two callers may both make it)."""
        value = self.lookup(key)
        if value is None:
            value = make()
            self.put(key, value)
        return value
