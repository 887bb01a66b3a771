"""Datasets in: JSONL, CSV, Parquet, plain text (one example per line) and Hugging Face ``save_to_disk`` folders.

Every example is a text (``--field``, default ``text``) or a list of chat messages (``--messages-field``, default
``messages``: dicts with ``role`` and ``content``). Bad rows are reported with file and line (or row) number and
either fail the run or are skipped and counted (``on_error``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emovec.corpus import DataError

FORMATS = ("jsonl", "csv", "parquet", "txt", "datasets")


@dataclass
class Example:
    index: int  # position among the dataset's usable examples (0-based); the example's id in the output
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    source: str = ""  # "file, line N" for messages about it


@dataclass
class ReadStats:
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first few skipped rows, for the manifest

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.problems) < 20:
            self.problems.append(f"{where}: {why}")


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return "datasets"
        raise DataError(f"{path} is a folder but not a Hugging Face dataset saved with save_to_disk")
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "txt"}.get(suffix, "txt")


def _raw_rows(path: Path, fmt: str, stats: ReadStats, on_error: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row: a dict, or a str for plain text; undecodable rows are reported here."""
    if fmt == "txt":
        with open(path, "rb") as handle:
            for n, raw in enumerate(handle, 1):
                try:
                    yield f"{path}, line {n}", raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as error:
                    _bad(stats, on_error, f"{path}, line {n}", f"not valid UTF-8 (byte {error.start})")
    elif fmt == "jsonl":
        with open(path, "rb") as handle:
            for n, raw in enumerate(handle, 1):
                where = f"{path}, line {n}"
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as error:
                    _bad(stats, on_error, where, f"not valid UTF-8 (byte {error.start})")
                    continue
                if not line:
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as error:
                    _bad(stats, on_error, where, f"not valid JSON ({error.msg})")
    elif fmt == "csv":
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                for n, row in enumerate(csv.DictReader(handle), 2):
                    yield f"{path}, line {n}", row
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not valid UTF-8 (byte {error.start}); convert the file to UTF-8") from None
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        n = 0
        for batch in table.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield f"{path}, row {n}", row
    elif fmt == "datasets":
        try:
            from datasets import load_from_disk
        except ImportError:
            raise DataError(f"{path} is a Hugging Face dataset folder: pip install datasets to read it") from None
        data = load_from_disk(str(path))
        if hasattr(data, "keys") and not hasattr(data, "features"):  # a DatasetDict: take its first split
            split = next(iter(data.keys()))
            data = data[split]
        for n, row in enumerate(data, 1):
            yield f"{path}, row {n}", row
    else:
        raise DataError(f"unknown input format {fmt!r}; use one of {FORMATS}")


def _bad(stats: ReadStats, on_error: str, where: str, why: str) -> None:
    if on_error == "raise":
        raise DataError(f"{where}: {why} (use --on-error skip to skip and count such rows)")
    stats.skip(where, why)


def read_examples(path: str | Path, *, fmt: str | None = None, field_name: str = "text",
                  messages_field: str = "messages", chat: bool = False, on_error: str = "raise",
                  stats: ReadStats | None = None) -> Iterator[Example]:
    """The usable examples of ``path`` in order, streamed (nothing but the current row is held in memory)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    fmt = fmt or detect_format(path)
    stats = stats if stats is not None else ReadStats()
    index = 0
    for where, row in _raw_rows(path, fmt, stats, on_error):
        if isinstance(row, str):
            text, messages = row, None
            if chat:
                messages = [{"role": "user", "content": text}]
                text = None
        elif isinstance(row, dict):
            if chat or (messages_field in row and field_name not in row):
                messages = row.get(messages_field)
                if not _valid_messages(messages):
                    _bad(stats, on_error, where, f"field {messages_field!r} must be a list of {{role, content}} "
                                                 "objects with string content")
                    continue
                text = None
            else:
                text, messages = row.get(field_name), None
                if not isinstance(text, str):
                    _bad(stats, on_error, where, f"no string field {field_name!r} (keys: {sorted(row)[:8]})")
                    continue
        else:
            _bad(stats, on_error, where, f"a JSON {type(row).__name__}, not an object")
            continue
        if text is not None and not text.strip():
            _bad(stats, on_error, where, "empty text")
            continue
        yield Example(index, text=text, messages=messages, source=where)
        index += 1


def _valid_messages(messages: Any) -> bool:
    return (isinstance(messages, list) and bool(messages) and
            all(isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                for m in messages))
