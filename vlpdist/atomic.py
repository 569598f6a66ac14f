"""Atomic writes: a file or folder appears under its final name complete, or not at all.

Output folders of commands (`launcher.export --out`, the demo's root, `launcher.ablate --out`,
`launcher.bench --out`) carry a marker file, `OUTPUT_MARKER`, naming the command that wrote them.
A command writes only into a folder that is missing, empty, or marked as its own
(`refuse_foreign_output`): whatever else a folder holds was not written by it and is never replaced.
A folder written whole is staged beside its final name and swapped in (`replace_output_dir`); a
folder its command fills stage by stage and resumes (the demo's root) is claimed (`claim_output_dir`).

Output files (`launcher.evaluate --out`, `launcher.geodesic_stretch --out`) are JSON objects that
name their command under `OUTPUT_FILE_KEY`; a command replaces only a file naming it
(`write_output_json`), atomically, and refuses any other file, folder or link under that name.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vlpdist.errors import UserError


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _staging_path(path: Path, writer: str) -> Path:
    """Where `writer` (a pid, or `*` to match any) stages `path`: `.<name>.tmp.<writer>` beside it."""
    return path.with_name(f".{path.name}.tmp.{writer}")


def _swap_into_place(staging: Path, path: Path) -> None:
    """Rename `staging` to `path`. A folder already at `path` (os.replace cannot replace a non-empty
    one) is renamed aside first and removed only once the new one is in: a crash leaves the old
    folder under its name or aside, never neither; a failed rename puts the old one back."""
    if not (staging.is_dir() and path.is_dir() and not path.is_symlink()):
        os.replace(staging, path)
        return
    aside = path.with_name(f".{path.name}.old.{os.getpid()}")
    _remove(aside)
    os.rename(path, aside)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside)


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
        _swap_into_place(staging, path)
    except BaseException:
        _remove(staging)
        raise


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


OUTPUT_MARKER = ".vlpdist-output.json"


def output_writer(path: str | os.PathLike) -> str | None:
    """The command named by the marker of the output folder `path`, or None (no folder, no or unreadable marker)."""
    marker = Path(path) / OUTPUT_MARKER
    try:
        return json.loads(marker.read_text()).get("writer")
    except (OSError, ValueError, AttributeError):
        return None


def refuse_foreign_output(path: str | os.PathLike, writer: str, option: str) -> None:
    """A `UserError` unless `path` is missing, an empty folder, or `writer`'s own earlier output.

    `option` names the setting that chose `path` (`--out`, `root=`), for the message."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink() and (not any(path.iterdir()) or output_writer(path) == writer):
        return
    what = "a file" if path.is_file() else "a link" if path.is_symlink() else "a non-empty folder"
    raise _foreign_output_error(path, what, output_writer(path), writer, option, "a new or empty folder")


def _foreign_output_error(path: Path, what: str, owner: str | None, writer: str, option: str, instead: str) -> UserError:
    owned = f" written by {owner}" if owner else ""
    return UserError(f"{option} {path} is {what}{owned}, not an earlier output of {writer}: choose {instead} "
                     f"(it is never overwritten)")


def _write_marker(folder: Path, writer: str) -> None:
    atomic_write_json(folder / OUTPUT_MARKER, {"writer": writer})


def claim_output_dir(path: str | os.PathLike, writer: str, option: str) -> Path:
    """Make `path` `writer`'s output folder (created and marked when missing or empty), for a command
    that fills it in place and reuses what it finished there; refused when it is not its own."""
    path = Path(path)
    refuse_foreign_output(path, writer, option)
    path.mkdir(parents=True, exist_ok=True)
    if output_writer(path) != writer:
        _write_marker(path, writer)
    return path


@contextmanager
def replace_output_dir(path: str | os.PathLike, writer: str, option: str) -> Iterator[Path]:
    """Yield an empty staging folder to write `writer`'s output into; on success it is marked and
    swapped in for `path` (missing, empty, or `writer`'s own earlier output, else refused up front);
    on any failure the staging folder is removed and `path` is left as it was."""
    path = Path(path)
    refuse_foreign_output(path, writer, option)
    with atomic_path(path) as staging:
        staging.mkdir()
        yield staging
        _write_marker(staging, writer)


OUTPUT_FILE_KEY = "written_by"


def output_file_writer(path: str | os.PathLike) -> str | None:
    """The command named under `OUTPUT_FILE_KEY` by the JSON object in file `path`, or None (no file, not such JSON)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError: a binary file is nobody's output either
        return None
    return value.get(OUTPUT_FILE_KEY) if isinstance(value, dict) else None


def refuse_foreign_output_file(path: str | os.PathLike, writer: str, option: str) -> None:
    """A `UserError` unless `path` is missing, an empty file, or a file `writer` wrote (`write_output_json`).

    A link is refused even when it points at `writer`'s file: replacing it would drop someone's link."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    is_plain_file = path.is_file() and not path.is_symlink()
    if is_plain_file and (path.stat().st_size == 0 or output_file_writer(path) == writer):
        return
    what = "a link" if path.is_symlink() else "a file" if is_plain_file else "a folder"
    raise _foreign_output_error(path, what, output_file_writer(path) if is_plain_file else None, writer, option,
                                "a new file name")


def write_output_json(path: str | os.PathLike, value: dict, writer: str, option: str) -> Path:
    """Write `value`, marked as `writer`'s under `OUTPUT_FILE_KEY`, to `path` atomically; refused (nothing
    written) when `path` is not missing, empty, or `writer`'s own earlier output. `option` names the setting, for the message."""
    refuse_foreign_output_file(path, writer, option)
    return atomic_write_json(path, {OUTPUT_FILE_KEY: writer, **value})
