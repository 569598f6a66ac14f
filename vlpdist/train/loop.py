"""The training loop: feature shards -> DeepSpeed engine steps, with checkpoints, logging, NaN
skipping, preemption, and at the end a checkpoint, the consolidated fp32 export and evaluation.

Every rank runs this function (launched by `deepspeed`, `srun` or `torchrun`); rank 0 alone writes
the run folder's shared files. Decisions that must be the same on all ranks (skip a NaN batch,
stop for preemption) go through an all-reduce so no rank is left waiting in a collective.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlpdist.atomic import atomic_path, atomic_write_json, atomic_write_text
from vlpdist.config import Config, save_config
from vlpdist.data.feature_shards import (
    build_shard_plan,
    build_train_loader,
    iterate_heldout,
    list_feature_shards,
    split_heldout,
)
from vlpdist.parallel.deepspeed_config import check_train_config
from vlpdist.parallel.engine import (
    DistInfo,
    all_ranks_agree,
    build_engine,
    consolidated_state_dict,
    device_of,
    expert_parallel_rank,
    init_distributed,
    mean_over_ranks,
)
from vlpdist.train.checkpoint import load_latest_checkpoint, save_checkpoint, tag_for_step
from vlpdist.train.state import TrainState

PREEMPTED_EXIT_CODE = 3
"""Exit code of a run stopped by SIGUSR2/SIGTERM after writing its checkpoint (requeue me)."""
LOSS_TERMS = ("loss", "cap", "moe_aux")
EXPORT_WEIGHTS = "model_fp32.safetensors"


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


class PreemptionSignal:
    """Remembers SIGUSR2 (Slurm's `--signal`) and SIGTERM; the loop checks at step boundaries."""

    def __init__(self):
        self.received: str | None = None
        for signum in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


@dataclass
class StepWindow:
    """Sums since the last TensorBoard write, for means and throughput."""

    terms: dict[str, float] = field(default_factory=lambda: {term: 0.0 for term in LOSS_TERMS})
    expert_load: torch.Tensor | None = None
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


def _paths(config: Config) -> tuple[Path, Path]:
    run_dir = Path(config.train.output_dir)
    features = Path(config.train.features_dir) if config.train.features_dir else Path(config.root) / "features"
    return run_dir, features


def _clip_dim(shard: Path) -> int:
    return next(iterate_heldout([shard], batch_size=1, max_samples=1))["clip"].shape[1]


def _sample_captions(shards: list[Path], count: int) -> list[str]:
    return [caption for batch in iterate_heldout(shards, 256, count) for caption in batch["caption"]]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (a run killed after it)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def build_model_and_engine(config: Config, info: DistInfo, run_dir: Path, clip_dim: int, consolidated=None):
    from vlpdist.models.captioner import build_captioner
    from vlpdist.models.mapper import check_model_config

    check_model_config(config.model, config.train.ep_size)
    ep_rank_of_this_process = info.rank % config.train.ep_size
    # Seeded by expert-parallel rank so that the ranks of one group draw different experts;
    # DeepSpeed then broadcasts the dense params from the first rank (and each expert within
    # its expert-data-parallel group), so replicas agree.
    torch.manual_seed(config.train.seed + ep_rank_of_this_process)
    model = build_captioner(
        config.model, clip_dim, config.train.ep_size, consolidated_state=consolidated, ep_rank=ep_rank_of_this_process
    ).to(device_of(info))
    engine, scheduler = build_engine(model, config.train, info, run_dir)
    if config.train.ep_size > 1 and expert_parallel_rank(config.train.ep_size) != ep_rank_of_this_process:
        raise RuntimeError("DeepSpeed's expert-parallel rank layout is not rank % ep_size")
    return engine, scheduler


def run_training(config: Config) -> int:
    """Train (resuming if a checkpoint exists), then checkpoint, export and evaluate. Returns the exit code."""
    train = config.train
    check_train_config(train, int(os.environ.get("WORLD_SIZE", "1")))  # fail fast, before any heavy set-up
    info = init_distributed(train.dist_timeout_s)
    run_dir, features_dir = _paths(config)
    train_shards, heldout_shards = split_heldout(list_feature_shards(features_dir), train.heldout_shards)
    plan = build_shard_plan(train_shards, info.world_size, train.num_workers, train.micro_batch_size, train.seed)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir)
    clip_dim = _clip_dim(train_shards[0])
    engine, scheduler = build_model_and_engine(config, info, run_dir, clip_dim)
    checkpoint_dir = run_dir / "checkpoints"
    exclude_frozen = config.model.freeze_lm
    state = (load_latest_checkpoint(engine, checkpoint_dir, exclude_frozen) if train.resume else None) or TrainState()
    if info.is_main:
        if state.step:
            print(f"resumed from step {state.step} (data position {state.data_position}) in {checkpoint_dir}", flush=True)
        _truncate_metrics(run_dir / "metrics.jsonl", state.step)
    from vlpdist.monitor.tensorboard import TensorBoardLogger

    tb = TensorBoardLogger(run_dir / "tb", info.is_main)
    preemption = PreemptionSignal()
    loader = iter(build_train_loader(plan, info.rank, state.data_position))
    try:
        stopped = _train_steps(config, info, engine, scheduler, loader, state, tb, preemption, run_dir)
        if state.step > 0 and not (checkpoint_dir / tag_for_step(state.step)).is_dir():
            save_checkpoint(engine, checkpoint_dir, state, train.keep_checkpoints, exclude_frozen)
        if stopped:
            if info.is_main:
                cause = preemption.received or "a signal to another rank"
                print(f"stopped by {cause} at step {state.step}; checkpoint written, exit {PREEMPTED_EXIT_CODE}", flush=True)
            return PREEMPTED_EXIT_CODE
        if train.export_at_end:
            export_consolidated(engine.module, config, run_dir / "export", info, clip_dim, state.step)
        if train.eval_at_end:
            result = evaluate(engine.module, config, heldout_shards, train_shards, info)
            if result is not None:
                atomic_write_json(run_dir / "eval.json", result)
                _print_eval(result)
    finally:
        tb.close()
    return 0


def _train_steps(config, info, engine, scheduler, loader, state, tb, preemption, run_dir) -> bool:
    """Optimizer steps until max_steps; True if stopped early by a preemption signal."""
    train = config.train
    device = device_of(info)
    window = StepWindow()
    metrics_path = run_dir / "metrics.jsonl"
    while state.step < train.max_steps:
        step_terms = torch.zeros(len(LOSS_TERMS))
        micro_batches = 0
        batch = None
        while True:
            batch = next(loader)
            if batch["position"] != state.data_position:
                raise RuntimeError(f"data stream at {batch['position']}, expected {state.data_position}")
            state.data_position += 1
            state.samples_seen += len(batch["keys"]) * info.world_size
            ids_BT, mask_BT = engine.module.tokenize(batch["caption"])
            out = engine(batch["clip"].to(device), ids_BT.to(device), mask_BT.to(device))
            if all_ranks_agree(not bool(torch.isfinite(out["loss"])), device):
                state.nan_skipped += 1
                state.consecutive_nan += 1
                if state.consecutive_nan >= train.max_consecutive_nan_steps:
                    raise TrainingDiverged(
                        f"{state.consecutive_nan} micro-batches in a row had a non-finite loss (at step {state.step}, "
                        f"data position {state.data_position}); stopping (train.max_consecutive_nan_steps="
                        f"{train.max_consecutive_nan_steps}). Lower train.lr or check the feature shards."
                    )
                continue
            state.consecutive_nan = 0
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(out["loss"])
            engine.step()
            step_terms += torch.stack([out[term].detach().float() for term in LOSS_TERMS]).cpu()  # one device sync
            micro_batches += 1
            load_E = out["expert_load"].detach().float().cpu()
            window.expert_load = load_E if window.expert_load is None else window.expert_load + load_E
            window.samples += len(batch["keys"]) * info.world_size
            window.tokens += int(mask_BT.sum()) * info.world_size
            if boundary:
                break
        state.step += 1
        window.steps += 1
        means = mean_over_ranks(step_terms / micro_batches).tolist()
        for term, value in zip(LOSS_TERMS, means):
            window.terms[term] += value
        grad_norm = engine.get_global_grad_norm()
        record = {
            "step": state.step,
            **dict(zip(LOSS_TERMS, means)),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "nan_skipped": state.nan_skipped,
            "samples_seen": state.samples_seen,
        }
        if info.is_main:
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if state.step % train.log_every == 0 or state.step == train.max_steps:
            _log_window(tb, window, record, info, batch)
            window = StepWindow()
        if train.caption_log_every and state.step % train.caption_log_every == 0:
            _log_captions(engine.module, tb, batch, device, train.eval_max_new_tokens, state.step)
        stop = all_ranks_agree(preemption.received is not None, device)
        if state.step % train.checkpoint_every == 0 or stop:
            save_checkpoint(engine, run_dir / "checkpoints", state, train.keep_checkpoints, config.model.freeze_lm)
        if stop:
            return True
    return False


def _log_window(tb, window: StepWindow, record: dict, info: DistInfo, batch) -> None:
    elapsed = max(time.perf_counter() - window.started, 1e-9)
    scalars = {f"loss/{term}": total / window.steps for term, total in window.terms.items()}
    scalars.update({
        "opt/lr": record["lr"],
        "throughput/samples_per_s": window.samples / elapsed,
        "throughput/tokens_per_s": window.tokens / elapsed,
        "data/nan_skipped": record["nan_skipped"],
        "data/epoch": batch["epoch"],
    })
    if record["grad_norm"] is not None:
        scalars["opt/grad_norm"] = record["grad_norm"]
    step = record["step"]
    tb.scalars(scalars, step)
    if window.expert_load is not None and window.expert_load.numel():
        # Per-rank loads summed over the window's micro-batches, averaged over ranks, as fractions.
        load = mean_over_ranks(window.expert_load)
        tb.expert_load((load / load.sum()).tolist(), step)
    tb.flush()
    if info.is_main:
        print(
            f"step {step} loss {scalars['loss/loss']:.4f} cap {scalars['loss/cap']:.4f} lr {record['lr']:.2e} "
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


def evaluate(captioner, config: Config, heldout_shards, train_shards, info: DistInfo) -> dict | None:
    """Collective: held-out losses and greedy captions on every rank; rank 0 scores them and returns the result."""
    from vlpdist.models.captioner import load_language_model
    from vlpdist.train.evaluate import evaluate_heldout, score_captions

    train = config.train
    baseline_lm = None  # the LM alone, on the rank that reports it
    if info.is_main:
        # A tuned LM has learnt to expect the prefix: the baseline is then the LM as loaded, before training.
        baseline_lm = captioner.lm if config.model.freeze_lm else load_language_model(config.model.lm_name).to(device_of(info)).eval()
    heldout = evaluate_heldout(
        captioner, heldout_shards, train.micro_batch_size, train.eval_max_samples, train.eval_max_new_tokens, device_of(info),
        baseline_lm,
    )
    if not info.is_main:
        return None
    return score_captions(heldout, _sample_captions(train_shards, train.eval_max_samples))


def _print_eval(result: dict) -> None:
    print(
        f"held-out ({result['samples']} samples): caption loss {result['caption_loss']:.4f} vs LM without image "
        f"{result['lm_without_image_loss']:.4f}; metrics {json.dumps(result['metrics'])} vs most-frequent caption "
        f"{json.dumps(result['most_frequent_caption_metrics'])}",
        flush=True,
    )


def run_export_evaluation(config: Config, export_dir: Path) -> int:
    """Reload a consolidated export at this launch's world size and `ep_size`; evaluate it on the held-out shards."""
    from safetensors.torch import load_file

    from vlpdist.errors import UserError

    weights = export_dir / EXPORT_WEIGHTS
    if not weights.is_file():
        raise UserError(f"export {export_dir} has no {EXPORT_WEIGHTS}")
    info = init_distributed(config.train.dist_timeout_s)
    run_dir, features_dir = _paths(config)
    train_shards, heldout_shards = split_heldout(list_feature_shards(features_dir), config.train.heldout_shards)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir)
    meta = json.loads((export_dir / "export.json").read_text())
    engine, _ = build_model_and_engine(config, info, run_dir, meta["clip_dim"], consolidated=load_file(str(weights)))
    result = evaluate(engine.module, config, heldout_shards, train_shards, info)
    if result is not None:
        atomic_write_json(run_dir / "eval.json", result)
        _print_eval(result)
    return 0
