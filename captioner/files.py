"""Files we write and text lines we read, one helper each.

`atomic_write(path, data | writer)` writes a file whole: a temporary file beside it, fsync, rename, and
the permissions a plain write would give (0o666 minus the umask). A kill leaves the old file or the new
one, never a mix; a failure removes the temporary file. `read_lines` splits text by "\\n" only (never
`str.splitlines`, which also splits on U+2028, U+0085 and other characters that may be inside a name).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, BinaryIO

TMP_SUFFIX = ".tmp"


def plain_mode() -> int:
    """The permissions a plain `open(path, "w")` gives a new file: 0o666 minus the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None], *,
                 encoding: str = "utf-8", mode: int | None = None) -> Path:
    """Write `data` (bytes, text, or a function given the open binary file) to `path` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode(encoding) if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, plain_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def split_lines(text: str) -> list[str]:
    """Lines of `text` split on "\\n" only; a trailing "\\r" is dropped, an empty last line too."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: str | os.PathLike, *, encoding: str = "utf-8", errors: str = "strict") -> Iterator[str]:
    """Stream the lines of a text file split on "\\n" only (see `split_lines`)."""
    with open(path, "rb") as f:
        for raw in f:  # binary iteration splits on b"\n" only
            line = raw.decode(encoding, errors)
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            yield line
