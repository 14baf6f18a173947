"""The output file is always a prefix of the input order, whatever order results finish in."""
import pytest

from batchdecode.prompt_file import InputError
from batchdecode.results_file import ResultsWriter, count_done
from cli_util import read_jsonl


def test_results_finishing_out_of_order_are_written_in_input_order(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = ResultsWriter(path, first_index=2)
    writer.add(4, {"id": "e"})
    writer.add(3, {"id": "d"})
    assert path.read_text() == ""            # request 2 is not done: nothing may be written past it
    writer.add(2, {"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["c", "d", "e"]
    writer.add(6, {"id": "g"})
    writer.close()
    assert [r["id"] for r in read_jsonl(path)] == ["c", "d", "e"]
    assert writer.next_index == 5


def test_count_done_cuts_a_torn_last_line_and_checks_ids(tmp_path):
    path = tmp_path / "out.jsonl"
    assert count_done(path, ["a", "b"]) == 0
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "te')
    assert count_done(path, ["a", "b", "c"]) == 1
    assert path.read_text() == '{"id": "a", "text": "x"}\n'
    with pytest.raises(InputError, match="line 1 has id \"a\""):
        count_done(path, ["b"])
    with pytest.raises(InputError, match="line 1 has id \"a\""):
        count_done(path, [])
    path.write_text('{"id": 1}\n')
    with pytest.raises(InputError, match='has id 1, .* has id "1"'):   # 1 and "1" are different ids
        count_done(path, ["1"])
