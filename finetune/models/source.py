"""Where a base model's files come from: the demo builder, a local directory, or the HF hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

from finetune.config import ConfigError


class ModelNotFoundError(ConfigError):
    """The base model could not be found; the message lists everywhere we looked."""


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else can only be meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def resolve_model_dir(name_or_path: str, cache_dir: str | Path, revision: str | None = None) -> Path:
    """Return a local directory holding the model's config, weights and tokenizer.

    Local directories win; a hub id is looked up in the local HF cache first and only then on
    the hub, so an offline machine with a cached model works and one without gets an error
    naming what was looked for.
    """
    if name_or_path == "demo":
        from finetune.demo import ensure_demo_base

        return ensure_demo_base(Path(cache_dir).expanduser()).resolve()

    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"model.name_or_path={name_or_path!r} is a directory but has no config.json: "
                "point it at a Hugging Face model directory (config.json, *.safetensors, tokenizer files)."
            )
        return local.resolve()
    if local.is_file():
        raise ConfigError(_model_file_message(name_or_path, local))
    if _looks_like_path(name_or_path):
        raise ModelNotFoundError(
            f"model.name_or_path={name_or_path!r}: no such directory ({local.resolve()}). "
            "Pass an existing local model directory or a hub id such as meta-llama/Llama-3.1-8B."
        )
    return _from_hub(name_or_path, revision)


def _model_file_message(name_or_path: str, path: Path) -> str:
    if path.suffix.lower() == ".gguf":
        # People meet GGUF files first (Ollama, LM Studio), so they reach for one to fine-tune.
        return (f"model.name_or_path={name_or_path!r} is a GGUF file, llama.cpp's format for running models: "
                "an export product (often quantized, with llama.cpp's tensor names) that this trainer cannot "
                "train from. Pass the Hugging Face model directory it was exported from (config.json, "
                "*.safetensors, tokenizer files) or its hub id, e.g. model.name_or_path=meta-llama/Llama-3.1-8B.")
    return (f"model.name_or_path={name_or_path!r} is a file, not a model directory. Pass the Hugging Face "
            f"model directory holding config.json, *.safetensors and the tokenizer files (perhaps "
            f"{path.resolve().parent}), or a hub id.")


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means: try the hub next
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:  # noqa: BLE001 - every hub failure becomes the same clear message
        raise ModelNotFoundError(
            f"model.name_or_path={repo_id!r} was not found: it is not a local directory, it is not in "
            f"the Hugging Face cache ({constants.HF_HUB_CACHE}), and the hub could not provide it "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}). "
            "On an offline machine, download the model elsewhere and pass its directory, "
            "e.g. model.name_or_path=/models/Llama-3.1-8B."
        ) from None


def checkpoint_files(model_dir: Path) -> list[str] | None:
    """The safetensors files of an HF checkpoint directory, or None when it has none."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"] if (model_dir / "model.safetensors").exists() else None
