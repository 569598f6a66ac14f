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


def _staging_path(path: Path, writer: str) -> Path:
    """Where `writer` (a pid, or `*` to match any) stages `path`: `.<name>.tmp.<writer>` beside it."""
    return path.with_name(f".{path.name}.tmp.{writer}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path beside `path` to write a file or a folder into; on success one rename
    puts it in place (replacing what was there), on error the staging copy is removed.

    Staging names are `.<name>.tmp.<pid>`, so leftovers of a killed writer are easy to find
    (`remove_stale_staging`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_path(path, str(os.getpid()))
    _remove(staging)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    if staging.is_dir() and path.is_dir():
        shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
    os.replace(staging, path)


def remove_stale_staging(path: str | os.PathLike) -> None:
    """Remove what writers of `path` that died mid-write left staged, whatever their pid.

    Only for a caller that knows no other writer of `path` is still at work: it removes theirs too.
    """
    path = Path(path)
    for stale in path.parent.glob(_staging_path(path, "*").name):
        _remove(stale)


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
