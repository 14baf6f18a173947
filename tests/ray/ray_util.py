"""Helpers for the Ray tests: the shared prompts and the CLI command line."""

OPTIONS = ["--max-tokens", "12", "--max-num-seqs", "4", "--no-progress"]


def prompt_rows() -> list[dict]:
    """40 requests: prompts of 1 to ~60 tokens, chat messages, token ids, and per-line sampling options."""
    words = "the quick brown fox jumps over the lazy dog once upon a time".split()
    rows = []
    for i in range(40):
        row = {"id": f"r{i}", "prompt": " ".join(words[: 1 + (i * 7) % len(words)] * (1 + i % 4))}
        if i % 5 == 1:
            row["max_tokens"] = 3 + i % 7
        if i % 6 == 2:
            row.update(temperature=0.9, top_p=0.9, seed=i)
        if i % 7 == 3:
            row["stop"] = ["fox", "dog"]
        if i % 8 == 4:
            row["logprobs"] = 2
        if i % 9 == 5:
            row.update(ignore_eos=True, top_k=20, min_tokens=2)
        rows.append(row)
    rows[10] = {"id": "chat", "messages": [{"role": "user", "content": "Hello world! How are you today?"}]}
    rows[20] = {"id": 20, "prompt_token_ids": [5, 17, 42, 99, 3]}
    return rows


def cli_argv(checkpoint, prompts, out, *extra) -> list[str]:
    return ["generate", "--model", str(checkpoint), "--input", str(prompts), "--output", str(out), *OPTIONS, *extra]
