"""batchdecode: exact, fast batched LLM generation."""
