"""Step-numbered DeepSpeed checkpoints, written atomically, last K kept, damaged ones skipped.

Layout under `<run>/checkpoints/`:

    step_00000100/          engine.save_checkpoint output (module, experts per EP rank, ZeRO
                            optimizer partitions, scheduler), rng_rank00000.pt ... (one per
                            rank), manifest.json (train_state, world size, size + crc32 of every
                            file; written last)
    latest                  the newest complete tag, DeepSpeed's own format, updated last

All ranks write into `.tmp_step_00000100`; after a barrier rank 0 writes the manifest, renames the
folder to its final name and only then rewrites `latest`. A crash at any point leaves either the
previous checkpoint as latest or a complete new one. On load, a tag whose manifest is missing or
does not match the files (a damaged latest) is skipped with a warning and the previous one used.
"""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from pathlib import Path

import torch

from vlpdist.atomic import atomic_write_json, atomic_write_text
from vlpdist.errors import UserError
from vlpdist.train.state import TrainState, capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

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


def _describe_files(folder: Path) -> dict[str, dict[str, int]]:
    return {
        str(path.relative_to(folder)): {"bytes": path.stat().st_size, "crc32": _crc32(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint folder is not usable, or None when every file matches its manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (unfinished write)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return "unreadable manifest"
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != expected["bytes"] or _crc32(path) != expected["crc32"]:
            return f"{name} does not match its manifest (damaged)"
    return None


def list_checkpoints(checkpoint_dir: Path) -> list[str]:
    """Final (non-temporary) tags, newest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted((p.name for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)), reverse=True)


def _resume_candidates(checkpoint_dir: Path) -> list[str]:
    tags = list_checkpoints(checkpoint_dir)
    latest_file = checkpoint_dir / LATEST
    if latest_file.is_file():
        latest = latest_file.read_text().strip()
        tags = [latest] + [tag for tag in tags if tag != latest]
    return tags


def save_checkpoint(engine, checkpoint_dir: Path, state: TrainState, keep: int, exclude_frozen: bool) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    import torch.distributed as dist

    rank = dist.get_rank()
    tag = tag_for_step(state.step)
    final = checkpoint_dir / tag
    tmp_tag = f".tmp_{tag}"
    tmp = checkpoint_dir / tmp_tag
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for leftover in checkpoint_dir.glob(".tmp_*"):  # from a save that crashed
            shutil.rmtree(leftover, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(
        str(checkpoint_dir),
        tag=tmp_tag,
        save_latest=False,
        exclude_frozen_parameters=exclude_frozen,
    )
    torch.save(capture_rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        atomic_write_json(
            tmp / MANIFEST,
            {"tag": tag, "world_size": dist.get_world_size(), "train_state": state.to_dict(), "files": _describe_files(tmp)},
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(checkpoint_dir / LATEST, tag)
        for old in list_checkpoints(checkpoint_dir)[keep:]:
            shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    dist.barrier()
    return final


def load_latest_checkpoint(engine, checkpoint_dir: Path, exclude_frozen: bool) -> TrainState | None:
    """Collective: restore engine, RNG and TrainState from the newest usable checkpoint (None if none)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    for tag in _resume_candidates(checkpoint_dir):
        # Rank 0 reads the files once and tells the others, so all ranks try the same tag.
        verdict = [checkpoint_problem(checkpoint_dir / tag) if rank == 0 else None]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            if rank == 0:
                log.warning("checkpoint %s skipped: %s; falling back to the previous one", checkpoint_dir / tag, verdict[0])
            continue
        manifest = json.loads((checkpoint_dir / tag / MANIFEST).read_text())
        if manifest["world_size"] != dist.get_world_size():
            raise UserError(
                f"checkpoint {checkpoint_dir / tag} was written by {manifest['world_size']} ranks, this run has "
                f"{dist.get_world_size()}; resume with the same world size or start a new train.output_dir "
                "(the fp32 export reloads at any size)"
            )
        engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_module_strict=not exclude_frozen)
        restore_rng_state(torch.load(checkpoint_dir / tag / f"rng_rank{rank:05d}.pt", weights_only=True))
        return TrainState.from_dict(manifest["train_state"])
    return None
