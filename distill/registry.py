"""A named table of plug-ins: what the teacher kinds and the student presets are both kept in.

Torch-free, so the CLI parser and the config can read a table without loading the model code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from dsmd.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in the order they were registered; a name is registered once.

    `what` names an entry in messages ("teacher kind"), `hint` says where to read about them
    ("`dsmd teachers` says what path each takes"), `origin` adds where an entry came from to the
    message of a name registered twice.
    """

    def __init__(self, what: str, hint: str, name: Callable[[T], str], origin: Callable[[T], str] | None = None):
        self.what, self.hint, self._name, self._origin = what, hint, name, origin
        self.entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        name = self._name(entry)
        if name in self.entries:
            by = f" (by {self._origin(self.entries[name])})" if self._origin else ""
            raise ValueError(f"{self.what} {name!r} is already registered{by}")
        self.entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        """The entry called `name`, or an error that lists the names there are."""
        try:
            return self.entries[name]
        except KeyError:
            raise UserError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.entries)} "
                            f"({self.hint})") from None
