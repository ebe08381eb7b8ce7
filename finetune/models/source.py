"""Where the base model comes from (the demo builder, a local directory, the HF cache or hub),
resolved once per run into a `ModelSource` that holds its config.json, read once."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from finetune.config import ConfigError, ModelConfig
from finetune.demo import TINY_LLAMA, build_tokenizer, ensure_demo_base
from finetune.models.architectures import ARCHITECTURES, HUB_IDS


@dataclass(frozen=True)
class ModelSource:
    """The base model: the name the user gave, its local directory, and its config.json."""

    name_or_path: str
    # None when only the sizes are known (a dry run for a model not on this machine).
    directory: Path | None
    config: dict
    described_by: str  # where `config` came from, in words (the memory plan prints it)
    trust_remote_code: bool = False

    @functools.cached_property
    def hf_config(self):
        """The config as transformers' config class of its model_type, built from `config`."""
        from transformers import CONFIG_MAPPING, AutoConfig

        if self.config.get("model_type") in CONFIG_MAPPING:
            return CONFIG_MAPPING[self.config["model_type"]].from_dict(dict(self.config))
        # A model_type transformers does not know is defined by the checkpoint's own code.
        return AutoConfig.from_pretrained(self.directory, trust_remote_code=self.trust_remote_code)

    @property
    def max_positions(self) -> int | None:
        return self.config.get("max_position_embeddings")

    def check_sequence_length(self, max_seq_len: int) -> None:
        if self.max_positions and max_seq_len > self.max_positions:
            where = self.directory / "config.json" if self.directory else self.described_by
            raise ConfigError(f"data.max_seq_len={max_seq_len} exceeds the model's maximum sequence length "
                              f"({self.max_positions}, max_position_embeddings in {where}); "
                              f"pass data.max_seq_len={self.max_positions} or less.")

    @classmethod
    def from_directory(cls, directory: Path, name_or_path: str | None = None,
                       trust_remote_code: bool = False) -> ModelSource:
        """A local Hugging Face model directory (its config.json is read here, once)."""
        path = Path(directory) / "config.json"
        config = json.loads(path.read_text())
        if "model_type" not in config:
            raise ConfigError(f"{path} has no model_type: point model.name_or_path at a Hugging Face model "
                              "directory.")
        return cls(name_or_path or str(directory), Path(directory), config, str(path), trust_remote_code)


def resolve_source(model: ModelConfig, cache_dir: str | Path) -> ModelSource:
    """The base model's local directory (building the demo, or downloading a hub id, if need be)."""
    directory = resolve_model_dir(model.name_or_path, cache_dir, model.revision)
    return ModelSource.from_directory(directory, model.name_or_path, model.trust_remote_code)


def locate_source(model: ModelConfig) -> ModelSource:
    """The base model's config without weights or network, for the memory plan.

    Looked for in order: the demo's own sizes, a local model directory's config.json, the
    Hugging Face cache, the table of known architectures (finetune.models.architectures).
    """
    name = model.name_or_path
    if name == "demo":
        return ModelSource(name, None, dict(model_type="llama", vocab_size=len(build_tokenizer()), **TINY_LLAMA),
                           "the demo's tiny Llama")
    local = Path(name).expanduser()
    if local.is_file():
        raise ConfigError(_model_file_message(name, local))
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise ConfigError(f"model.name_or_path={name!r} is a directory without config.json: point it at a "
                              "Hugging Face model directory.")
        return ModelSource(name, local.resolve(), json.loads(path.read_text()), str(path))
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=model.revision)
    except HFValidationError:  # not a hub id, e.g. a mistyped path: the error below names both
        cached = None
    if isinstance(cached, str):
        return ModelSource(name, None, json.loads(Path(cached).read_text()), cached)
    known = {hub_id.lower(): arch for hub_id, arch in HUB_IDS.items()}
    if name.lower() in known:
        arch = known[name.lower()]
        return ModelSource(name, None, dict(ARCHITECTURES[arch]), f"{arch} in finetune's architecture table")
    raise ConfigError(
        f"model.name_or_path={name!r}: no sizes to plan with. Looked for a local directory {local.resolve()}, "
        f"a cached config.json in the Hugging Face cache ({constants.HF_HUB_CACHE}), and the known hub ids "
        f"({', '.join(sorted(HUB_IDS))}). Pass a model directory, or download the model's config.json "
        "(huggingface-cli download ID config.json).")


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
