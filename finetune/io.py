"""Crash-safe writes: a file or a directory appears whole under its final name, or not at all.

Everything is written under a hidden staging name beside the target (`.<name>.partial-<pid>-<random>`),
flushed to disk, then renamed into place, and the parent directory flushed so that the rename
itself survives a power loss. A rename within one directory is atomic, so a reader (or a run
resuming after a crash) sees the old target, the new one, or none, never a half-written one. A
killed process can leave its staging directory behind; it is safe to delete.
"""

from __future__ import annotations

import enum
import errno
import os
import secrets
import shutil
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's contents, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)  # read-only opens directories too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(target: Path, role: str) -> Path:
    # Hidden, and this process's own: the processes of one launch may write the same target at once.
    return target.with_name(f".{target.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write (or replace) one text file."""
    staging = _sibling(path, "partial")
    try:
        staging.write_text(text)
        fsync_path(staging)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def create_text(path: Path, text: str) -> None:
    """Write a new file, complete or not at all; FileExistsError if `path` exists (it is left alone)."""
    staging = _sibling(path, "partial")
    try:
        staging.write_text(text)
        fsync_path(staging)
        # link() refuses an existing target, even one that appeared while we wrote: never a replace.
        os.link(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    fsync_path(path.parent)


class IfExists(enum.Enum):
    """What publishing a directory does when its target is already there."""

    # Raise FileExistsError and leave the target alone (checked before any work, and again at the end).
    refuse = "refuse"
    # The new directory takes the old one's place, which is removed once the new one is in.
    replace = "replace"
    # The target is another process's copy of the same thing, published first: keep it, drop ours.
    keep = "keep"


# Lower case like contextlib's `suppress` and `closing`: it reads as part of a `with` statement.
class atomic_dir:
    """A staging directory beside `target` that becomes `target` when the block succeeds.

        with atomic_dir(target) as staging:
            ...write files into staging...

    On success every file and directory inside is fsync'ed, the staging directory is renamed to
    `target` and the parent fsync'ed; on an exception (KeyboardInterrupt and SystemExit too) the
    staging directory is removed and `target` is left as it was. Writers that outlive one block
    (an object that writes over many calls) call `publish()` or `discard()` themselves.
    """

    def __init__(self, target: Path, if_exists: IfExists = IfExists.refuse):
        self.target = Path(target)
        self.if_exists = if_exists
        if if_exists is IfExists.refuse and self.target.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(self.target))
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # mkdir rather than mkdtemp: the result gets the umask's permissions, not owner-only ones.
        self.staging = _sibling(self.target, "partial")
        self.staging.mkdir()

    def __enter__(self) -> Path:
        return self.staging

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is None:
            self.publish()
        else:
            self.discard()
        return False

    def publish(self) -> Path:
        """Flush the staging directory and rename it to the target; returns the target."""
        try:
            for path in self.staging.rglob("*"):
                if path.is_file() or path.is_dir():
                    fsync_path(path)
            fsync_path(self.staging)
            retired = self._rename_into_place()
            fsync_path(self.target.parent)
        except BaseException:
            self.discard()
            raise
        if retired is not None:
            shutil.rmtree(retired)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _rename_into_place(self) -> Path | None:
        """The rename itself; returns the old target where one was replaced, to be removed."""
        if self.if_exists is IfExists.replace and self.target.exists():
            retired = _sibling(self.target, "replaced")
            self.target.rename(retired)
            try:
                self.staging.rename(self.target)
            except BaseException:
                retired.rename(self.target)
                raise
            return retired
        if self.if_exists is IfExists.refuse and self.target.exists():  # appeared while we wrote
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(self.target))
        try:
            self.staging.rename(self.target)
        except OSError:
            # rename() refuses a non-empty directory: another process published first.
            if self.if_exists is not IfExists.keep or not self.target.is_dir():
                raise
            self.discard()
        return None
