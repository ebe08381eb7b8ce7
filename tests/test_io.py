"""Stage-then-rename: a directory or file appears whole under its final name, or not at all."""

import os

import pytest

from finetune import io
from finetune.io import IfExists, atomic_dir, atomic_write_text, create_text


def write_files(directory, text="new"):
    (directory / "weights.bin").write_text(text)
    (directory / "nested").mkdir()
    (directory / "nested" / "config.json").write_text(text)


def contents(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_success_publishes_the_whole_directory_and_flushes_it_first(tmp_path, monkeypatch):
    target = tmp_path / "out"
    flushed = []
    real = io.fsync_path
    monkeypatch.setattr(io, "fsync_path", lambda path: (flushed.append((path, target.exists())), real(path)))
    with atomic_dir(target) as staging:
        write_files(staging)
        assert not target.exists() and staging.parent == tmp_path
    assert contents(target) == {"weights.bin": "new", "nested/config.json": "new"}
    assert os.listdir(tmp_path) == ["out"]  # no staging directory left
    names_before_rename = {path.name for path, published in flushed if not published}
    assert {"weights.bin", "config.json", "nested", staging.name} <= names_before_rename
    assert flushed[-1] == (tmp_path, True)  # the rename itself is made durable


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt(), SystemExit(143)])
def test_an_error_leaves_neither_target_nor_staging(tmp_path, error):
    with pytest.raises(type(error)):
        with atomic_dir(tmp_path / "out") as staging:
            write_files(staging)
            raise error
    assert os.listdir(tmp_path) == []


def test_refuse_leaves_an_existing_target_alone(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        atomic_dir(target)
    assert contents(target) == {"mine.txt": "mine"} and os.listdir(tmp_path) == ["out"]


def test_refuse_at_the_end_when_another_process_published_meanwhile(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError):
        with atomic_dir(target) as staging:
            write_files(staging)
            target.mkdir()  # another process publishes first
            write_files(target, text="theirs")
    assert contents(target) == {"weights.bin": "theirs", "nested/config.json": "theirs"}
    assert os.listdir(tmp_path) == ["out"]


def test_replace_swaps_in_the_new_directory_and_removes_the_old(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target, IfExists.replace) as staging:
        write_files(staging)
    assert contents(target) == {"weights.bin": "new", "nested/config.json": "new"}
    assert os.listdir(tmp_path) == ["out"]  # neither staging nor the replaced directory


def test_replace_keeps_the_old_directory_when_the_new_one_fails(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, IfExists.replace) as staging:
            write_files(staging)
            raise RuntimeError("killed")
    assert contents(target) == {"old.txt": "old"} and os.listdir(tmp_path) == ["out"]


def test_keep_lets_the_first_published_copy_win(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target, IfExists.keep) as staging:
        write_files(staging, text="ours")
        with atomic_dir(target, IfExists.keep) as other:  # another process, done first
            write_files(other, text="theirs")
    assert contents(target) == {"weights.bin": "theirs", "nested/config.json": "theirs"}
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_write_text_replaces_a_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    atomic_write_text(path, "one\n")
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n" and os.listdir(tmp_path) == ["metrics.jsonl"]

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "three\n")
    assert path.read_text() == "two\n" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_create_text_writes_a_new_file_and_never_replaces_one(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    create_text(path, "first\n")
    with pytest.raises(FileExistsError):
        create_text(path, "second\n")
    assert path.read_text() == "first\n" and os.listdir(tmp_path) == ["results.json"]

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "link", crash)
    with pytest.raises(OSError, match="disk full"):
        create_text(tmp_path / "other.json", "third\n")
    assert os.listdir(tmp_path) == ["results.json"]  # neither the file nor its staging copy
