"""One small registry for every extension point: teachers, prompt sources, targets, export variants.

    TEACHERS = Registry("teacher")

    @TEACHERS.register("open_clip")
    def build_open_clip(...): ...

Lookups of unknown names raise ``UserError`` listing the near names.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item
        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}: {self.hint(name)}") from None

    def hint(self, name: str) -> str:
        near = difflib.get_close_matches(name, list(self._items), n=3)
        listing = near if near else list(self._items)
        return ("did you mean " if near else "choose one of ") + ", ".join(listing)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items
