"""A name -> component table: heads, channel modes, runtimes and study stages register here.

Each kind of component has one :class:`Registry`, defined beside its interface
(:data:`ichedge.heads.HEADS`, :data:`ichedge.channels.CHANNEL_MODES`,
:data:`ichedge.runtimes.RUNTIMES`, :data:`ichedge.context.STAGES`). Adding a component is one
class in one file with ``@REGISTRY.register``; the CLI's choices, configs and run folders name
it by its key, so nothing else needs to change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Components of one kind by name, in registration order.

    >>> shapes = Registry("shape")
    >>> @shapes.register("square")
    ... class Square: ...
    >>> shapes.names()
    ('square',)
    >>> shapes.get("circle")
    Traceback (most recent call last):
    ValueError: unknown shape 'circle'; choose one of: square
    """

    def __init__(self, kind: str, instances: bool = False) -> None:
        self.kind = kind
        self.instances = instances  # file one instance of each decorated class (stateless strategies)
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable:
        """Decorator filing a component (or, with ``instances``, one of it) under ``name``."""
        def add(item):
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item() if self.instances else item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._items)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())
