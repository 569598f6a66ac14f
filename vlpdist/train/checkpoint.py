"""Step-numbered DeepSpeed checkpoints, written atomically, last K kept, damaged ones skipped.

Retention keeps the tag just written (the one `latest` names) whatever its step, and the newest
others up to `train.keep_checkpoints` in all: a save below older, higher tags (a resume past a
damaged newer tag) never prunes itself. A folder holding checkpoints is resumed, or refused with
`train.resume=false`, unless `train.overwrite=true` asks to remove its checkpoint tags first
(`check_checkpoint_dir`, `remove_checkpoint_tags`): a new run never mixes its tags with an old one's.

Layout under `<run>/checkpoints/`:

    step_00000100/          engine.save_checkpoint output (module, experts per EP rank, ZeRO
                            optimizer partitions, scheduler), rng_rank00000.pt ... (one per
                            rank), manifest.json (train_state, world size, the data plan and its
                            fingerprint, size + crc32 of every file; written last),
                            extra_<name>_rank00000.safetensors ... (state beside the engine's:
                            the memory bank, the momentum model; see `CheckpointExtra`)
    latest                  the newest complete tag, DeepSpeed's own format, updated last

All ranks write into `.tmp_step_00000100`; after a barrier every rank checksums its share of the
files (the union of every rank's listing, sorted; rank r takes every world_size-th name from the r-th), rank 0
gathers the sums, writes the manifest, renames the folder to its final name and only then rewrites
`latest`. Spreading the checksums keeps a tuned LM's GBs from being read by one rank while the
others wait at a barrier bounded by the distributed timeout. A crash at any point leaves either
the previous checkpoint as latest or a complete new one. On load, a tag whose manifest is missing
or does not match the files (a damaged latest; each rank checks its share and the verdicts are
gathered) is skipped with a warning and the previous one used.

Trust boundary: DeepSpeed's `load_checkpoint` reads its `.pt` files with `torch.load`
(weights_only=False), i.e. unpickles them. Resume only from checkpoints your own runs wrote; the
safetensors export is the format to share.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from vlpdist.atomic import atomic_write_json, atomic_write_text
from vlpdist.errors import UserError
# The step folder's names and readers (below both this module and the offline consolidation).
from vlpdist.parallel.checkpoint_files import (  # noqa: F401 (LATEST, MANIFEST and the readers are used by callers too)
    LATEST,
    MANIFEST,
    TAG_PREFIX,
    describe_file,
    list_step_files,
    checkpoint_problem,
    list_checkpoints,
    read_manifest,
    tag_for_step,
)
from vlpdist.parallel.engine import all_gather_values, broadcast_from_main, gather_to_main
from vlpdist.train.state import TrainState, capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)


def tags_to_prune(tags: Sequence[str], written: str, keep: int) -> list[str]:
    """Of `tags` (newest first), those retention removes after `written` was saved (and named `latest`):
    `written` is never one, and counts as the first of the `keep` kept."""
    return [tag for tag in tags if tag != written][max(keep - 1, 0):]


def check_checkpoint_dir(checkpoint_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run (`resume=false`) over another run's checkpoints unless `overwrite` says so:
    its saves would mix with theirs and a later resume could continue the wrong run."""
    if resume or overwrite:
        return
    found = list_checkpoints(checkpoint_dir) or ([LATEST] if (checkpoint_dir / LATEST).is_file() else [])
    if found:
        raise UserError(f"train.resume=false but {checkpoint_dir} holds checkpoints ({found[0]}, ...): resume (train.resume=true), "
                        "choose another train.output_dir, or set train.overwrite=true to remove those checkpoints first")


def remove_checkpoint_tags(checkpoint_dir: Path) -> list[str]:
    """`train.overwrite`: remove the checkpoint tags (`step_NNNNNNNN`, their `.tmp_` staging) and `latest`
    from `checkpoint_dir`; every other file there is not a checkpoint of ours and stays. The names removed."""
    if not checkpoint_dir.is_dir():
        return []
    removed = []
    for path in sorted(checkpoint_dir.iterdir()):
        tag = path.name.removeprefix(".tmp_")
        is_tag = tag.startswith(TAG_PREFIX) and tag[len(TAG_PREFIX):].isdigit() and path.is_dir() and not path.is_symlink()
        if is_tag or (path.name == LATEST and path.is_file()):
            shutil.rmtree(path) if is_tag else path.unlink()
            removed.append(path.name)
    return removed


def _resume_candidates(checkpoint_dir: Path) -> list[str]:
    tags = list_checkpoints(checkpoint_dir)
    latest_file = checkpoint_dir / LATEST
    if latest_file.is_file():
        latest = latest_file.read_text().strip()
        tags = [latest] + [tag for tag in tags if tag != latest]
    return tags


class CheckpointExtra(Protocol):
    """State a run keeps beside the engine's (a memory bank, a momentum model), saved as safetensors.

    `source_rank(rank)` names the rank whose copy `rank` holds: state identical on every rank is
    written once (source 0), state sharded like the experts once per expert-parallel rank."""

    name: str

    def source_rank(self, rank: int) -> int: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


def extra_file_name(name: str, rank: int) -> str:
    return f"extra_{name}_rank{rank:05d}.safetensors"


def save_checkpoint(
    engine, checkpoint_dir: Path, state: TrainState, keep: int, exclude_frozen: bool, data_plan: dict, device: torch.device,
    extras: Sequence[CheckpointExtra] = (),
) -> Path:
    """Collective: every rank calls it. `data_plan` (the loader plan's description) is recorded
    with its fingerprint, so a resume can refuse a plan its data position does not fit; `extras`
    are written as safetensors by their source ranks (covered by the manifest like every file).
    Returns the final folder."""
    import torch.distributed as dist

    from vlpdist.data.feature_shards import plan_fingerprint

    rank, world_size = dist.get_rank(), dist.get_world_size()
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
    from safetensors.torch import save_file

    for extra in extras:
        if extra.source_rank(rank) == rank:
            save_file(extra.state_tensors(), str(tmp / extra_file_name(extra.name, rank)))
    dist.barrier()
    # Every rank lists the folder and the union counts: on a shared file system with cached
    # directory attributes, rank 0 may not see yet what another node has just written.
    names = sorted(set().union(*all_gather_values(list_step_files(tmp))))
    shares = gather_to_main({name: describe_file(tmp / name) for name in names[rank::world_size]})
    if rank == 0:
        files = {name: described for share in shares for name, described in share.items()}
        atomic_write_json(tmp / MANIFEST, {
            "tag": tag, "world_size": world_size, "train_state": state.to_dict(),
            "data_plan": data_plan, "data_plan_fingerprint": plan_fingerprint(data_plan), "files": dict(sorted(files.items())),
        })
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(checkpoint_dir / LATEST, tag)
        from vlpdist.parallel.consolidate import replace_deepspeed_consolidation_script

        # DeepSpeed copies its zero_to_fp32.py beside the tags on every save; it cannot read MoE checkpoints.
        replace_deepspeed_consolidation_script(checkpoint_dir)
        for old in tags_to_prune(list_checkpoints(checkpoint_dir), tag, keep):
            shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    dist.barrier()
    return final


def _check_extras(folder: Path, rank: int, extras: Sequence[CheckpointExtra]) -> None:
    """Collective, before DeepSpeed loads anything: a checkpoint without this run's extra state was
    made with other settings. Every rank's verdict is gathered, so all ranks stop alike (a rank
    raising alone would leave the others waiting in DeepSpeed's load)."""
    missing = [folder / extra_file_name(extra.name, extra.source_rank(rank)) for extra in extras]
    problem = next((f"{extra.name} state ({path.name})" for extra, path in zip(extras, missing) if not path.is_file()), None)
    problem = next((verdict for verdict in all_gather_values(problem) if verdict is not None), None)
    if problem is not None:
        raise UserError(
            f"checkpoint {folder} has no {problem}: it was made with other alignment or expert-parallel "
            "settings; resume with those, or start a new train.output_dir"
        )


def _load_extras(folder: Path, rank: int, extras: Sequence[CheckpointExtra]) -> None:
    from safetensors.torch import load_file

    for extra in extras:
        extra.load_state_tensors(load_file(str(folder / extra_file_name(extra.name, extra.source_rank(rank)))))


def load_latest_checkpoint(
    engine, checkpoint_dir: Path, exclude_frozen: bool, device: torch.device, resume_state: Callable[[dict], TrainState],
    extras: Sequence[CheckpointExtra] = (),
) -> TrainState | None:
    """Collective: restore engine, RNG and TrainState from the newest usable checkpoint (None if none).

    `resume_state(manifest)` turns the manifest into the state to continue from, or raises a
    UserError (e.g. the data plan changed); it sees the same manifest on every rank, so every
    rank decides alike before any rank loads."""
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    # Rank 0 lists the folder once, so all ranks try the same tags in the same order.
    for tag in broadcast_from_main(_resume_candidates(checkpoint_dir) if rank == 0 else None, device):
        folder = checkpoint_dir / tag
        verdicts = all_gather_values(checkpoint_problem(folder, rank, world_size))
        problem = next((verdict for verdict in verdicts if verdict is not None), None)
        if problem is not None:
            if rank == 0:
                log.warning("checkpoint %s skipped: %s; falling back to the previous one", folder, problem)
            continue
        manifest = broadcast_from_main(read_manifest(folder)[0] if rank == 0 else None, device)
        if manifest["world_size"] != world_size:
            raise UserError(
                f"checkpoint {folder} was written by {manifest['world_size']} ranks, this run has "
                f"{world_size}; resume with the same world size or start a new train.output_dir "
                "(the fp32 export reloads at any size)"
            )
        state = resume_state(manifest)
        _check_extras(folder, rank, extras)
        engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_module_strict=not exclude_frozen)
        restore_rng_state(torch.load(folder / f"rng_rank{rank:05d}.pt", weights_only=True))
        _load_extras(folder, rank, extras)
        return state
    return None
