"""A pre-quantized model on disk: load the 4-bit base without reading or quantizing the checkpoint.

Quantizing on load (native.load_pretrained) reads every bf16 weight and quantizes it, each
time a run starts: for a 70B model that is ~140 GB read and minutes of quantization, where the
4-bit result is ~35 GB. A cache keeps that result, in this layout:

    cache_dir/
        config.json            the HF config: the architecture is known without the checkpoint
        nf4_cache.json         format version, quantization settings, source fingerprint, shards
        shard-00001.safetensors, ...

Each shard holds one group of tensors, as the writer was told (native.write_nf4_cache: the embeddings, final
norm and LM head, then one shard per decoder layer), so a writer needs one layer in host memory and a
reader maps one shard at a time. A quantized linear weight `X.weight` is stored as one tensor per
buffer of QuantizedWeight (`X.weight.packed`, `X.weight.absmax`, `X.weight.code`, and with double
quantization `X.weight.offset`, `X.weight.nested_absmax`, `X.weight.nested_code`); its non-tensor
attributes (shape, dtype, blocksize, quant_type, nested, nested_blocksize) are in the shard's
safetensors metadata under "quantized", so every shard describes itself. Other tensors (embeddings,
norms, biases, an untied LM head) keep their own names; a tied LM head is not stored.

Unquantized tensors are stored in `tensor_dtype`: the storage dtype (quant.torch_dtype, which
load_pretrained casts everything to first) wherever the model's compute dtype holds it exactly, so
one cache serves every compute dtype; otherwise the compute dtype itself, and then only that one.

A cache stands in for the checkpoint only when it was made from the same checkpoint with the same
settings: `nf4_cache.json` records both, `check_cache` refuses any difference. The fingerprint
hashes the checkpoint's config and index files and its shards' names, sizes and modification times:
cheap (no weight is read), and a rewritten or replaced checkpoint changes it (a mere copy does too,
which costs a rebuild, not a wrong model). Shard sizes are recorded so that a truncated shard is
refused before anything loads; the bytes inside are not hashed (that would cost a full read).

Writers build the cache in a hidden staging directory beside it and rename it into place only when
complete (finetune.io.atomic_dir), so a crashed write never leaves a cache under the final name (a
killed process can leave its `.<name>.partial-*` staging directory behind, which is safe to delete).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from finetune.config import ConfigError
from finetune.io import atomic_dir
from finetune.models.source import checkpoint_files
from finetune.quant import BLOCKSIZE, QuantizedWeight

if TYPE_CHECKING:
    from transformers import PretrainedConfig

FORMAT_VERSION = 1
META_FILE = "nf4_cache.json"
CONFIG_FILE = "config.json"
# The checkpoint's own description files, hashed whole into the fingerprint.
SOURCE_FILES = ("config.json", "model.safetensors.index.json")

Entry = tuple[str, QuantizedWeight | torch.Tensor]  # a tensor's name and value, as the reader yields them


@dataclass(frozen=True)
class CacheMeta:
    """What a cache was made from and with: all of it must match for the cache to stand in."""

    fingerprint: str
    quant_type: str
    double_quant: bool
    storage_dtype: torch.dtype  # quant.torch_dtype: weights were cast to it before quantizing
    tensor_dtype: torch.dtype  # dtype of the stored unquantized tensors
    blocksize: int = BLOCKSIZE

    def to_json(self) -> dict:
        return dict(fingerprint=self.fingerprint, quant_type=self.quant_type, double_quant=self.double_quant,
                    storage_dtype=_dtype_name(self.storage_dtype), tensor_dtype=_dtype_name(self.tensor_dtype),
                    blocksize=self.blocksize)

    @classmethod
    def from_json(cls, data: dict) -> CacheMeta:
        return cls(fingerprint=data["fingerprint"], quant_type=data["quant_type"],
                   double_quant=data["double_quant"], storage_dtype=_dtype(data["storage_dtype"]),
                   tensor_dtype=_dtype(data["tensor_dtype"]), blocksize=data["blocksize"])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def stored_tensor_dtype(storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype to store unquantized tensors in, for a model loaded with these dtypes.

    A loaded model's tensors are cast(cast(source, storage), compute); casting them back to the
    storage dtype is exact when the compute dtype holds every storage value (the same dtype, or
    float32, which holds bfloat16 and float16 exactly), and then the cache suits any compute dtype.
    """
    return storage_dtype if compute_dtype in (storage_dtype, torch.float32) else compute_dtype


def source_fingerprint(model_dir: str | Path) -> str:
    """A cheap identity of a safetensors checkpoint: no weight is read (see the module docstring)."""
    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    if files is None:
        raise ConfigError(f"{model_dir} has no safetensors checkpoint to fingerprint for the NF4 cache.")
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        path = model_dir / name
        if path.exists():
            digest.update(f"{name}\0".encode() + path.read_bytes() + b"\0")
    for name in files:
        stat = (model_dir / name).stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def decoder_layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to, whose shard it goes in; None for the rest (embeddings, norm, head)."""
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


class CacheWriter:
    """Writes a cache shard by shard into a staging directory; `finish` renames it into place.

    Use it as a context manager: an exception inside removes the staging directory.

        with CacheWriter(cache_dir) as writer:
            writer.add_quantized("model.layers.0.mlp.up_proj.weight", qweight)
            writer.add_tensor("model.layers.0.input_layernorm.weight", tensor)
            writer.end_shard()
            ...
            writer.finish(config, meta)
    """

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        try:
            self._output = atomic_dir(self.cache_dir)
        except FileExistsError:
            raise ConfigError(f"{self.cache_dir} already exists; delete it to write a new NF4 cache there.") from None
        self.staging = self._output.staging
        self._tensors: dict[str, torch.Tensor] = {}
        self._quantized: dict[str, dict] = {}  # name -> QuantizedWeight's non-tensor attributes
        self._shards: list[dict] = []

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()

    def add_quantized(self, name: str, weight: QuantizedWeight) -> None:
        """A quantized linear weight (`X.weight`), copied to the CPU until its shard is written."""
        for buffer_name, buffer in weight.named_buffers(recurse=False):
            self._add(f"{name}.{buffer_name}", buffer)
        attributes = dict(shape=list(weight.shape), dtype=_dtype_name(weight.dtype), blocksize=weight.blocksize,
                          quant_type=weight.quant_type, nested=weight.nested)
        if weight.nested:
            attributes["nested_blocksize"] = weight.nested_blocksize
        self._quantized[name] = attributes

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """An unquantized tensor, stored as it is (cast it to the cache's tensor_dtype first)."""
        self._add(name, tensor)

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._tensors:
            raise ValueError(f"{name} was added twice to the same NF4 cache shard")
        self._tensors[name] = tensor.detach().to("cpu").contiguous()

    def end_shard(self) -> int:
        """Write what was added since the last shard; returns the shard's size in bytes (0: nothing added)."""
        if not self._tensors:
            return 0
        from safetensors.torch import save_file

        file = f"shard-{len(self._shards) + 1:05d}.safetensors"
        path = self.staging / file
        save_file(self._tensors, str(path), metadata={"format": "pt", "quantized": json.dumps(self._quantized)})
        size = path.stat().st_size
        self._shards.append({"file": file, "bytes": size})
        self._tensors, self._quantized = {}, {}
        return size

    def finish(self, config: PretrainedConfig, meta: CacheMeta) -> Path:
        """Write the last shard, config.json and nf4_cache.json, and move the cache into place."""
        try:
            self.end_shard()
            config.to_json_file(str(self.staging / CONFIG_FILE))
            (self.staging / META_FILE).write_text(json.dumps(
                {"format_version": FORMAT_VERSION, **meta.to_json(), "shards": self._shards}, indent=2))
        except BaseException:
            self.abort()
            raise
        try:
            return self._output.publish()
        except OSError as error:
            raise ConfigError(f"could not move the finished NF4 cache to {self.cache_dir} ({error}); "
                              "did another process write it meanwhile? Delete it and retry.") from None

    def abort(self) -> None:
        self._output.discard()


def _read_meta(cache_dir: Path) -> tuple[CacheMeta, list[dict]]:
    path = cache_dir / META_FILE
    if not path.exists():
        raise ConfigError(f"{cache_dir} is not a complete NF4 cache: it has no {META_FILE}. "
                          f"Delete {cache_dir} so that it is written again.")
    try:
        data = json.loads(path.read_text())
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(f"{cache_dir} is an NF4 cache of format version {version}, this code reads version "
                              f"{FORMAT_VERSION}. Delete {cache_dir} so that it is written again.")
        meta, shards = CacheMeta.from_json(data), data["shards"]
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path} is damaged ({type(error).__name__}: {error}). "
                          f"Delete {cache_dir} so that it is written again.") from None
    for shard in shards:
        file = cache_dir / shard["file"]
        size = file.stat().st_size if file.exists() else None
        if size != shard["bytes"]:
            found = "is missing" if size is None else f"has {size} bytes, {shard['bytes']} were written"
            raise ConfigError(f"NF4 cache shard {file} {found}: the cache is damaged. "
                              f"Delete {cache_dir} so that it is written again.")
    return meta, shards


def read_cache(cache_dir: str | Path) -> tuple[PretrainedConfig, CacheMeta, Iterator[Entry]]:
    """(HF config, CacheMeta, iterator of (name, QuantizedWeight | Tensor)) from a cache.

    The files are checked (present, sizes as written) before this returns; the iterator then maps
    one shard at a time and yields its tensors on the CPU, quantized weights rebuilt whole.
    """
    from transformers import AutoConfig

    cache_dir = Path(cache_dir)
    meta, shards = _read_meta(cache_dir)
    config = AutoConfig.from_pretrained(cache_dir)
    return config, meta, _read_tensors(cache_dir, meta, [shard["file"] for shard in shards])


def _read_tensors(cache_dir: Path, meta: CacheMeta, files: list[str]) -> Iterator[Entry]:
    from safetensors import SafetensorError, safe_open

    for file in files:
        path = cache_dir / file
        try:
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                quantized = json.loads(shard.metadata()["quantized"])
                buffers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in quantized}
                plain = []
                for key in shard.keys():
                    owner, buffer_name = key.rsplit(".", 1)
                    if owner in quantized:
                        buffers[owner][buffer_name] = shard.get_tensor(key)
                    else:
                        plain.append((key, shard.get_tensor(key)))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"NF4 cache shard {path} cannot be read ({type(error).__name__}: {error}): the cache "
                              f"is damaged. Delete {cache_dir} so that it is written again.") from None
        yield from plain
        for name, attributes in quantized.items():
            yield name, _rebuild(name, buffers[name], attributes, meta, path)


def _rebuild(name: str, buffers: dict[str, torch.Tensor], attributes: dict, meta: CacheMeta,
             path: Path) -> QuantizedWeight:
    """QuantizedWeight through its own constructor, from the QuantState the writer took apart."""
    from bitsandbytes.functional import QuantState

    expected = {"packed", "absmax", "code"} | ({"offset", "nested_absmax", "nested_code"} if attributes["nested"]
                                               else set())
    settings = (attributes["quant_type"], attributes["nested"], attributes["dtype"], attributes["blocksize"])
    wanted = (meta.quant_type, meta.double_quant, _dtype_name(meta.storage_dtype), meta.blocksize)
    if set(buffers) != expected or settings != wanted:
        raise ConfigError(f"NF4 cache shard {path}: {name} has buffers {sorted(buffers)} and settings {settings}, "
                          f"expected {sorted(expected)} and {wanted}: the cache is damaged. "
                          f"Delete {path.parent} so that it is written again.")
    nested = None
    if attributes["nested"]:
        nested = QuantState(absmax=buffers["nested_absmax"], code=buffers["nested_code"],
                            blocksize=attributes["nested_blocksize"], dtype=torch.float32)
    state = QuantState(absmax=buffers["absmax"], shape=torch.Size(attributes["shape"]), code=buffers["code"],
                       blocksize=attributes["blocksize"], quant_type=attributes["quant_type"],
                       dtype=_dtype(attributes["dtype"]), offset=buffers.get("offset"), state2=nested)
    return QuantizedWeight(buffers["packed"], state)


def check_cache(cache_dir: str | Path, meta: CacheMeta, *, fingerprint: str | None, quant_type: str,
                double_quant: bool, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
    """Refuse a cache that was not made from this checkpoint with these settings.

    `fingerprint`: source_fingerprint of the checkpoint the run names, or None where there is no
    checkpoint to compare with (a random-weight cache used on its own).
    """
    differences = [f"{what}={have} (this run: {want})" for what, have, want in [
        ("quant_type", meta.quant_type, quant_type),
        ("double_quant", meta.double_quant, double_quant),
        ("torch_dtype", _dtype_name(meta.storage_dtype), _dtype_name(storage_dtype)),
        ("blocksize", meta.blocksize, BLOCKSIZE),
    ] if have != want]
    if differences:
        raise ConfigError(f"the NF4 cache {cache_dir} was quantized with {', '.join(differences)}. "
                          f"Delete {cache_dir} so that it is written again with this run's settings, "
                          "or give this run another cache directory.")
    if fingerprint is not None and meta.fingerprint != fingerprint:
        raise ConfigError(f"the NF4 cache {cache_dir} was made from another checkpoint than the one this run names "
                          f"(fingerprint {meta.fingerprint[:16]}, the checkpoint's now {fingerprint[:16]}): the "
                          f"checkpoint changed since. Delete {cache_dir} so that it is written again from it.")
    check_compute_dtype(cache_dir, meta, compute_dtype)


def check_compute_dtype(cache_dir: Path, meta: CacheMeta, compute_dtype: torch.dtype) -> None:
    if meta.tensor_dtype not in (compute_dtype, meta.storage_dtype):
        raise ConfigError(f"the NF4 cache {cache_dir} holds its embeddings, norms and LM head in "
                          f"{_dtype_name(meta.tensor_dtype)} (written by a run computing in that dtype from "
                          f"torch_dtype={_dtype_name(meta.storage_dtype)}), which cannot give the "
                          f"{_dtype_name(compute_dtype)} values loading the checkpoint gives. Delete {cache_dir} "
                          "so that it is written again, or give this run another cache directory.")


def is_cache(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()
