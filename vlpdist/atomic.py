"""Atomic writes: a file or folder appears under its final name complete, or not at all."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path beside `path` to write a file or a folder into; on success one rename
    puts it in place (replacing what was there), on error the staging copy is removed.

    Staging names are `.<name>.tmp.<pid>`, so leftovers of a killed writer are easy to find.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    _remove(staging)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    if staging.is_dir() and path.is_dir():
        shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
    os.replace(staging, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as staging:
        with open(staging, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: object) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")
