"""The CLI's output file: one JSON line per request, in input order, written as soon as it can be.

Lines go out in input order, so what is on disk is always a prefix of the input. A rerun after a crash or
Ctrl-C counts that prefix (dropping a torn last line), skips it, and appends the rest: the finished file is
the same as an uninterrupted run's, for greedy or seeded sampling.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .prompt_file import InputError, id_key

FSYNC_INTERVAL_S = 1.0   # flush() on every line survives a killed process; fsync() also a lost machine


def count_done(path: Path, ids: list[str | int]) -> int:
    """How many leading requests `path` already holds; a torn last line is cut off the file."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1            # bytes after the last newline are a line cut short by a crash
    lines = data[:whole].split(b"\n")[:-1]
    for number, raw in enumerate(lines, start=1):
        try:
            found = id_key(json.loads(raw)["id"])
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}: line {number} is not a batchdecode result; "
                             "delete the file or choose another --output") from None
        expected = id_key(ids[number - 1]) if number <= len(ids) else None
        if found != expected:
            raise InputError(f"{path}: line {number} has id {found}, but the input's request {number} has id "
                             f"{expected}: it holds results of another input; delete it or choose another --output")
    if whole < len(data):
        with open(path, "r+b") as f:
            f.truncate(whole)
    return len(lines)


class ResultsWriter:
    """Takes results in any order and appends them to the file in input order."""

    def __init__(self, path: Path, first_index: int):
        self.file = open(path, "a", encoding="utf-8")
        self.next_index = first_index        # the input index of the next line the file needs
        self.pending: dict[int, dict] = {}   # finished, waiting for an earlier request
        self.last_fsync = time.monotonic()

    def add(self, index: int, record: dict) -> None:
        self.pending[index] = record
        lines = []
        while self.next_index in self.pending:
            lines.append(json.dumps(self.pending.pop(self.next_index), ensure_ascii=False) + "\n")
            self.next_index += 1
        if lines:
            self.file.write("".join(lines))
            self.file.flush()
            if time.monotonic() - self.last_fsync > FSYNC_INTERVAL_S:
                self._fsync()

    def close(self) -> None:
        self.file.flush()
        self._fsync()
        self.file.close()

    def _fsync(self) -> None:
        os.fsync(self.file.fileno())
        self.last_fsync = time.monotonic()
