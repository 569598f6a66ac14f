"""The set-up of a training run, before its first step: the data world rank 0 reads and shares,
the run folder, the model in its DeepSpeed engine, the alignment objective, the resumed state and
the training loader."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from vlpdist.atomic import atomic_write_text
from vlpdist.config import Config, save_config
from vlpdist.data.feature_format import read_label_vocabulary
from vlpdist.data.feature_shards import (
    ShardPlan,
    build_shard_plan,
    build_train_loader,
    clip_width_of,
    count_shard_share,
    list_feature_shards,
    merge_shard_shares,
    plan_differences,
    shard_sample_counts,
    split_heldout,
)
from vlpdist.data.provenance import PROVENANCE_FILE, copy_provenance, read_provenance
from vlpdist.errors import UserError
from vlpdist.parallel.engine import (
    DistInfo,
    broadcast_from_main,
    build_engine,
    device_of,
    expert_parallel_rank,
    gather_to_main,
)
from vlpdist.train.checkpoint import load_latest_checkpoint, remove_checkpoint_tags
from vlpdist.train.state import TrainState


@dataclass
class DataWorld:
    """What rank 0 reads of the feature folder and sends to every rank: the training plan (with
    the held-out shard names), the held-out sample count, the CLIP width, or the user error that
    stops every rank alike."""

    plan: ShardPlan | None = None
    heldout_samples: int = 0
    clip_dim: int = 0
    counted_from_tars: int = 0
    label_names: list[str] | None = None
    error: str | None = None


def run_paths(config: Config) -> tuple[Path, Path]:
    """The run folder and the feature folder."""
    run_dir = Path(config.train.output_dir)
    features = Path(config.train.features_dir) if config.train.features_dir else Path(config.root) / "features"
    return run_dir, features


def read_data_world(config: Config, world_size: int, features_dir: Path,
                    shares: list[tuple[dict[str, int], str | None]]) -> DataWorld:
    """On rank 0 only: list the shards, check every rank's `shares` of their counts against the
    processing stats, and build the plan."""
    train = config.train
    try:
        tar_counts = merge_shard_shares(shares)
        train_shards, heldout_shards = split_heldout(list_feature_shards(features_dir), train.heldout_shards)
        counts, counted = shard_sample_counts(train_shards, tar_counts)
        plan = build_shard_plan(
            train_shards, world_size, train.num_workers, train.micro_batch_size, train.seed, heldout_shards, counts,
        )
        first_full = next(shard for shard, count in zip(train_shards, counts) if count > 0)
        clip_dim = clip_width_of(first_full)
        heldout_samples = sum(shard_sample_counts(heldout_shards, tar_counts)[0])
        label_names = read_label_vocabulary(features_dir)
        read_provenance(features_dir)  # validated here, where its error reaches every rank; prepare_run_folder copies it
    except UserError as err:
        return DataWorld(error=str(err))
    except Exception as err:  # noqa: BLE001 - any failure here must reach the other ranks, not leave them waiting
        message = f"reading the feature folder {features_dir} failed: {type(err).__name__}: {err}"
        return DataWorld(error=message)
    return DataWorld(plan, heldout_samples, clip_dim, counted, label_names)


def share_data_world(config: Config, info: DistInfo, features_dir: Path) -> DataWorld:
    """Collective: rank 0's DataWorld on every rank (so ranks can never disagree about the plan);
    every rank counts its share of the shards' samples for it first."""
    shares = gather_to_main(count_shard_share(features_dir, info.rank, info.world_size))
    world = broadcast_from_main(read_data_world(config, info.world_size, features_dir, shares) if info.is_main else None,
                                device_of(info))
    if world.error is not None:
        raise UserError(world.error)
    return world


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (a run killed after it), and a torn
    last line (a run killed mid-write)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def describe_plan(plan: ShardPlan, counted_from_tars: int) -> str:
    left = plan.left_out_per_epoch
    counted = f" ({counted_from_tars} counted from their tars: no processing stats)" if counted_from_tars else ""
    return (
        f"data plan {plan.fingerprint()}: {plan.total_samples} training samples in {len(plan.shards)} shards{counted} over "
        f"{plan.world_size} ranks x {plan.workers_per_rank} loader workers: {plan.batches_per_slot} micro-batches of "
        f"{plan.micro_batch_size} per slot and epoch; {left} samples ({100 * left / plan.total_samples:.2f} %) left out per epoch"
    )


def prepare_run_folder(config: Config, run_dir: Path, features_dir: Path, world: DataWorld) -> None:
    """On rank 0 only: the run folder with the resolved config and the features' provenance, the
    earlier checkpoints removed under `train.overwrite`; prints the data plan."""
    train = config.train
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir)
    if not train.resume and train.overwrite and (removed := remove_checkpoint_tags(run_dir / "checkpoints")):
        print(f"train.overwrite: removed the earlier checkpoints {', '.join(removed)} from {run_dir / 'checkpoints'}", flush=True)
    # The export carries it, so inference prepares images as the features' images were prepared.
    if copy_provenance(features_dir, run_dir) is None:
        print(f"note: {features_dir} has no {PROVENANCE_FILE} (features from an older vlpdist): the export cannot "
              "tell inference how their images were prepared, nor which CLIP made them", flush=True)
    print(describe_plan(world.plan, world.counted_from_tars), flush=True)


def resume_state_for(plan: ShardPlan, replan: bool, is_main: bool) -> Callable[[dict], TrainState]:
    """The checkpoint loader's `resume_state`: the saved state if the data plan is unchanged; else a
    one-line error naming what changed, or, with `replan`, the state moved to the next epoch
    boundary under the new plan (its data position counts from there)."""

    def resume_state(manifest: dict) -> TrainState:
        state = TrainState.from_dict(manifest["train_state"])
        saved = manifest.get("data_plan") or {}
        changes = plan_differences(saved, plan.describe()) if saved else ["the checkpoint records no data plan"]
        if not changes:
            return state
        tag = manifest.get("tag", "?")
        if not replan:
            raise UserError(
                f"checkpoint {tag} was made with another data plan ({'; '.join(changes)}), so its data position would "
                "point at other samples; restore that plan, or set train.replan_on_resume=true to start the new plan "
                "at the next epoch boundary"
            )
        if not saved:
            next_epoch = 0
        else:
            old = ShardPlan([name for name, _ in saved["shards"]], [count for _, count in saved["shards"]],
                            saved["world_size"], saved["num_workers"], saved["micro_batch_size"], saved["seed"],
                            shuffle_buffer=saved["shuffle_buffer"], first_epoch=state.plan_first_epoch)
            epoch, into = old.epoch_of_position(state.data_position)
            next_epoch = epoch + (1 if into else 0)
        state.plan_first_epoch, state.data_position = next_epoch, 0
        if is_main:
            print(f"re-planned on resume from {tag} ({'; '.join(changes)}): the new plan starts at epoch {next_epoch}"
                  + (f" (the rest of epoch {next_epoch - 1} is not read)" if saved and into else ""), flush=True)
        return state

    return resume_state


def resume_or_start(config: Config, info: DistInfo, engine, run_dir: Path, plan: ShardPlan, extras) -> TrainState:
    """The latest checkpoint's state under `train.resume` (the engine and `extras` loaded from it),
    else a fresh one; the plan starts at the state's epoch, and rank 0 drops metrics logged past it."""
    train = config.train
    checkpoint_dir = run_dir / "checkpoints"
    state = None
    if train.resume:
        state = load_latest_checkpoint(engine, checkpoint_dir, config.model.freeze_lm, device_of(info),
                                       resume_state_for(plan, train.replan_on_resume, info.is_main), extras)
    state = state or TrainState()
    plan.first_epoch = state.plan_first_epoch
    if info.is_main:
        if state.step:
            print(f"resumed from step {state.step} (data position {state.data_position}) in {checkpoint_dir}", flush=True)
        truncate_metrics(run_dir / "metrics.jsonl", state.step)
    return state


def build_model_and_engine(config: Config, info: DistInfo, run_dir: Path, clip_dim: int, consolidated=None,
                           optimizer_params: dict | None = None):
    from vlpdist.models.captioner import build_captioner
    from vlpdist.models.mapper import check_model_config

    check_model_config(config.model, config.train.ep_size)
    ep_rank_of_this_process = info.rank % config.train.ep_size
    # Seeded by expert-parallel rank so that the ranks of one group draw different experts;
    # DeepSpeed then broadcasts the dense params from the first rank (and each expert within
    # its expert-data-parallel group), so replicas agree.
    torch.manual_seed(config.train.seed + ep_rank_of_this_process)
    model = build_captioner(
        config.model, clip_dim, config.train.ep_size, consolidated_state=consolidated, ep_rank=ep_rank_of_this_process,
        align=config.align,
    ).to(device_of(info))
    engine, scheduler = build_engine(model, config.train, info, run_dir, optimizer_params)
    if config.train.ep_size > 1 and expert_parallel_rank(config.train.ep_size) != ep_rank_of_this_process:
        raise RuntimeError("DeepSpeed's expert-parallel rank layout is not rank % ep_size")
    if config.train.compile:
        compiled = model.compile_for_training()
        if info.is_main:
            print(f"torch.compile: {', '.join(compiled)} for the training step; the first steps compile them", flush=True)
    return engine, scheduler


def build_alignment_objective(config: Config, captioner, world: DataWorld, device: torch.device):
    """The ITC / SupCon objective with its bank and momentum model, or None when both are off."""
    if not config.align.enabled:
        return None
    from vlpdist.losses.distributed import DataParallelContext
    from vlpdist.train.alignment import AlignmentObjective

    num_labels = 0
    if config.align.supcon_weight > 0:
        if world.label_names is None:
            raise UserError(
                "align.supcon_weight > 0 needs the label vocabulary recorded with the features (label_vocabulary.json); "
                "rerun the processing stage"
            )
        num_labels = len(world.label_names)
    return AlignmentObjective(config, captioner, DataParallelContext.from_default_group(device), num_labels)


def open_tensorboard(run_dir: Path, info: DistInfo, state: TrainState, plan: ShardPlan):
    from vlpdist.monitor.tensorboard import TensorBoardLogger

    # Past the resumed step (or from step 1 on a fresh start), events of a run that was cut off are
    # dropped, so curves do not double back.
    tb = TensorBoardLogger(run_dir / "tb", info.is_main, purge_step=state.step + 1)
    tb.scalars({"data/left_out_per_epoch": plan.left_out_per_epoch}, state.step)
    return tb


def build_step_loader(config: Config, captioner, plan: ShardPlan, info: DistInfo, state: TrainState):
    """The training batches from the state's data position: captions, or question prompts + answers
    for the LM (`train.question_fraction`), tokenised in the loader workers."""
    from vlpdist.data.feature_shards import QuestionSampling
    from vlpdist.models.captioner import tokenize_captions, tokenize_lm_inputs

    train = config.train
    # Captions are tokenised in the loader workers; pinned batches copy to the GPU without blocking.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked after the tokenizer ran
    # The alignment text (captions) and the LM's input (captions, or question prompts + answers).
    tokenize = partial(tokenize_captions, captioner.tokenizer, config.model.max_caption_tokens)
    lm_inputs = partial(tokenize_lm_inputs, captioner.tokenizer, config.model.max_caption_tokens,
                        config.model.max_answer_tokens, config.model.question_template)
    sampling = QuestionSampling(train.question_fraction, train.answer_target, train.seed, train.paraphrase_prob,
                                train.paraphrase_targets)
    return iter(build_train_loader(plan, info.rank, state.data_position, tokenize, pin_memory=info.on_gpu,
                                   lm_inputs=lm_inputs, sampling=sampling))
