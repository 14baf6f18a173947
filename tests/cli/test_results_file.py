"""The output file and its journal: input order on disk, every finished result saved at once, and only
batchdecode's own file, produced the same way, ever resumed."""
import json
import math

import pytest

from batchdecode.prompt_file import InputError
from batchdecode.results_file import Manifest, ResultsFile, ResultsWriter, journal_path
from cli_util import read_jsonl

IDS = ["a", "b", "c", "d", "e"]
MANIFEST = Manifest({"input_sha256": "1234", "model": "m", "sampling": {"temperature": 0.0}})


def open_results(path, manifest=MANIFEST, ids=IDS, overwrite=False) -> ResultsFile:
    return ResultsFile(path, ids, manifest, overwrite=overwrite)


def journal_indices(path) -> list[int]:
    return [entry["index"] for entry in read_jsonl(journal_path(path))[1:]]


def test_results_finishing_out_of_order_are_written_in_input_order(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = ResultsWriter(open(path, "w"), next_index=2)
    writer.add(4, {"id": "e"})
    writer.add(3, {"id": "d"})
    assert path.read_text() == ""            # request 2 is not done: nothing may be written past it
    writer.add(2, {"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["c", "d", "e"]
    writer.add(6, {"id": "g"})
    writer.close()
    assert [r["id"] for r in read_jsonl(path)] == ["c", "d", "e"]
    assert writer.next_index == 5


def test_a_finished_result_is_journaled_at_once_and_a_rerun_gets_it_back(tmp_path):
    path = tmp_path / "out.jsonl"
    results = open_results(path)
    writer = results.writer()
    writer.add(3, {"id": "d"})               # request 0 still runs: the output file cannot take it yet...
    writer.add(1, {"id": "b"})
    assert path.read_text() == ""
    assert journal_indices(path) == [3, 1]   # ...the journal has it, in the file, before any later result
    results.release()                        # (a kill: the writer is never closed)

    rerun = open_results(path)
    assert rerun.done() == {1, 3}
    writer = rerun.writer()
    writer.add(0, {"id": "a"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    for index in (2, 4):
        writer.add(index, {"id": IDS[index]})
    writer.close()
    rerun.complete()
    assert [r["id"] for r in read_jsonl(path)] == IDS
    assert journal_indices(path) == []       # a finished run keeps only what produced it
    rerun.release()
    assert open_results(path).done() == set(range(5))


def test_a_torn_last_line_is_cut_and_ids_are_checked(tmp_path):
    path = tmp_path / "out.jsonl"
    results = open_results(path)
    results.writer().add(0, {"id": "a", "text": "x"})
    results.release()
    with open(path, "a") as f:
        f.write('{"id": "b", "te')           # a crash in the middle of a write
    with open(journal_path(path), "a") as f:
        f.write('{"index": 1, "res')
    rerun = open_results(path)
    assert rerun.done() == {0}
    rerun.writer().close()
    assert path.read_text() == '{"id": "a", "text": "x"}\n'
    rerun.release()
    with pytest.raises(InputError, match='line 1 has id "a"'):
        open_results(path, ids=["b"])
    with pytest.raises(InputError, match='line 1 has id "a"'):
        open_results(path, ids=[])


@pytest.mark.parametrize("content", [json.dumps({"weights": [1, 2]}), "", "notes\n"])
def test_a_file_batchdecode_did_not_write_is_never_touched(tmp_path, content):
    path = tmp_path / "out.jsonl"
    path.write_text(content)                 # json.dump output has no newline: it once looked like a torn line
    if not content:                          # an empty file holds nothing to lose
        open_results(path).release()
        return
    with pytest.raises(InputError, match="batchdecode did not write it.*--overwrite"):
        open_results(path)
    assert path.read_text() == content
    assert not journal_path(path).exists()
    results = open_results(path, overwrite=True)
    assert path.read_text() == content       # replaced only once the run really starts writing
    results.writer().close()
    assert path.read_text() == ""


@pytest.mark.parametrize("changed", [
    {"input_sha256": "5678"}, {"model": "other"}, {"sampling": {"temperature": 1.0}},
])
def test_results_of_another_run_are_refused(tmp_path, changed):
    path = tmp_path / "out.jsonl"
    results = open_results(path)
    results.writer().add(0, {"id": "a"})
    results.release()
    before = path.read_bytes()
    other = Manifest({**MANIFEST.decisive, **changed})
    key = next(iter(changed))
    with pytest.raises(InputError, match=f"another run \\({key} .* then, .* now\\).*--overwrite"):
        open_results(path, other)
    assert path.read_bytes() == before
    assert open_results(path, other, overwrite=True).done() == set()


def test_a_second_run_on_one_output_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    first = open_results(path)
    with pytest.raises(InputError, match="another batchdecode run is writing it"):
        open_results(path)
    first.release()
    open_results(path).release()


def test_a_run_that_fails_before_writing_leaves_nothing(tmp_path):
    path = tmp_path / "out.jsonl"
    open_results(path).release()
    assert not path.exists() and not journal_path(path).exists()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_is_never_written(tmp_path, bad):
    path = tmp_path / "out.jsonl"
    results = open_results(path)
    writer = results.writer()
    with pytest.raises(ValueError):
        writer.add(0, {"id": "a", "logprobs": [bad]})
    writer.add(1, {"id": "b"})
    writer.close()
    assert path.read_text() == ""
    assert journal_indices(path) == [1]
    for line in journal_path(path).read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the journal"))


# issue 19: the lock is on the real file, the journal is never a link or another program's file, and every
# journal line is checked before anything counts as done.

def test_a_second_run_through_a_symlink_or_a_hard_link_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    first = open_results(path)                           # a first run, still running (this process holds it)
    first.writer().add(0, {"id": "a"})
    (tmp_path / "link.jsonl").symlink_to(path)
    with pytest.raises(InputError, match="another batchdecode run is writing it"):
        open_results(tmp_path / "link.jsonl")
    (tmp_path / "dir").symlink_to(tmp_path)              # a link to the folder names the same file too
    with pytest.raises(InputError, match="another batchdecode run is writing it"):
        open_results(tmp_path / "dir" / "out.jsonl")
    (tmp_path / "hard.jsonl").hardlink_to(path)          # another name for the same inode
    with pytest.raises(InputError, match="another batchdecode run is writing it"):
        open_results(tmp_path / "hard.jsonl")
    first.release()
    rerun = open_results(tmp_path / "link.jsonl")        # the link resumes the real file's journal
    assert rerun.done() == {0}
    rerun.release()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_symlink_at_the_journal_path_is_never_followed(tmp_path, overwrite):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    path = tmp_path / "out.jsonl"
    journal_path(path).symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"):
        open_results(path, overwrite=overwrite)
    assert victim.read_text() == "precious\n" and journal_path(path).is_symlink() and not path.exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_journal_path_holding_another_programs_file_is_never_truncated(tmp_path, overwrite):
    path = tmp_path / "out.jsonl"
    journal_path(path).write_text("my notes\nmore notes\n")
    with pytest.raises(InputError, match="not a batchdecode journal"):
        open_results(path, overwrite=overwrite)
    assert journal_path(path).read_text() == "my notes\nmore notes\n"


@pytest.mark.parametrize("entry", [
    {"index": 10, "result": {"id": "x"}},                # past the input's end: it once counted as done
    {"index": -1, "result": {"id": "e"}},
    {"index": 1, "result": {"id": "z"}},                 # another request's result
    {"index": "1", "result": {"id": "b"}},
    {"index": 1},
    [1, 2],
])
def test_a_damaged_journal_never_claims_completion(tmp_path, entry):
    path = tmp_path / "out.jsonl"
    results = open_results(path)
    writer = results.writer()
    for index in range(4):
        writer.add(index, {"id": IDS[index]})
    results.release()                                    # killed with one request left
    with open(journal_path(path), "a") as f:
        f.write(json.dumps(entry) + "\n")
    before = journal_path(path).read_bytes()
    with pytest.raises(InputError, match="line 6 is not a result of this input's 5 requests.*--overwrite"):
        open_results(path)
    assert journal_path(path).read_bytes() == before     # the evidence is kept
    assert open_results(path, overwrite=True).done() == set()
