"""The files of a checkpoint step folder, read without ranks: tag names, the manifest, checksums.

`vlpdist.train.checkpoint` writes and loads checkpoints (with collectives); this is the part that
offline readers (`consolidate`) need too, so it sits in `parallel/`, which imports nothing from
`train/`. The layout is described in `vlpdist.train.checkpoint`.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

TAG_PREFIX = "step_"
MANIFEST = "manifest.json"
LATEST = "latest"


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _crc32(path: Path) -> int:
    checksum = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            checksum = zlib.crc32(chunk, checksum)
    return checksum


def list_step_files(folder: Path) -> list[str]:
    """Every file under a step folder but its manifest, relative and sorted: what the manifest lists."""
    return [str(path.relative_to(folder)) for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST]


def describe_file(path: Path) -> dict[str, int]:
    """A file's manifest entry: its size and crc32."""
    return {"bytes": path.stat().st_size, "crc32": _crc32(path)}


def _file_problem(folder: Path, name: str, expected: dict[str, int]) -> str | None:
    path = folder / name
    if not path.is_file():
        return f"missing {name}"
    if path.stat().st_size != expected["bytes"] or _crc32(path) != expected["crc32"]:
        return f"{name} does not match its manifest (damaged)"
    return None


def read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, why the folder is not a finished checkpoint)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None, "no manifest (unfinished write)"
    try:
        return json.loads(manifest_path.read_text()), None
    except ValueError:
        return None, "unreadable manifest"


def checkpoint_problem(folder: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """Why the checkpoint folder is not usable, or None when every file of this rank's share
    (every world_size-th file from the rank-th; all of them by default) matches its manifest."""
    manifest, problem = read_manifest(folder)
    if problem is not None:
        return problem
    share = sorted(manifest["files"].items())[rank::world_size]
    return next((found for name, expected in share if (found := _file_problem(folder, name, expected))), None)


def list_checkpoints(checkpoint_dir: Path) -> list[str]:
    """Final (non-temporary) tags, newest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted((p.name for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)), reverse=True)
