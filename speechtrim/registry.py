"""Name -> class registries that validate names (lower_snake, no duplicates) and build by name."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """A registry of named classes of one kind (adapters, reducers)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator that registers ``cls`` under ``name`` and sets ``cls.name``."""
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name must be lower_snake_case, got {name!r}")

        def decorate(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._entries[name].__qualname__}")
            self._entries[name] = cls
            cls.name = name  # the name is declared once, here
            return cls

        return decorate

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``; unknown names list the valid ones."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        return self._entries[name]

    def build(self, name: str, **params: Any) -> T:
        """Instantiate the class registered under ``name`` with ``params``."""
        return self.get(name)(**params)
