"""Whole files or none: every file a later command reads is written beside its target and renamed into place.

A kill at any moment leaves the previous version or the new one, never an empty or torn file: the text goes
to a temporary file in the same folder (so the rename stays on one filesystem), is fsynced, and replaces the
target with `os.replace`, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; on success it replaces `path`, on error it is removed.

    For writers that want a file name (`savefig`, `to_csv`); the suffix is kept so that they pick the format."""
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file it replaces was not
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_text(path: str | Path, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, data: Any, **kwargs: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, **kwargs) + "\n")


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable; some filesystems cannot fsync a folder, where the rename is still atomic."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
