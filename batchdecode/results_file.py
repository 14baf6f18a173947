"""The CLI's output file and the journal beside it.

out.jsonl              one JSON line per request, in input order, so what is on disk is always a prefix of the
                       input and the finished file is the same as an uninterrupted run's (greedy or seeded).
out.jsonl.batchdecode  the journal. Line 1 records what produced the results (input, model, options). Each later
                       line is one finished result with its input index, appended the moment it finishes, so a
                       kill loses no finished work even while an early request still runs. A finished run keeps
                       only line 1, which tells a rerun its own output from anything else.

A run holds an exclusive lock on the journal from start to end, so two runs never write one output. The lock is
taken on the real file: the output's path is resolved (a symlink to it names the same journal) and the output
file itself is locked too while it exists (a hard link to it is the same inode). Only a file with a journal beside
it is batchdecode's: any other existing file is refused, never touched, unless --overwrite. The journal itself is
never a link (opened with O_NOFOLLOW) and never another program's file: one that is not a journal is refused even
with --overwrite. A rerun resumes only when line 1 matches what it would produce itself, and every later line
is checked to be a result of this input before anything counts as done.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
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
        self.output, self.manifest = output, manifest            # `output` as the user named it, for messages
        self.real = Path(os.path.realpath(output))                # the file itself: links resolved
        self.path = journal_path(self.real)
        if self.real.is_dir():
            raise InputError(f"--output {output} is a folder")
        if self.real.exists() and not os.access(self.real, os.W_OK):
            raise InputError(f"--output {output}: not writable")
        self.journal, self.created = _locked(self.path, output)
        self.output_lock: IO[bytes] | None = None
        self.written = 0                    # leading results already in the output file
        self.journaled: dict[int, dict] = {}
        self._cut_output = self._cut_journal = 0
        try:
            self._lock_output()
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
            output = open(self.real, "w", encoding="utf-8")
        else:
            self.journal.truncate(self._cut_journal)
            with open(self.real, "r+b") as f:
                f.truncate(self._cut_output)
            output = open(self.real, "a", encoding="utf-8")
        self._lock_output()
        return ResultsWriter(output, self.written, journal=self.journal, journaled=self.journaled)

    def complete(self) -> None:
        """Every result is in the output file: the journal keeps only its line 1."""
        self.journal.seek(0)
        self.journal.truncate(len(self.journal.readline()))
        _fsync(self.journal)

    def release(self) -> None:
        # A journal this run created and never wrote is removed, so a failed run leaves nothing behind.
        if self.created and os.fstat(self.journal.fileno()).st_size == 0:
            self.path.unlink(missing_ok=True)
        if self.output_lock is not None:
            self.output_lock.close()
        self.journal.close()   # closing drops the lock

    def _lock_output(self) -> None:
        """Lock the output file's inode too, once it exists: another name for it (a hard link) has another
        journal path, but the same inode."""
        if self.output_lock is not None or not self.real.is_file():
            return
        self.output_lock = open(self.real, "rb")
        try:
            fcntl.flock(self.output_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(_busy(self.output, "the file")) from None

    def _read(self, ids: list[str | int], overwrite: bool) -> bool:
        """Whether the run starts afresh; InputError when the output is not ours to resume or replace."""
        old, entries, self._cut_journal = _read_journal(self.journal, self.path)   # only a journal is truncated
        if overwrite or not self.real.exists():   # (a deleted output starts over, whatever the journal holds)
            return True
        if old is None:
            if self.real.stat().st_size > 0:
                raise InputError(f"--output {self.output} exists and batchdecode did not write it (no "
                                 f"{self.path.name} beside it); choose another --output, or pass --overwrite "
                                 "to replace it")
            return True
        mismatch = self.manifest.mismatch(old)
        if mismatch:
            raise InputError(f"--output {self.output} holds results of another run ({mismatch}); pass "
                             "--overwrite to replace it, or choose another --output")
        self.written, self._cut_output = _written_prefix(self.real, ids)
        self.journaled = _journaled_results(entries, ids, self.path)
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


def _locked(path: Path, output: Path) -> tuple[IO[bytes], bool]:
    """(the journal, opened or created and exclusively locked; whether this run created it). InputError if another
    run holds it, or if it is a link or not a regular file: it is never followed, so never another file."""
    while True:
        journal, created = _open_journal(path, output)
        try:
            fcntl.flock(journal, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            journal.close()
            raise InputError(_busy(output, path.name)) from None
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(journal.fileno()).st_ino:
                return journal, created
        except FileNotFoundError:
            pass
        journal.close()   # a run that failed removed it between our open and our lock: lock the new one


def _open_journal(path: Path, output: Path) -> tuple[IO[bytes], bool]:
    # O_APPEND: every write appends, after any truncate. O_NONBLOCK: a FIFO put there cannot hang the open.
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    created = True
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        created = False
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise InputError(f"--output {output}: {path} is a symbolic link; batchdecode never writes through one "
                             "there. Remove it, or choose another --output") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"--output {output}: {path} exists and is not a regular file; remove it, or choose "
                         "another --output")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+b"), created


def _busy(output: Path, what: str) -> str:
    return (f"--output {output}: another batchdecode run is writing it (it holds the lock on {what}); wait for it "
            "to finish, or choose another --output")


def _read_journal(journal: IO[bytes], path: Path) -> tuple[dict | None, list[bytes], int]:
    """(line 1 or None, the later lines, length of the whole lines); a torn last line is ignored. InputError
    unless line 1 is a journal's header: no other file is ever truncated."""
    journal.seek(0)
    data = journal.read()
    whole = data.rfind(b"\n") + 1            # bytes after the last newline are a line cut short by a crash
    lines = data[:whole].split(b"\n")[:-1]
    if not lines:
        if data:   # batchdecode writes line 1 whole, at once: bytes without a newline are another program's
            raise InputError(_not_a_journal(path, "it is not"))
        return None, [], 0
    try:
        header = json.loads(lines[0])
        if header.get("format") != FORMAT:
            raise ValueError(header.get("format"))
    except (ValueError, AttributeError):
        raise InputError(_not_a_journal(path, "it is not")) from None
    return header, lines[1:], whole


def _journaled_results(lines: list[bytes], ids: list[str | int], path: Path) -> dict[int, dict]:
    """{input index: result} of a journal's result lines; InputError for a line that is not a result of this
    input (an index past its end, another request's id, not an entry): a damaged journal never counts as done."""
    results = {}
    for number, raw in enumerate(lines, start=2):
        try:
            entry = json.loads(raw)
            index, result = entry["index"], entry["result"]
            valid = (isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(ids)
                     and isinstance(result, dict) and id_key(result["id"]) == id_key(ids[index]))
        except (ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            raise InputError(f"{path}: line {number} is not a result of this input's {len(ids)} requests, so the "
                             "journal is damaged and cannot tell what is done; pass --overwrite to start over, or "
                             "choose another --output")
        results[index] = result
    return results


def _not_a_journal(path: Path, why: str) -> str:
    return (f"{path} is not a batchdecode journal of this input ({why}); batchdecode never truncates a file it did "
            "not write: move it away, or choose another --output")


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
