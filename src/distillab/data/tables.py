"""Labelled rows from files: CSV, TSV (GLUE's layout: tabs, no quoting) and JSON lines, read as
columns (``Table``), and class labels told apart from what is not one (``label_value``). Plain
Python: what ``data.text`` builds its splits from."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from distillab.settings import ConfigError

#: a column by name (files with a header, JSON lines, datasets) or by position from 0
Column = str | int
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


# -- files ------------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_format(path: Path, fmt: str) -> str:
    """``fmt``, or the format the file's suffix names when ``fmt`` is ``auto``."""
    if fmt != "auto":
        return fmt
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise ConfigError(
            f"format='auto' is not allowed: the suffix of {path.name} names no format; set format to csv, tsv or jsonl"
        )
    return found


class Table:
    """The columns of one split: ``columns[name]`` lists the values of the rows in file order;
    ``header`` says whether columns have names (else they are taken by position)."""

    def __init__(self, source: str, columns: dict[Any, list[Any]], header: bool) -> None:
        self.source, self.columns, self.header = source, columns, header

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def column(self, key: str, column: Column) -> list[Any]:
        """The values of ``column`` (the setting ``key``); one line naming the columns there are."""
        if isinstance(column, int) and not isinstance(column, bool) and self.header:
            names = list(self.columns)
            if 0 <= column < len(names):
                return self.columns[names[column]]
        elif column in self.columns:
            return self.columns[column]
        there = ", ".join(map(str, self.columns)) or "none"
        how = "" if self.header else " (no header: columns by position)"
        raise ConfigError(
            f"{key}={column!r} is not allowed: {self.source} has no such column; its columns{how}: {there}"
        )


def read_table(path: Path, fmt: str, header: bool) -> Table:
    """A CSV, TSV or JSON-lines file as columns of strings (or JSON values)."""
    if fmt == "jsonl":
        return _read_jsonl(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle, **options) if row]
    names: list[Any] = rows.pop(0) if header and rows else list(range(len(rows[0]) if rows else 0))
    columns: dict[Any, list[Any]] = {name: [] for name in names}
    for number, row in enumerate(rows, 1):
        if len(row) != len(names):
            raise ConfigError(
                f"path={str(path)!r} is not allowed: data row {number} has {len(row)} fields, the first "
                f"{'(the header) ' if header else ''}{len(names)}"
            )
        for name, value in zip(names, row):
            columns[name].append(value)
    return Table(path.name, columns, header)


def _read_jsonl(path: Path) -> Table:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(
                        f"path={str(path)!r} is not allowed: line {number} is not JSON ({error})"
                    ) from None
                if not isinstance(record, dict):
                    raise ConfigError(f"path={str(path)!r} is not allowed: line {number} is not a JSON object")
                records.append(record)
    names = list(dict.fromkeys(key for record in records for key in record))
    return Table(path.name, {name: [record.get(name) for record in records] for name in names}, True)


# -- labels -------------------------------------------------------------------------------------------
_INTEGER = re.compile(r"^[+-]?\d+$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def label_value(value: Any) -> int | str | None:
    """A class label: an integer or a string (a number written as text reads as a number); None
    when ``value`` is not one (a fraction, a missing value, a list)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if np.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.match(text):
            return int(text) if _INTEGER.match(text) else label_value(float(text))
        return None if not text or text.lower() in ("nan", "none", "null") else text
    return None


def sort_key(label: int | str) -> tuple[int, Any]:
    """The order of classes: numbers first, by value, then strings."""
    return (0, label) if isinstance(label, int) else (1, label)
