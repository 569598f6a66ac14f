"""The end of a training run, after its last step: the summaries, the stop of a preempted run,
the consolidated fp32 export and the evaluation on the held-out shards (captions and questions)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlpdist.atomic import atomic_path, atomic_write_json, atomic_write_text
from vlpdist.config import Config, save_config
from vlpdist.parallel.consolidate import EXPORT_WEIGHTS  # the export's weights file, shared with offline consolidation
from vlpdist.parallel.engine import DistInfo, broadcast_from_main, consolidated_state_dict, device_of, gather_to_main
from vlpdist.train.preemption import PREEMPTED_EXIT_CODE
from vlpdist.train.run_setup import DataWorld
from vlpdist.train.state import TrainState


def compile_summary() -> str:
    """What torch.compile did in this process: graphs made and graph breaks (each break is eager code
    between two graphs; DeepSpeed's MoE gating makes some, reading its capacity with `int()`)."""
    from torch._dynamo.utils import counters

    return (f"torch.compile: {counters['stats']['unique_graphs']} graphs, "
            f"{sum(counters['graph_break'].values())} graph breaks")


def print_summaries(config: Config, info: DistInfo, objective) -> None:
    """On rank 0: what torch.compile did, and the alignment objective's summary lines."""
    if config.train.compile and info.is_main:
        print(compile_summary(), flush=True)
    if objective is not None and info.is_main:
        for line in objective.summary_lines():
            print(line, flush=True)


def stop_after_signal(info: DistInfo, state: TrainState, cause: str | None, stop_marker: Path | None) -> int:
    """The exit code of a run stopped by a signal once its checkpoint is written; rank 0 writes
    `stop_marker` (when given) and says so."""
    exit_code = 0 if stop_marker is not None else PREEMPTED_EXIT_CODE
    if info.is_main:
        cause = cause or "a signal to another rank"
        if stop_marker is not None:  # after save_checkpoint, which returns once every rank's part is written
            atomic_write_text(stop_marker, f"{state.step} {cause}\n")
        print(f"stopped by {cause} at step {state.step}; checkpoint written, exit {exit_code}", flush=True)
    return exit_code


def training_summary(state: TrainState, steps_before: int, samples_before: int, started: float) -> dict:
    """This launch's steps, samples and wall time (after a resume: only its own)."""
    training = {"steps": state.step - steps_before, "samples": state.samples_seen - samples_before,
                "wall_s": time.perf_counter() - started}
    training["samples_per_s"] = training["samples"] / max(training["wall_s"], 1e-9)
    return training


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


def evaluate_at_end(captioner, config: Config, world: DataWorld, info: DistInfo, objective, training: dict,
                    run_dir: Path) -> None:
    """Collective: the held-out captions and questions; rank 0 writes eval.json (with this launch's
    `training` and the geodesic trust summary) and prints it."""
    result = evaluate(captioner, config, world, info)
    vqa = evaluate_questions(captioner, config, world, info)
    if result is None and vqa is None:  # not rank 0, or nothing held out
        return
    result = {**(result or {}), "training": training}  # held-out of questions only: no caption rows
    if objective is not None and objective.trust_summary() is not None:
        result["geodesics"] = objective.trust_summary()  # this launch's refreshes, as the summary line says
    if vqa is not None:
        result["vqa"] = vqa
    atomic_write_json(run_dir / "eval.json", result)
    print_eval(result)


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
            # Questions-only held-out samples are still answered and scored (evaluate_questions).
            why = "the held-out samples hold questions only: caption evaluation skipped"
            if not heldout_shards or num_samples == 0:
                why = "no held-out shards (train.heldout_shards=0)" if not heldout_shards else "the held-out shards hold no samples"
                why += ": evaluation skipped"
            print(why, flush=True)
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
    if train.eval_max_new_tokens < config.model.max_caption_tokens:
        print(f"note: greedy captions are cut at train.eval_max_new_tokens={train.eval_max_new_tokens} new tokens, fewer "
              f"than the model.max_caption_tokens={config.model.max_caption_tokens} captions train with: a caption "
              "longer than that scores lower than the model would make it", flush=True)
    return score_captions(heldout, most_frequent_training_caption([Path(path) for path in world.plan.shards]),
                          meteor=None if train.eval_meteor else False)


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


def print_eval(result: dict) -> None:
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
