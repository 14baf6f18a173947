"""A Ray Data batch of rows <-> the engine's requests and outputs.

Two forms. `ColumnRows` is the Python API's: a prompt column, the CLI's per-line sampling options as optional
columns, and the CLI result line's fields appended as columns. `PickledRows` is the CLI's own: requests the CLI
has already checked and tokenized go out whole and the RequestOutputs come back whole, so the driver writes
them with the CLI's own result-line code and the file's bytes cannot drift from a single-process run's.

A row that cannot run becomes a reason (a string) instead of a Request; its output row carries the reason,
prefixed with the row's id, and the rest of the batch runs. Prompts are rendered and checked by the engine's
intake (intake.py), as for LLM and the CLI.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from ..intake import RequestError
from ..outputs import EngineStats, RequestOutput
from ..prompt_file import SAMPLING_FIELDS
from ..sampling_params import SamplingParams


@dataclass(slots=True)
class Request:
    prompt: dict                # {"prompt": text}, {"prompt_token_ids": [...]} or {"messages": [...]}
    params: SamplingParams


Result = RequestOutput | str    # an output, or why the row could not run


_TOP_LOGPROB = pa.struct([("token_id", pa.int64()), ("logprob", pa.float64())])
_TOKEN_LOGPROBS = pa.struct([("token_id", pa.int64()), ("logprob", pa.float64()),
                             ("top_logprobs", pa.list_(_TOP_LOGPROB))])
# the CLI result line's fields (its "id" is the row's own id column) and the row's error, null when it ran
OUTPUT_SCHEMA = pa.schema([
    ("text", pa.string()), ("token_ids", pa.list_(pa.int64())), ("finish_reason", pa.string()),
    ("num_prompt_tokens", pa.int64()), ("num_generated_tokens", pa.int64()),
    ("logprobs", pa.list_(_TOKEN_LOGPROBS)), ("error", pa.string()),
])


@dataclass(slots=True)
class ColumnRows:
    """The API's rows: `prompt_column` holds text, token ids or chat messages; a column named like a CLI per-line
    option (max_tokens, temperature, stop, seed, ...) overrides `base` for the rows where it is not null."""

    prompt_column: str
    id_column: str
    base: SamplingParams

    def requests(self, batch: pa.Table) -> list[Request | str]:
        return [self._request(row) for row in batch.to_pylist()]

    def table(self, batch: pa.Table, results: list[Result], stats: EngineStats) -> pa.Table:
        records = [_columns(r) if isinstance(r, RequestOutput) else _error_columns(self._label(row), r)
                   for row, r in zip(batch.to_pylist(), results)]
        out = pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA)
        kept = batch.drop_columns([name for name in OUTPUT_SCHEMA.names if name in batch.column_names])
        for field, column in zip(OUTPUT_SCHEMA, out.columns):
            kept = kept.append_column(field, column)
        return kept

    def _request(self, row: dict) -> Request | str:
        try:
            prompt = _prompt(row.get(self.prompt_column), self.prompt_column)
            return Request(prompt, dataclasses.replace(self.base, **_overrides(row)))
        except ValueError as e:
            return str(e)

    def _label(self, row: dict) -> str:
        if self.id_column in row:
            return json.dumps(row[self.id_column], ensure_ascii=False, default=str)
        return f"with {self.prompt_column} {str(row.get(self.prompt_column))[:40]!r}"


@dataclass(slots=True)
class PickledRows:
    """The CLI's rows: `index` (the request's position in the CLI's call), `prompt_token_ids` and `sampling_params`
    (pickled) in; `index`, `output` (a pickled RequestOutput), `error` (the engine's reason) and `stats` (the
    batch's EngineStats, pickled, on its first row) out."""

    def requests(self, batch: pa.Table) -> list[Request | str]:
        return [Request({"prompt_token_ids": ids}, pickle.loads(params)) for ids, params in
                zip(batch.column("prompt_token_ids").to_pylist(), batch.column("sampling_params").to_pylist())]

    def table(self, batch: pa.Table, results: list[Result], stats: EngineStats) -> pa.Table:
        ran = [isinstance(r, RequestOutput) for r in results]
        return pa.table({
            "index": batch.column("index"),
            "output": pa.array([pickle.dumps(r) if ok else None for r, ok in zip(results, ran)], pa.binary()),
            "error": pa.array([None if ok else r for r, ok in zip(results, ran)], pa.string()),
            "stats": pa.array([pickle.dumps(stats)] + [None] * (len(results) - 1), pa.binary()),
        })

    @staticmethod
    def inputs(prompt_ids: list[list[int]], params: list[SamplingParams]) -> list[dict]:
        return [dict(index=index, prompt_token_ids=ids, sampling_params=pickle.dumps(p))
                for index, (ids, p) in enumerate(zip(prompt_ids, params))]

    @staticmethod
    def stats(batch: pa.Table) -> list[EngineStats]:
        return [pickle.loads(s) for s in batch.column("stats").to_pylist() if s is not None]

    @staticmethod
    def outputs(batch: pa.Table) -> Iterator[RequestOutput]:
        """The batch's outputs, each with `index` set to its request's position in the CLI's call; RequestError
        for a request the engine refused, as LLM.generate_iter raises it."""
        for index, output, error in zip(*(batch.column(name).to_pylist() for name in ("index", "output", "error"))):
            if error is not None:
                raise RequestError([index], error)
            output = pickle.loads(output)
            output.index = index
            yield output


def _prompt(value, column: str) -> dict:
    """The column's value as the intake takes it: text, token ids or chat messages."""
    if isinstance(value, str) and value:
        return {"prompt": value}
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return {"prompt_token_ids": value}
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return {"messages": value}
    raise ValueError(f"{column} must be a non-empty string, list of token ids or list of chat messages, "
                     f"got {json.dumps(value, default=str)[:60]}")


def _overrides(row: dict) -> dict:
    """The row's non-null per-line options, type-checked as the CLI checks a JSONL line's."""
    overrides = {}
    for key, (ok, expected) in SAMPLING_FIELDS.items():
        value = row.get(key)
        if value is None:
            continue
        if not ok(value):
            raise ValueError(f"{key} must be {expected}, got {json.dumps(value, default=str)}")
        overrides[key] = value
    if "response_format" in overrides:   # OpenAI's name for structured_outputs
        from ..structured_output import take_response_format
        take_response_format(overrides, "response_format")
    return overrides


def _columns(output: RequestOutput) -> dict:
    logprobs = None
    if output.logprobs is not None:
        logprobs = [dict(token_id=lp.token_id, logprob=lp.logprob,
                         top_logprobs=[dict(token_id=t, logprob=p) for t, p in lp.top_logprobs.items()])
                    for lp in output.logprobs]
    return dict(text=output.text, token_ids=list(output.token_ids), finish_reason=output.finish_reason,
                num_prompt_tokens=len(output.prompt_token_ids), num_generated_tokens=len(output.token_ids),
                logprobs=logprobs, error=None)


def _error_columns(label: str, reason: str) -> dict:
    return dict(text=None, token_ids=None, finish_reason=None, num_prompt_tokens=None, num_generated_tokens=None,
                logprobs=None, error=f"row {label}: {reason}")
