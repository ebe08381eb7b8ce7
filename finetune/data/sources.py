"""Where rows come from: local files and hub datasets, loaded through `datasets`, checked, and
split into train and eval; then how several sources are mixed by weight.

A file `datasets` cannot read is examined again on the failure path, to tell the user the exact
line that is malformed, not valid UTF-8, or that the file is empty.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.config import FORMAT_COLUMNS, DataColumns, DataConfig, DataFormat, DataSource
from finetune.data.samples import DataError
from finetune.demo import write_demo_data, write_demo_kto_data, write_demo_preference_data

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# Columns a format reads only when present: alpaca's input, and the prompt of preference data
# (conversation pairs hold it in chosen and rejected).
OPTIONAL_COLUMNS = {DataFormat.instruction: {"input"}, DataFormat.preference: {"prompt"}}
# data.path=demo: the demo set written in data.format, chats for every SFT format.
DEMO_WRITERS = {DataFormat.preference: write_demo_preference_data, DataFormat.kto: write_demo_kto_data}


@dataclass
class Source:
    name: str  # as the user wrote it, for messages
    data_format: DataFormat
    columns: dict[str, str]  # dataset column of each field the format reads
    weight: float = 1.0
    subset: str | None = None
    split: str = "train"

    @property
    def local(self) -> Path | None:
        path = Path(self.name).expanduser()
        if path.exists():
            return path.resolve()
        if _looks_like_path(self.name):
            raise DataError(f"{self.name}: no such file ({path.resolve()}). Pass an existing file "
                            f"({', '.join(LOCAL_BUILDERS)}) or a Hugging Face hub dataset name.")
        return None

    def identity(self) -> dict:
        """What the tokenized cache depends on: a local file's size and mtime, or the hub coordinates."""
        local = self.local
        if local is None:
            return {"hub": self.name, "subset": self.subset, "split": self.split}
        files = sorted(local.rglob("*")) if local.is_dir() else [local]
        return {"path": str(local), "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}

    def load(self, cache_dir: Path):
        """The rows as a `datasets.Dataset` whose columns carry the format's field names."""
        local = self.local
        raw = _load_hub(self) if local is None else _load_local(local, cache_dir)
        if len(raw) == 0:
            raise DataError(f"{self.name}: the dataset holds no rows.")
        return self._with_format_columns(raw)

    def _with_format_columns(self, raw):
        optional = OPTIONAL_COLUMNS.get(self.data_format, set())
        missing = [column for field_name, column in self.columns.items()
                   if column not in raw.column_names and field_name not in optional]
        if missing:
            first = next(iter(self.columns))
            # ShareGPT data keeps its chats in "conversations"; the column is named rather than
            # guessed, so what trains is always what the config says.
            fix = ("this looks like ShareGPT data: pass data.columns.messages=conversations"
                   if self.data_format is DataFormat.messages and "conversations" in raw.column_names
                   else f"name yours with data.columns, e.g. data.columns.{first}=your_column, or pick "
                        "another data.format")
            raise DataError(
                f"{self.name}: missing column(s) {missing} for data.format={self.data_format.value}; expected "
                f"{list(self.columns.values())}, found {raw.column_names}; {fix}."
            )
        present = {column: field_name for field_name, column in self.columns.items() if column in raw.column_names}
        return raw.select_columns(list(present)).rename_columns(
            {column: field_name for column, field_name in present.items() if column != field_name})


def resolve_sources(data: DataConfig, cache_dir: Path) -> tuple[list[Source], Source | None]:
    """The training sources and the separate eval source (None: hold out a fraction of each)."""
    if data.path == "demo":
        data_format = data.format if data.format in DEMO_WRITERS else DataFormat.messages
        train, held_out = DEMO_WRITERS.get(data_format, write_demo_data)(cache_dir / "demo-data")
        columns = _columns_read(data_format, DataColumns())
        return [Source(str(train), data_format, columns)], Source(str(held_out), data_format, columns)
    entries = data.sources or [DataSource(path=data.path)]
    sources = [Source(entry.path, entry.format or data.format,
                      _columns_read(entry.format or data.format, entry.columns or data.columns),
                      entry.weight, entry.subset, entry.split) for entry in entries]
    eval_source = None
    if data.eval_path is not None:
        eval_source = Source(data.eval_path, data.format, _columns_read(data.format, data.columns),
                             split=data.eval_split)
    return sources, eval_source


def _columns_read(data_format: DataFormat, columns: DataColumns) -> dict[str, str]:
    return {field_name: getattr(columns, field_name) for field_name in FORMAT_COLUMNS[data_format]}


def _looks_like_path(name: str) -> bool:
    # Hub names are "name" or "org/name" without a file extension; anything else is meant as a path.
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or Path(name).suffix in LOCAL_BUILDERS)


def _load_local(path: Path, cache_dir: Path):
    from datasets import load_dataset, load_from_disk

    if path.is_dir():
        try:
            return load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{path}: a directory, but not one written by datasets' save_to_disk; "
                            f"pass a file ({', '.join(LOCAL_BUILDERS)}) instead.") from None
    builder = LOCAL_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(LOCAL_BUILDERS)}.")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty.")
    if builder in ("json", "csv"):
        # Arrow's readers accept invalid UTF-8 and leave it to fail much later, far from the file.
        _check_utf8(path)
    try:
        return load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir / "datasets"))
    except Exception as error:  # noqa: BLE001 - every reader failure is explained from the file itself
        raise unreadable_file_error(path, builder, error) from None


def unreadable_file_error(path: Path, builder: str, error: Exception) -> DataError:
    """Say exactly what is wrong with a file `datasets` failed to read: only whitespace, a malformed JSON line."""
    content = path.read_bytes()
    if not content.strip():
        return DataError(f"{path}: the file holds only whitespace, no rows.")
    if builder == "json":
        malformed = _malformed_json(content.decode("utf-8"))
        if malformed:
            return DataError(f"{path}:{malformed}")
    cause = str(error.__cause__ or error).strip().splitlines()
    return DataError(f"{path}: could not be read as {builder} ({type(error).__name__}: "
                     f"{cause[0] if cause else 'no detail'}).")


def _check_utf8(path: Path, chunk_bytes: int = 1 << 24) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines_before = 1
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line = lines_before + chunk[: max(error.start, 0)].count(b"\n")
                raise DataError(f"{path}:{line}: not valid UTF-8 text ({error.reason}). "
                                "Re-encode the file as UTF-8.") from None
            lines_before += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise DataError(f"{path}:{lines_before}: not valid UTF-8 text ({error.reason}, at the end of the "
                            "file). Re-encode the file as UTF-8.") from None


def _malformed_json(text: str) -> str | None:
    """'LINE: what is wrong' for the first malformed line (JSON lines) or spot (one JSON document)."""
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as document_error:
        whole = f"{document_error.lineno}: malformed JSON ({document_error.msg} at column {document_error.colno})."
    lines = text.splitlines()
    if lines and lines[0].lstrip().startswith("["):
        return whole
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as line_error:
            return f"{number}: malformed JSON ({line_error.msg} at column {line_error.colno})."
    return None


def _load_hub(source: Source):
    from datasets import load_dataset

    try:
        return load_dataset(source.name, source.subset, split=source.split)
    except Exception as error:  # noqa: BLE001 - every hub failure becomes the same clear message
        detail = str(error).strip().splitlines()
        raise DataError(
            f"{source.name!r} (subset={source.subset}, split={source.split}) is not a local file, and the Hugging "
            f"Face hub could not provide it ({type(error).__name__}: {detail[0] if detail else 'no detail'}). "
            "On an offline machine, download the dataset elsewhere and pass the file's path."
        ) from None


def held_out_split(rows: int, fraction: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train rows, eval rows) of one source."""
    order = np.random.default_rng(seed).permutation(rows)
    n_eval = max(1, round(rows * fraction))
    if n_eval >= rows:
        raise DataError(f"{name}: {rows} rows are too few to hold out data.eval_fraction={fraction} for evaluation; "
                        "add rows or pass data.eval_path.")
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def mixture(kept: list[np.ndarray], weights: list[float], seed: int) -> list[np.ndarray]:
    """Rows each source contributes so that its share of the samples matches its weight.

    The mixture has as many samples as the sources together; a source whose share exceeds its
    size is repeated whole and topped up with a seeded random subset (so repeats stay even).
    """
    total = sum(len(rows) for rows in kept)
    shares = np.asarray(weights, dtype=np.float64) / sum(weights)
    chosen = []
    for index, (rows, share) in enumerate(zip(kept, shares)):
        repeats, rest = divmod(round(share * total), len(rows))
        top_up = np.random.default_rng([seed, index]).permutation(rows)[:rest]
        chosen.append(np.concatenate([np.tile(rows, repeats), np.sort(top_up)]))
    return chosen
