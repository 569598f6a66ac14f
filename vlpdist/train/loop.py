"""The training run: feature shards -> DeepSpeed engine steps, with checkpoints, logging, NaN
skipping, preemption, and at the end a checkpoint, the consolidated fp32 export and evaluation.

Every rank runs `run_training` (launched by `deepspeed`, `srun` or `torchrun`); rank 0 alone writes
the run folder's shared files and builds the data plan, which it sends to the others. The run's
three parts live beside this file: its set-up (`run_setup`), the step loop (`steps`) and its end
(`run_end`); stop signals in `preemption`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from vlpdist.atomic import atomic_write_json
from vlpdist.config import Config, save_config
from vlpdist.errors import UserError
from vlpdist.parallel.consolidate import EXPORT_WEIGHTS
from vlpdist.parallel.deepspeed_config import check_train_config
from vlpdist.parallel.engine import device_of, init_distributed
from vlpdist.train.checkpoint import check_checkpoint_dir, save_checkpoint
from vlpdist.train.preemption import PreemptionSignal, StopTolerantLoader
from vlpdist.train.run_end import (
    evaluate,
    evaluate_at_end,
    export_consolidated,
    print_eval,
    print_summaries,
    stop_after_signal,
    training_summary,
)
from vlpdist.train.run_setup import (
    build_alignment_objective,
    build_model_and_engine,
    build_step_loader,
    open_tensorboard,
    prepare_run_folder,
    resume_or_start,
    run_paths,
    share_data_world,
)
from vlpdist.train.steps import train_steps


def run_training(config: Config, stop_marker: Path | None = None) -> int:
    """Train (resuming if a checkpoint exists), then checkpoint, export and evaluate. Returns the exit code.

    Stopped by a signal after writing its checkpoint, it returns PREEMPTED_EXIT_CODE; or, given
    `stop_marker`, rank 0 writes that file (the step and signal) and every rank returns 0, so that a
    launcher which kills all ranks when one exits non-zero (`srun --kill-on-bad-exit`) sees no failure.
    A signal after the training steps raises `StoppedBySignal`."""
    train = config.train
    check_train_config(train, int(os.environ.get("WORLD_SIZE", "1")))  # fail fast, before any heavy set-up
    check_checkpoint_dir(Path(train.output_dir) / "checkpoints", train.resume, train.overwrite)
    info = init_distributed(train.dist_timeout_s, train.rendezvous_timeout_s)
    device = device_of(info)
    run_dir, features_dir = run_paths(config)
    world = share_data_world(config, info, features_dir)
    plan = world.plan
    if info.is_main:
        prepare_run_folder(config, run_dir, features_dir, world)
    engine, scheduler = build_model_and_engine(config, info, run_dir, world.clip_dim)
    objective = build_alignment_objective(config, engine.module, world, device)
    extras = objective.checkpoint_extras() if objective is not None else []
    state = resume_or_start(config, info, engine, run_dir, plan, extras)
    tb = open_tensorboard(run_dir, info, state, plan)
    preemption = PreemptionSignal()
    loader = StopTolerantLoader(lambda: build_step_loader(config, engine.module, plan, info, state), preemption)
    preemption.tolerate_stopped_loader_workers()
    last_saved_step = state.step  # what is on disk, known from this loop's memory (not from a shared file system)
    steps_before, samples_before, started = state.step, state.samples_seen, time.perf_counter()
    try:
        stopped, last_saved_step = train_steps(config, info, engine, scheduler, loader, state, tb, preemption, run_dir, plan,
                                               last_saved_step, objective, extras)
        print_summaries(config, info, objective)
        if state.step > last_saved_step:
            save_checkpoint(engine, run_dir / "checkpoints", state, train.keep_checkpoints, config.model.freeze_lm,
                            plan.describe(), device, extras)
        if stopped:
            return stop_after_signal(info, state, preemption.received, stop_marker)
        preemption.training_over()
        if train.export_at_end:
            export_consolidated(engine.module, config, run_dir / "export", info, world.clip_dim, state.step)
        training = training_summary(state, steps_before, samples_before, started)
        if train.eval_at_end:
            evaluate_at_end(engine.module, config, world, info, objective, training, run_dir)
    finally:
        tb.close()
    return 0


def run_export_evaluation(config: Config, export_dir: Path) -> int:
    """Reload a consolidated export at this launch's world size and `ep_size`; evaluate it on the held-out shards."""
    from safetensors.torch import load_file

    weights = export_dir / EXPORT_WEIGHTS
    if not weights.is_file():
        raise UserError(f"export {export_dir} has no {EXPORT_WEIGHTS}")
    info = init_distributed(config.train.dist_timeout_s, config.train.rendezvous_timeout_s)
    run_dir, features_dir = run_paths(config)
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
        print_eval(result)
    return 0
