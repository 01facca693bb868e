"""What a shard is: `Shard` (a unit of work with a stable, filesystem-safe name) iterates `Item`s (one
input each: encoded bytes or a file path, or the error that made it unreadable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator


@dataclass
class Item:
    """One image to caption: encoded bytes (`data`) or a file path (`path`), or an `error`."""

    key: str  # unique within the shard
    source: str  # human-readable origin, e.g. "shards/00001.tar:000123.jpg", "data.parquet:row 17"
    data: bytes | None = None
    path: str | None = None
    error: str | None = None  # set when the item could not be read; data and path are None then
    extra: dict = field(default_factory=dict)  # tars: other members of the sample, suffix -> bytes

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Shard:
    """A unit of work: `name` (unique, filesystem-safe, stable), `source`, `size` (items, if cheaply known)."""

    name: str
    source: str
    size: int | None = None
    kind: ClassVar[str] = "shard"

    def __iter__(self) -> Iterator[Item]:
        raise NotImplementedError

    def _shard_error(self, message: str) -> Item:
        return Item(key=f"{self.name}:{self.kind}", source=self.source, error=message)
