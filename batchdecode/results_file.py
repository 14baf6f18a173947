"""The CLI's output file and the journal beside it.

out.jsonl              one JSON line per request, in input order, so what is on disk is always a prefix of the
                       input and the finished file is the same as an uninterrupted run's (greedy or seeded).
out.jsonl.batchdecode  the journal. Line 1 records what produced the results (input, model, options). Each later
                       line is one finished result with its input index, appended the moment it finishes, so a
                       kill loses no finished work even while an early request still runs. A finished run keeps
                       only line 1, which tells a rerun its own output from anything else.

A run holds an exclusive lock on the journal from start to end, so two runs never write one output. Only a file
with a journal beside it is batchdecode's: any other existing file is refused, never touched, unless --overwrite.
A rerun resumes only when line 1 matches what it would produce itself.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .prompt_file import InputError, id_key

JOURNAL_SUFFIX = ".batchdecode"
FORMAT = "batchdecode-results/1"
FSYNC_INTERVAL_S = 1.0   # flush() on every line survives a killed process; fsync() also a lost machine


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + JOURNAL_SUFFIX)


def encode(record: dict) -> str:
    """One JSON line. ValueError on NaN or infinity: JSON has no such numbers, and readers choke on them."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


@dataclass(slots=True)
class Manifest:
    """What produced a results file. `decisive` (input, model, options that change the tokens) must match for a
    rerun to resume; `recorded` is written for the reader only."""
    decisive: dict
    recorded: dict = field(default_factory=dict)

    def line(self) -> str:
        return json.dumps(dict(format=FORMAT, **self.recorded, **self.decisive), ensure_ascii=False) + "\n"

    def mismatch(self, old: dict) -> str | None:
        """The first decisive field `old` (a journal's line 1) disagrees on, described; None when they match."""
        for key, value in self.decisive.items():
            if old.get(key) != value:
                return f"{key} {_short(old.get(key))} then, {_short(value)} now"
        return None


class ResultsFile:
    """An output file this run owns: locked, its journal read, the finished results known. Nothing is written
    until `writer()`, so a run that fails before generating leaves the files as they were."""

    def __init__(self, output: Path, ids: list[str | int], manifest: Manifest, *, overwrite: bool):
        self.output, self.path, self.manifest = output, journal_path(output), manifest
        if output.is_dir():
            raise InputError(f"--output {output} is a folder")
        if output.exists() and not os.access(output, os.W_OK):
            raise InputError(f"--output {output}: not writable")
        self.journal = _locked(self.path, output)
        self.written = 0                    # leading results already in the output file
        self.journaled: dict[int, dict] = {}
        self._cut_output = self._cut_journal = 0
        try:
            self.fresh = self._read(ids, overwrite)
        except BaseException:
            self.release()
            raise

    def done(self) -> set[int]:
        """Input indices already finished."""
        return set(range(self.written)) | set(self.journaled)

    def writer(self) -> ResultsWriter:
        """Start writing: a fresh file (and journal), or the resumed ones with any torn last line cut off."""
        if self.fresh:
            self.journal.truncate(0)
            self.journal.write(self.manifest.line().encode())
            self.journal.flush()
            output = open(self.output, "w", encoding="utf-8")
        else:
            self.journal.truncate(self._cut_journal)
            with open(self.output, "r+b") as f:
                f.truncate(self._cut_output)
            output = open(self.output, "a", encoding="utf-8")
        return ResultsWriter(output, self.written, journal=self.journal, journaled=self.journaled)

    def complete(self) -> None:
        """Every result is in the output file: the journal keeps only its line 1."""
        self.journal.seek(0)
        self.journal.truncate(len(self.journal.readline()))
        _fsync(self.journal)

    def release(self) -> None:
        # A journal this run created and never wrote is removed, so a failed run leaves nothing behind.
        if os.fstat(self.journal.fileno()).st_size == 0:
            self.path.unlink(missing_ok=True)
        self.journal.close()   # closing drops the lock

    def _read(self, ids: list[str | int], overwrite: bool) -> bool:
        """Whether the run starts afresh; InputError when the output is not ours to resume or replace."""
        if overwrite or not self.output.exists():   # (a deleted output starts over, whatever the journal holds)
            return True
        old, self.journaled, self._cut_journal = _read_journal(self.journal, self.path)
        if old is None:
            if self.output.stat().st_size > 0:
                raise InputError(f"--output {self.output} exists and batchdecode did not write it (no "
                                 f"{self.path.name} beside it); choose another --output, or pass --overwrite "
                                 "to replace it")
            return True
        mismatch = self.manifest.mismatch(old)
        if mismatch:
            raise InputError(f"--output {self.output} holds results of another run ({mismatch}); pass "
                             "--overwrite to replace it, or choose another --output")
        self.written, self._cut_output = _written_prefix(self.output, ids)
        return False


class ResultsWriter:
    """Takes results in any order: journals each at once, and appends them to the output in input order."""

    def __init__(self, file: IO[str], next_index: int, *, journal: IO[bytes] | None = None,
                 journaled: dict[int, dict] | None = None):
        self.file, self.journal = file, journal
        self.next_index = next_index         # the input index of the next line the file needs
        self.pending: dict[int, str] = {}    # finished, waiting for an earlier request
        self.last_fsync = time.monotonic()
        for index, record in sorted((journaled or {}).items()):
            if index >= next_index:
                self.pending[index] = encode(record)
        self._drain()

    def add(self, index: int, record: dict) -> None:
        line = encode(record)   # before anything is written: a record JSON cannot hold is never half-kept
        if self.journal is not None:
            self.journal.write((json.dumps(dict(index=index, result=record), ensure_ascii=False) + "\n").encode())
            self.journal.flush()
        self.pending[index] = line
        self._drain()
        if time.monotonic() - self.last_fsync > FSYNC_INTERVAL_S:
            self._fsync()

    def close(self) -> None:
        self.file.flush()
        self._fsync()
        if self.journal is not None:   # a stream (stdout) is not ours to close
            self.file.close()

    def _drain(self) -> None:
        lines = []
        while self.next_index in self.pending:
            lines.append(self.pending.pop(self.next_index) + "\n")
            self.next_index += 1
        if lines:
            self.file.write("".join(lines))
            self.file.flush()

    def _fsync(self) -> None:
        if self.journal is not None:
            _fsync(self.file)
            _fsync(self.journal)
        self.last_fsync = time.monotonic()


def _locked(path: Path, output: Path) -> IO[bytes]:
    """The journal, opened (created if missing) and exclusively locked; InputError if another run holds it."""
    while True:
        journal = open(path, "a+b")   # every write appends, after any truncate
        try:
            fcntl.flock(journal, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            journal.close()
            raise InputError(f"--output {output}: another batchdecode run is writing it (it holds the lock on "
                             f"{path.name}); wait for it to finish, or choose another --output") from None
        try:
            if os.stat(path).st_ino == os.fstat(journal.fileno()).st_ino:
                return journal
        except FileNotFoundError:
            pass
        journal.close()   # a run that failed removed it between our open and our lock: lock the new one


def _read_journal(journal: IO[bytes], path: Path) -> tuple[dict | None, dict[int, dict], int]:
    """(line 1 or None, {input index: result}, length of its whole lines); a torn last line is ignored."""
    journal.seek(0)
    data = journal.read()
    whole = data.rfind(b"\n") + 1            # bytes after the last newline are a line cut short by a crash
    lines = data[:whole].split(b"\n")[:-1]
    if not lines:
        return None, {}, 0
    try:
        header = json.loads(lines[0])
        if header.get("format") != FORMAT:
            raise ValueError(header.get("format"))
        entries = [json.loads(raw) for raw in lines[1:]]
        return header, {entry["index"]: entry["result"] for entry in entries}, whole
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{path} is not a batchdecode journal; delete it or choose another --output") from None


def _written_prefix(path: Path, ids: list[str | int]) -> tuple[int, int]:
    """(how many leading requests the output holds, the length of its whole lines); checks their ids."""
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
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
    return len(lines), whole


def _fsync(file: IO) -> None:
    file.flush()
    os.fsync(file.fileno())


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
