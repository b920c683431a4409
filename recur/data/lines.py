"""Reading a text data file as numbered lines, and errors that point at a line.

Lines are split on "\\n" only. Python's `str.splitlines` would also split on "\\x85",
"\\u2028", "\\x1c" and others, which occur inside tokens of real corpora (latin-1 "\\x85" is
an ellipsis in Windows-1252 text), silently adding lines. Fields are likewise split on ASCII
whitespace only: `str.split()` would cut a token at a non-breaking space ("\\xa0").
"""
from __future__ import annotations

import os
import pathlib
import re

_ASCII_SPACE = re.compile(r"[ \t\r\f\v]+")


class DataFormatError(ValueError):
    """A data file is malformed; the message starts with `path:line:`."""

    def __init__(self, path: str | os.PathLike, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path = pathlib.Path(path)
        self.line = line


def read_lines(path: str | os.PathLike, encoding: str = "utf-8") -> list[str]:
    """Returns the lines of a text file, without their "\\n" (and a "\\r" before it).

    Line i of the file (1-based) is element i - 1. A final "\\n" ends the last line; it does
    not start an empty one.

    Raises:
      DataFormatError: the file is empty, or has bytes invalid in `encoding` (names the line).
    """
    data = pathlib.Path(path).read_bytes()
    if not data:
        raise DataFormatError(path, 1, "the file is empty.")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        bad = data[e.start:e.end]
        raise DataFormatError(
            path, line, f"bytes {bad!r} at column {column} are not valid {encoding} ({e.reason}); "
            "pass the file's real encoding as `encoding=`.") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def split_fields(line: str) -> list[str]:
    """Returns the fields of `line` separated by ASCII whitespace (never by "\\xa0" etc.)."""
    line = line.strip(" \t\r\f\v")
    return _ASCII_SPACE.split(line) if line else []
