"""The step loop: optimizer steps of the DeepSpeed engine until `train.max_steps`, with NaN
skipping, the per-step metrics line, TensorBoard logging, checkpoints and the stop check.

Decisions that must be the same on all ranks (stop for preemption, the logged terms) ride on one
all-reduce per optimizer step, on the engine's device; skipping a non-finite step is decided by
DeepSpeed's own global grad-norm check, the same on every rank.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from vlpdist.losses.terms import loss_weights, weighted_total
from vlpdist.parallel.engine import DistInfo, device_of, sum_over_ranks
from vlpdist.train.checkpoint import save_checkpoint


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class StepWindow:
    """Sums over ranks since the last TensorBoard write, for means and throughput."""

    terms: dict[str, float] = field(default_factory=dict)
    expert_load: list[float] | None = None
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class LocalStep:
    """One optimizer step's micro-batches on this rank; the sums stay on the device until the step's all-reduce."""

    sums_device: torch.Tensor | None = None  # [terms of finite micro-batches, finite micro-batch count, expert load]
    micro_batches: int = 0
    tokens: int = 0
    samples: int = 0
    lr: float = 0.0  # the lr the step applies, read at its last micro-batch
    last_batch: dict | None = None


@dataclass
class StepTotals:
    """One optimizer step summed over ranks."""

    term_sums: list[float]  # over the finite micro-batches
    finite_micro_batches: float
    expert_load: list[float]
    micro_batches: int
    tokens: int
    samples: int
    stop: bool

    @property
    def losses_finite(self) -> bool:
        return self.finite_micro_batches == self.micro_batches


def train_steps(config, info, engine, scheduler, loader, state, tb, preemption, run_dir, plan, last_saved_step,
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
    weights = loss_weights(config)
    term_names: list[str] = []  # every scalar term (the model's and the losses'), as the first micro-batch names them
    while state.step < train.max_steps:
        local = _run_micro_batches(engine, scheduler, loader, state, objective, weights, term_names, device)
        totals = _sum_over_ranks(local, len(term_names), preemption.received is not None, device)
        state.samples_seen += totals.samples
        if _count_step(engine.was_step_applied(), totals, state, train.max_consecutive_nan_steps):
            if objective is not None:
                objective.after_applied_step(engine.module, state.step)
            means = {name: totals.term_sums[i] / max(totals.finite_micro_batches, 1) for i, name in enumerate(term_names)}
            window = _log_step(config, info, engine, tb, window, state, means, totals, local, objective, run_dir)
        if state.step > last_saved_step and (state.step % train.checkpoint_every == 0 or totals.stop):
            save_checkpoint(engine, run_dir / "checkpoints", state, train.keep_checkpoints, config.model.freeze_lm,
                            plan.describe(), device, extras)
            last_saved_step = state.step
        if totals.stop:
            return True, last_saved_step
    return False, last_saved_step


def _run_micro_batches(engine, scheduler, loader, state, objective, weights, term_names: list[str], device) -> LocalStep:
    """Forward, backward and `engine.step()` for each micro-batch up to the gradient-accumulation
    boundary; fills `term_names` at the run's first micro-batch."""
    local = LocalStep()
    while True:
        batch = next(loader)
        if batch["position"] != state.data_position:
            raise RuntimeError(f"data stream at {batch['position']}, expected {state.data_position}")
        state.data_position += 1
        named, load_E = _micro_batch_terms(engine, objective, batch, weights, state.step, device)
        if not term_names:
            term_names.extend(named)
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary:
            local.lr = scheduler.get_last_lr()[0]  # the lr this step applies (engine.step moves the schedule on)
        engine.backward(named["loss"])
        engine.step()
        terms = torch.stack([named[name].detach().float() for name in term_names])
        finite = torch.isfinite(terms).all()
        micro_stats = torch.cat([torch.where(finite, terms, torch.zeros_like(terms)), finite.float()[None],
                                 load_E.detach().float()])
        local.sums_device = micro_stats if local.sums_device is None else local.sums_device + micro_stats
        local.tokens += int(batch["attention_mask"].sum())  # a CPU tensor from the loader: no device sync
        local.samples += len(batch["keys"])
        local.micro_batches += 1
        if boundary:
            local.last_batch = batch
            return local


def _micro_batch_terms(engine, objective, batch: dict, weights, step: int, device) -> tuple[dict, torch.Tensor]:
    """One micro-batch's forward: its named scalar terms with the weighted total as `loss`, and the expert load."""
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
        objective.enqueue(step)
    named["loss"] = weighted_total(named, weights)
    return named, out["expert_load"]


def _sum_over_ranks(local: LocalStep, num_terms: int, stop_requested: bool, device) -> StepTotals:
    """The step's one collective and host sync."""
    host_part = torch.tensor([local.micro_batches, local.tokens, local.samples, float(stop_requested)], device=device)
    totals = sum_over_ranks(torch.cat([local.sums_device, host_part]), device).tolist()
    return StepTotals(totals[:num_terms], totals[num_terms], totals[num_terms + 1 : -4], int(totals[-4]), int(totals[-3]),
                      int(totals[-2]), totals[-1] > 0)


def _count_step(applied: bool, totals: StepTotals, state, max_consecutive_nan_steps: int) -> bool:
    """Counts the optimizer step in `state` (applied, skipped by an fp16 overflow, or skipped for a
    non-finite loss); True when it was applied."""
    if applied and not totals.losses_finite:
        raise TrainingDiverged(
            f"a non-finite loss at step {state.step + 1} reached an applied optimizer step: this DeepSpeed does not "
            "skip steps with non-finite gradients (vlpdist needs deepspeed>=0.19)"
        )
    if not applied and totals.losses_finite:
        state.overflow_skipped += 1  # fp16 loss-scale calibration: DeepSpeed lowers the scale and goes on
    elif applied:
        state.consecutive_nan = 0
        state.step += 1
    else:
        state.nan_skipped += 1
        state.consecutive_nan += 1
        if state.consecutive_nan >= max_consecutive_nan_steps:
            raise TrainingDiverged(
                f"{state.consecutive_nan} optimizer steps in a row had a non-finite loss or gradient and were skipped "
                f"(after step {state.step}, data position {state.data_position}); stopping (train.max_consecutive_nan_steps="
                f"{max_consecutive_nan_steps}). Lower train.lr or check the feature shards."
            )
    return applied


def _log_step(config, info: DistInfo, engine, tb, window: StepWindow, state, means: dict[str, float], totals: StepTotals,
              local: LocalStep, objective, run_dir) -> StepWindow:
    """An applied step: its line in metrics.jsonl (rank 0), into the window, and TensorBoard (the
    window's means, sample captions) when due. Returns the window to go on with."""
    train = config.train
    window.steps += 1
    window.samples += totals.samples
    window.tokens += totals.tokens
    for name, value in means.items():
        window.terms[name] = window.terms.get(name, 0.0) + value
    load_E = totals.expert_load
    window.expert_load = load_E if window.expert_load is None else [a + b for a, b in zip(window.expert_load, load_E)]
    grad_norm = engine.get_global_grad_norm()
    record = {
        "step": state.step,
        **means,
        "lr": local.lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "nan_skipped": state.nan_skipped,
        "overflow_skipped": state.overflow_skipped,
        "samples_seen": state.samples_seen,
        "epoch": local.last_batch["epoch"],
    }
    if info.is_main:
        with open(run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    if state.step % train.log_every == 0 or state.step == train.max_steps:
        _log_window(tb, window, record, info, objective.scalars() if objective is not None else {})
        window = StepWindow()
    if train.caption_log_every and state.step % train.caption_log_every == 0:
        _log_captions(engine.module, tb, local.last_batch, device_of(info), train.eval_max_new_tokens, state.step)
    return window


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

