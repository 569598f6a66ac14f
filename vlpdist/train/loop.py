"""The training loop: feature shards -> DeepSpeed engine steps, with checkpoints, logging, NaN
skipping, preemption, and at the end a checkpoint, the consolidated fp32 export and evaluation.

Every rank runs this function (launched by `deepspeed`, `srun` or `torchrun`); rank 0 alone writes
the run folder's shared files and builds the data plan, which it sends to the others. Decisions
that must be the same on all ranks (stop for preemption, the logged terms) ride on one all-reduce
per optimizer step, on the engine's device; skipping a non-finite step is decided by DeepSpeed's
own global grad-norm check, the same on every rank.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from vlpdist.atomic import atomic_path, atomic_write_json, atomic_write_text
from vlpdist.config import Config, save_config
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
from vlpdist.data.feature_format import read_label_vocabulary
from vlpdist.data.provenance import PROVENANCE_FILE, copy_provenance, read_provenance
from vlpdist.errors import UserError
from vlpdist.losses.terms import loss_weights, weighted_total
from vlpdist.parallel.deepspeed_config import check_train_config
from vlpdist.parallel.consolidate import EXPORT_WEIGHTS  # the export's weights file, shared with offline consolidation
from vlpdist.parallel.engine import (
    DistInfo,
    broadcast_from_main,
    build_engine,
    consolidated_state_dict,
    device_of,
    expert_parallel_rank,
    gather_to_main,
    init_distributed,
    sum_over_ranks,
)
from vlpdist.train.checkpoint import check_checkpoint_dir, load_latest_checkpoint, remove_checkpoint_tags, save_checkpoint
from vlpdist.train.state import TrainState

PREEMPTED_EXIT_CODE = 3
"""Exit code of a run stopped by SIGUSR2/SIGTERM after writing its checkpoint (requeue me)."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StoppedBySignal(BaseException):
    """A stop signal during the export or evaluation after training: nothing is left to checkpoint,
    so the process stops there (a BaseException, like KeyboardInterrupt, so that no `except
    Exception` swallows it and every `finally` still removes its staging)."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal
        super().__init__(self.signal_name)


class PreemptionSignal:
    """Remembers SIGUSR2 (Slurm's `--signal`) and SIGTERM during training; the loop checks at step
    boundaries. Once training is over (`training_over`), the same signals stop the process at once."""

    def __init__(self):
        self.received: str | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name  # the first one says why

    def tolerate_stopped_loader_workers(self) -> None:
        """Call after the loader's workers started. Slurm signals every process of a job step, the
        loader workers too, and they die of it (they keep the default SIGTERM); torch's SIGCHLD
        handler would then raise in the middle of the step that is about to be checkpointed. Once
        a stop signal has come, a worker's death is left to the loader's own check, which raises
        only if the loop still asks it for a batch."""
        torch_handler = signal.getsignal(signal.SIGCHLD)
        if not callable(torch_handler):
            return

        def on_child_exit(signum, frame) -> None:
            if self.received is None:
                torch_handler(signum, frame)

        signal.signal(signal.SIGCHLD, on_child_exit)

    def training_over(self) -> None:
        """From here on (export, evaluation) a stop signal raises `StoppedBySignal`; one that came
        after the last step's check does so now."""
        if self.received is not None:
            raise StoppedBySignal(signal.Signals[self.received])
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise_stopped)


def _raise_stopped(signum, frame) -> None:
    raise StoppedBySignal(signum)


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


@dataclass
class StepWindow:
    """Sums over ranks since the last TensorBoard write, for means and throughput."""

    terms: dict[str, float] = field(default_factory=dict)
    expert_load: list[float] | None = None
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


def _paths(config: Config) -> tuple[Path, Path]:
    run_dir = Path(config.train.output_dir)
    features = Path(config.train.features_dir) if config.train.features_dir else Path(config.root) / "features"
    return run_dir, features


def _read_data_world(config: Config, world_size: int, features_dir: Path,
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
        read_provenance(features_dir)  # validated here, where its error reaches every rank; run_training copies it
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
    world = broadcast_from_main(_read_data_world(config, info.world_size, features_dir, shares) if info.is_main else None,
                                device_of(info))
    if world.error is not None:
        raise UserError(world.error)
    return world


def _truncate_metrics(path: Path, step: int) -> None:
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


def _describe_plan(plan: ShardPlan, counted_from_tars: int) -> str:
    left = plan.left_out_per_epoch
    counted = f" ({counted_from_tars} counted from their tars: no processing stats)" if counted_from_tars else ""
    return (
        f"data plan {plan.fingerprint()}: {plan.total_samples} training samples in {len(plan.shards)} shards{counted} over "
        f"{plan.world_size} ranks x {plan.workers_per_rank} loader workers: {plan.batches_per_slot} micro-batches of "
        f"{plan.micro_batch_size} per slot and epoch; {left} samples ({100 * left / plan.total_samples:.2f} %) left out per epoch"
    )


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


def compile_summary() -> str:
    """What torch.compile did in this process: graphs made and graph breaks (each break is eager code
    between two graphs; DeepSpeed's MoE gating makes some, reading its capacity with `int()`)."""
    from torch._dynamo.utils import counters

    return (f"torch.compile: {counters['stats']['unique_graphs']} graphs, "
            f"{sum(counters['graph_break'].values())} graph breaks")


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


def run_training(config: Config, stop_marker: Path | None = None) -> int:
    """Train (resuming if a checkpoint exists), then checkpoint, export and evaluate. Returns the exit code.

    Stopped by a signal after writing its checkpoint, it returns PREEMPTED_EXIT_CODE; or, given
    `stop_marker`, rank 0 writes that file (the step and signal) and every rank returns 0, so that a
    launcher which kills all ranks when one exits non-zero (`srun --kill-on-bad-exit`) sees no failure.
    A signal after the training steps raises `StoppedBySignal`."""
    from vlpdist.data.feature_shards import QuestionSampling
    from vlpdist.models.captioner import tokenize_captions, tokenize_lm_inputs

    train = config.train
    check_train_config(train, int(os.environ.get("WORLD_SIZE", "1")))  # fail fast, before any heavy set-up
    check_checkpoint_dir(Path(train.output_dir) / "checkpoints", train.resume, train.overwrite)
    info = init_distributed(train.dist_timeout_s, train.rendezvous_timeout_s)
    device = device_of(info)
    run_dir, features_dir = _paths(config)
    world = share_data_world(config, info, features_dir)
    plan = world.plan
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir)
        if not train.resume and train.overwrite and (removed := remove_checkpoint_tags(run_dir / "checkpoints")):
            print(f"train.overwrite: removed the earlier checkpoints {', '.join(removed)} from {run_dir / 'checkpoints'}", flush=True)
        # The export carries it, so inference prepares images as the features' images were prepared.
        if copy_provenance(features_dir, run_dir) is None:
            print(f"note: {features_dir} has no {PROVENANCE_FILE} (features from an older vlpdist): the export cannot "
                  "tell inference how their images were prepared, nor which CLIP made them", flush=True)
        print(_describe_plan(plan, world.counted_from_tars), flush=True)
    engine, scheduler = build_model_and_engine(config, info, run_dir, world.clip_dim)
    objective = build_alignment_objective(config, engine.module, world, device)
    extras = objective.checkpoint_extras() if objective is not None else []
    checkpoint_dir = run_dir / "checkpoints"
    exclude_frozen = config.model.freeze_lm
    state = None
    if train.resume:
        state = load_latest_checkpoint(engine, checkpoint_dir, exclude_frozen, device, resume_state_for(plan, train.replan_on_resume, info.is_main),
                                       extras)
    state = state or TrainState()
    plan.first_epoch = state.plan_first_epoch
    if info.is_main:
        if state.step:
            print(f"resumed from step {state.step} (data position {state.data_position}) in {checkpoint_dir}", flush=True)
        _truncate_metrics(run_dir / "metrics.jsonl", state.step)
    from vlpdist.monitor.tensorboard import TensorBoardLogger

    # Past the resumed step (or from step 1 on a fresh start), events of a run that was cut off are
    # dropped, so curves do not double back.
    tb = TensorBoardLogger(run_dir / "tb", info.is_main, purge_step=state.step + 1)
    tb.scalars({"data/left_out_per_epoch": plan.left_out_per_epoch}, state.step)
    preemption = PreemptionSignal()
    # Captions are tokenised in the loader workers; pinned batches copy to the GPU without blocking.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked after the tokenizer ran
    # The alignment text (captions) and the LM's input (captions, or question prompts + answers).
    tokenize = partial(tokenize_captions, engine.module.tokenizer, config.model.max_caption_tokens)
    lm_inputs = partial(tokenize_lm_inputs, engine.module.tokenizer, config.model.max_caption_tokens,
                        config.model.max_answer_tokens, config.model.question_template)
    sampling = QuestionSampling(train.question_fraction, train.answer_target, train.seed, train.paraphrase_prob,
                                train.paraphrase_targets)
    loader = iter(build_train_loader(plan, info.rank, state.data_position, tokenize, pin_memory=info.on_gpu,
                                     lm_inputs=lm_inputs, sampling=sampling))
    preemption.tolerate_stopped_loader_workers()
    last_saved_step = state.step  # what is on disk, known from this loop's memory (not from a shared file system)
    steps_before, samples_before, started = state.step, state.samples_seen, time.perf_counter()
    try:
        stopped, last_saved_step = _train_steps(config, info, engine, scheduler, loader, state, tb, preemption, run_dir, plan,
                                                last_saved_step, objective, extras)
        if train.compile and info.is_main:
            print(compile_summary(), flush=True)
        if objective is not None and info.is_main:
            for line in objective.summary_lines():
                print(line, flush=True)
        if state.step > last_saved_step:
            save_checkpoint(engine, checkpoint_dir, state, train.keep_checkpoints, exclude_frozen, plan.describe(), device, extras)
        if stopped:
            exit_code = 0 if stop_marker is not None else PREEMPTED_EXIT_CODE
            if info.is_main:
                cause = preemption.received or "a signal to another rank"
                if stop_marker is not None:  # after save_checkpoint, which returns once every rank's part is written
                    atomic_write_text(stop_marker, f"{state.step} {cause}\n")
                print(f"stopped by {cause} at step {state.step}; checkpoint written, exit {exit_code}", flush=True)
            return exit_code
        preemption.training_over()
        if train.export_at_end:
            export_consolidated(engine.module, config, run_dir / "export", info, world.clip_dim, state.step)
        training = {"steps": state.step - steps_before, "samples": state.samples_seen - samples_before,
                    "wall_s": time.perf_counter() - started}
        training["samples_per_s"] = training["samples"] / max(training["wall_s"], 1e-9)
        if train.eval_at_end:
            result = evaluate(engine.module, config, world, info)
            vqa = evaluate_questions(engine.module, config, world, info)
            if result is not None or vqa is not None:  # rank 0 (held-out of questions only: no caption rows)
                result = {**(result or {}), "training": training}  # this launch's steps (after a resume: only its own)
                if objective is not None and objective.trust_summary() is not None:
                    result["geodesics"] = objective.trust_summary()  # this launch's refreshes, as the summary line says
                if vqa is not None:
                    result["vqa"] = vqa
                atomic_write_json(run_dir / "eval.json", result)
                _print_eval(result)
    finally:
        tb.close()
    return 0


def _train_steps(config, info, engine, scheduler, loader, state, tb, preemption, run_dir, plan, last_saved_step,
                 objective=None, extras=()) -> tuple[bool, int]:
    """Optimizer steps until max_steps; (stopped early by a preemption signal, last step saved).

    Per micro-batch: forward, backward, `engine.step()`; the loss terms and expert load stay on
    the device. Per optimizer step: ONE all-reduce of [terms of finite micro-batches, finite
    micro-batch count, expert load, micro-batches, tokens, samples, stop flag] and one host sync
    to read it.
    A non-finite loss gives non-finite gradients, and DeepSpeed then skips that optimizer step
    on every rank alike (its global grad-norm check is a collective): the loop counts it from
    `engine.was_step_applied()`, so no flag needs a collective of its own."""
    train = config.train
    device = device_of(info)
    window = StepWindow()
    metrics_path = run_dir / "metrics.jsonl"
    weights = loss_weights(config)
    term_names: list[str] | None = None
    while state.step < train.max_steps:
        sums_device = None
        tokens = samples = micro_batches = 0
        while True:
            batch = next(loader)
            if batch["position"] != state.data_position:
                raise RuntimeError(f"data stream at {batch['position']}, expected {state.data_position}")
            state.data_position += 1
            clip_BC = batch["clip"].to(device, non_blocking=True)
            # Alignment uses the caption text (a question-only sample's alignment text), never the prompt + answer.
            text_batch = {**batch, "input_ids": batch["text_ids"], "attention_mask": batch["text_mask"]}
            text_feature = objective.text_feature(engine.module, text_batch, device) if objective is not None else None
            out = engine(
                clip_BC,
                batch["input_ids"].to(device, non_blocking=True),
                batch["attention_mask"].to(device, non_blocking=True),
                text_feature,
                batch["target_mask"].to(device, non_blocking=True),
                batch["is_question"].to(device, non_blocking=True),
                batch["text_ids"].to(device, non_blocking=True),
                batch["text_mask"].to(device, non_blocking=True),
            )
            named = {name: value for name, value in out.items() if value.ndim == 0}
            if objective is not None:
                named.update(objective.terms(out, batch, clip_BC))
                objective.enqueue(state.step)
            named["loss"] = weighted_total(named, weights)
            if term_names is None:  # every scalar term (the model's and the losses') is logged
                term_names = list(named)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                lr = scheduler.get_last_lr()[0]  # the lr this step applies (engine.step moves the schedule on)
            engine.backward(named["loss"])
            engine.step()
            terms = torch.stack([named[name].detach().float() for name in term_names])
            finite = torch.isfinite(terms).all()
            micro_stats = torch.cat([torch.where(finite, terms, torch.zeros_like(terms)), finite.float()[None],
                                     out["expert_load"].detach().float()])
            sums_device = micro_stats if sums_device is None else sums_device + micro_stats
            tokens += int(batch["attention_mask"].sum())  # a CPU tensor from the loader: no device sync
            samples += len(batch["keys"])
            micro_batches += 1
            if boundary:
                break
        host_part = torch.tensor([micro_batches, tokens, samples, float(preemption.received is not None)], device=device)
        totals = sum_over_ranks(torch.cat([sums_device, host_part]), device).tolist()  # the step's collective and sync
        num_terms = len(term_names)
        finite_micro_batches = totals[num_terms]
        load_E = totals[num_terms + 1 : -4]
        all_micro_batches, step_tokens, step_samples, stop = int(totals[-4]), int(totals[-3]), int(totals[-2]), totals[-1] > 0
        losses_finite = finite_micro_batches == all_micro_batches
        state.samples_seen += step_samples
        applied = engine.was_step_applied()
        if applied and not losses_finite:
            raise TrainingDiverged(
                f"a non-finite loss at step {state.step + 1} reached an applied optimizer step: this DeepSpeed does not "
                "skip steps with non-finite gradients (vlpdist needs deepspeed>=0.19)"
            )
        if not applied and losses_finite:
            state.overflow_skipped += 1  # fp16 loss-scale calibration: DeepSpeed lowers the scale and goes on
        elif applied:
            state.consecutive_nan = 0
            state.step += 1
            if objective is not None:
                objective.after_applied_step(engine.module, state.step)
            means = {name: totals[i] / max(finite_micro_batches, 1) for i, name in enumerate(term_names)}
            window.steps += 1
            window.samples += step_samples
            window.tokens += step_tokens
            for name, value in means.items():
                window.terms[name] = window.terms.get(name, 0.0) + value
            window.expert_load = load_E if window.expert_load is None else [a + b for a, b in zip(window.expert_load, load_E)]
            grad_norm = engine.get_global_grad_norm()
            record = {
                "step": state.step,
                **means,
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "nan_skipped": state.nan_skipped,
                "overflow_skipped": state.overflow_skipped,
                "samples_seen": state.samples_seen,
                "epoch": batch["epoch"],
            }
            if info.is_main:
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if state.step % train.log_every == 0 or state.step == train.max_steps:
                _log_window(tb, window, record, info, objective.scalars() if objective is not None else {})
                window = StepWindow()
            if train.caption_log_every and state.step % train.caption_log_every == 0:
                _log_captions(engine.module, tb, batch, device, train.eval_max_new_tokens, state.step)
        else:
            state.nan_skipped += 1
            state.consecutive_nan += 1
            if state.consecutive_nan >= train.max_consecutive_nan_steps:
                raise TrainingDiverged(
                    f"{state.consecutive_nan} optimizer steps in a row had a non-finite loss or gradient and were skipped "
                    f"(after step {state.step}, data position {state.data_position}); stopping (train.max_consecutive_nan_steps="
                    f"{train.max_consecutive_nan_steps}). Lower train.lr or check the feature shards."
                )
        due = state.step > last_saved_step and state.step % train.checkpoint_every == 0
        if due or (stop and state.step > last_saved_step):
            save_checkpoint(engine, run_dir / "checkpoints", state, train.keep_checkpoints, config.model.freeze_lm,
                            plan.describe(), device, extras)
            last_saved_step = state.step
        if stop:
            return True, last_saved_step
    return False, last_saved_step


def _log_window(tb, window: StepWindow, record: dict, info: DistInfo, extra_scalars: dict[str, float]) -> None:
    elapsed = max(time.perf_counter() - window.started, 1e-9)
    scalars = {f"loss/{term}": total / window.steps for term, total in window.terms.items()}
    scalars.update({
        "opt/lr": record["lr"],
        "throughput/samples_per_s": window.samples / elapsed,
        "throughput/tokens_per_s": window.tokens / elapsed,
        "data/nan_skipped": record["nan_skipped"],
        "data/epoch": record["epoch"],
    })
    if record["grad_norm"] is not None:
        scalars["opt/grad_norm"] = record["grad_norm"]
    scalars.update(extra_scalars)
    step = record["step"]
    tb.scalars(scalars, step)
    if window.expert_load:
        # Loads summed over ranks and the window's micro-batches (in the per-step all-reduce), as fractions.
        total = sum(window.expert_load) or 1.0
        tb.expert_load([load / total for load in window.expert_load], step)
    tb.flush()
    if info.is_main:
        print(
            f"step {step} loss {scalars['loss/loss']:.4f} cap {scalars.get('loss/cap', float('nan')):.4f} "
            f"ans {scalars.get('loss/ans', float('nan')):.4f} lr {record['lr']:.2e} "
            f"{scalars['throughput/samples_per_s']:.0f} samples/s {scalars['throughput/tokens_per_s']:.0f} tokens/s",
            flush=True,
        )


def _log_captions(captioner, tb, batch, device, max_new_tokens: int, step: int) -> None:
    """Greedy captions of the first samples of the current batch (all ranks generate: the experts are spread)."""
    generated = captioner.generate_captions(batch["clip"][:4].to(device), max_new_tokens)
    tb.captions("captions/sample", list(zip(batch["caption"][:4], generated)), step)


def export_consolidated(captioner, config: Config, export_dir: Path, info: DistInfo, clip_dim: int, step: int) -> None:
    """Collective: rank 0 writes all experts by global id, fp32, as safetensors + the config, atomically."""
    from safetensors.torch import save_file

    state = consolidated_state_dict(captioner, config.train.ep_size, include_lm=not config.model.freeze_lm)
    if not info.is_main:
        return
    with atomic_path(export_dir) as staging:
        staging.mkdir()
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(staging / EXPORT_WEIGHTS))
        save_config(config, staging)
        atomic_write_json(staging / "export.json", {"clip_dim": clip_dim, "step": step, "includes_lm": not config.model.freeze_lm})
    print(f"exported consolidated fp32 model ({len(state)} tensors) to {export_dir}", flush=True)


def evaluate(captioner, config: Config, world: DataWorld, info: DistInfo) -> dict | None:
    """Collective: each data-parallel rank evaluates its share of the held-out samples; rank 0
    gathers, scores and returns the result (None elsewhere, and None everywhere without held-out shards)."""
    from vlpdist.data.feature_shards import iterate_heldout
    from vlpdist.models.captioner import load_language_model
    from vlpdist.train.evaluate import evaluate_heldout, merge_heldout, most_frequent_training_caption, score_captions

    train = config.train
    heldout_shards = [Path(path) for path in world.plan.heldout]
    num_samples = min(train.eval_max_samples, world.heldout_samples)
    # Every rank reads the same first samples, so all of them skip alike (no collective needed).
    if not heldout_shards or num_samples == 0 or next(iterate_heldout(heldout_shards, 1, num_samples), None) is None:
        if info.is_main:
            why = "the held-out samples hold questions only"
            if not heldout_shards or num_samples == 0:
                why = "no held-out shards (train.heldout_shards=0)" if not heldout_shards else "the held-out shards hold no samples"
            print(f"{why}: caption evaluation skipped", flush=True)
        return None
    # A tuned LM has learnt to expect the prefix: the baseline is then the LM as loaded, before training.
    baseline_lm = captioner.lm if config.model.freeze_lm else load_language_model(config.model.lm_name).to(device_of(info)).eval()
    share = evaluate_heldout(
        captioner, heldout_shards, train.micro_batch_size, num_samples, train.eval_max_new_tokens, device_of(info),
        baseline_lm, info.rank, info.world_size,
    )
    heldout = merge_heldout(share)
    if heldout is None:
        return None
    return score_captions(heldout, most_frequent_training_caption([Path(path) for path in world.plan.shards]))


def evaluate_questions(captioner, config: Config, world: DataWorld, info: DistInfo) -> dict | None:
    """Collective: greedy answers to the held-out questions (each rank its share, every rank the same
    number of mapper forwards for the expert all-to-all) with and without the image; rank 0 scores
    them (`vlpdist.train.evaluate.score_questions`, the code `launcher.evaluate --vqa` scores with)
    beside the most common training answer per question type (None elsewhere, and when no held-out
    sample has a question)."""
    from vlpdist.data.feature_shards import iterate_heldout_questions
    from vlpdist.train.evaluate import answer_questions, merge_question_shares, most_common_training_answers, score_questions

    train = config.train
    heldout_shards = [Path(path) for path in world.plan.heldout]
    if not heldout_shards:
        return None
    device = device_of(info)
    batches = list(iterate_heldout_questions(heldout_shards, train.micro_batch_size, train.eval_max_samples, info.rank, info.world_size))
    # Object collectives (torch's helpers): the step loop's fused all-reduce stays vlpdist's only tensor collective.
    counts = gather_to_main(len(batches))
    rounds = broadcast_from_main(max(counts) if info.is_main else None, device)
    if rounds == 0:
        return None
    shares = gather_to_main(answer_questions(captioner, batches, rounds, world.clip_dim, device))
    if not info.is_main:
        return None
    baseline = most_common_training_answers([Path(path) for path in world.plan.shards])
    return score_questions(merge_question_shares(shares), baseline, config.model.question_template)


def _print_eval(result: dict) -> None:
    if "caption_loss" in result:
        print(
            f"held-out ({result['samples']} samples): caption loss {result['caption_loss']:.4f} vs LM without image "
            f"{result['lm_without_image_loss']:.4f}; metrics {json.dumps(result['metrics'])} vs most-frequent caption "
            f"{json.dumps(result['most_frequent_caption_metrics'])} (against the web captions of "
            f"{result.get('reference_samples', result['samples'])} samples; BLIP's synthetic ones apart in eval.json); "
            f"retrieval {json.dumps(result['retrieval'])} ({result['retrieval_protocol']})",
            flush=True,
        )
    if "vqa" in result:
        from vlpdist.eval.vqa import format_vqa_rows

        for measure, ours, against in format_vqa_rows(result["vqa"]):
            print(f"held-out {measure}: {ours} vs {against}", flush=True)


def run_export_evaluation(config: Config, export_dir: Path) -> int:
    """Reload a consolidated export at this launch's world size and `ep_size`; evaluate it on the held-out shards."""
    from safetensors.torch import load_file

    weights = export_dir / EXPORT_WEIGHTS
    if not weights.is_file():
        raise UserError(f"export {export_dir} has no {EXPORT_WEIGHTS}")
    info = init_distributed(config.train.dist_timeout_s, config.train.rendezvous_timeout_s)
    run_dir, features_dir = _paths(config)
    world = share_data_world(config, info, features_dir)
    if not world.plan.heldout:
        raise UserError("train.heldout_shards is 0: there is nothing to evaluate the export on")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir)
    meta = json.loads((export_dir / "export.json").read_text())
    engine, _ = build_model_and_engine(config, info, run_dir, meta["clip_dim"], consolidated=load_file(str(weights)))
    result = evaluate(engine.module, config, world, info)
    if result is not None:
        atomic_write_json(run_dir / "eval.json", result)
        _print_eval(result)
    return 0
