"""The processing stage's driver: one Ray task per raw shard, then a summary over all shards.

`run_process(config)` starts Ray in-process (`process.ray_address: ""`) or joins a cluster
("auto" / an address), submits a task for every raw shard without a finished feature shard, lets
Ray retry a task whose worker died (`max_retries`) while the other shards go on, and aggregates
the per-shard stats: samples in/out, failures by reason, decisions, throughput and, given ground
truth, the filter's precision and recall in catching mismatched captions.

On a cluster of several nodes, `root` must be a folder every node sees (a shared file system):
tasks read `raw/` and write `features/` there directly.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from data_ingest.download import list_raw_shards
from data_ingest.process.clip_model import check_clip_checkpoint
from data_ingest.process.shard import HOOK_DIR_ENV, process_shard, stats_path
from vlpdist.atomic import atomic_write_json
from vlpdist.config import Config, ProcessConfig
from vlpdist.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
SUMMED_STATS = ("raw_samples", "written", "dropped_by_filter", "captions_kept", "synthetic_captions_kept")
"""Per-shard stats that the stage summary adds up over shards."""


def check_process_config(settings: ProcessConfig) -> None:
    from data_ingest.process.capfilt import FILTERS, POLICIES

    choices = {
        "process.filter": (settings.filter, FILTERS),
        "process.caption_policy": (settings.caption_policy, POLICIES),
        "process.device": (settings.device, ("auto", "cpu", "cuda")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"config key '{key}' is {value!r}; expected one of {list(allowed)}")
    if settings.batch_size < 1 or settings.num_synthetic_captions < 1:
        raise UserError("config keys 'process.batch_size' and 'process.num_synthetic_captions' must be >= 1")
    if not 0.0 <= settings.demo_clip_clean_fraction < 1.0:
        raise UserError("config key 'process.demo_clip_clean_fraction' must be in [0, 1)")
    if settings.caption_policy == "synthetic" and not settings.captioner:
        raise UserError("config key 'process.caption_policy' is 'synthetic' but no process.captioner is set")
    if settings.demo_truth and not Path(settings.demo_truth).is_file():
        raise UserError(f"config key 'process.demo_truth': file {settings.demo_truth} does not exist")


def _check_inputs_exist(settings: ProcessConfig) -> None:
    """Fail once in the driver, not once per shard task, on a missing checkpoint or vocabulary."""
    from data_ingest.process.labels import resolve_vocab_path

    check_clip_checkpoint(settings.clip_pretrained)
    resolve_vocab_path(settings.vocab)


def start_ray(settings: ProcessConfig) -> bool:
    """Connect to Ray; True when this call started it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=True)
    else:
        # address="local" starts a fresh instance even if another Ray runs on this machine.
        # Workers must import this repository whatever their working directory: they inherit the
        # environment of the raylet this call starts. (A runtime_env would do it too, but Ray then
        # starts new workers for it and leaves the ones it prestarted idle: seconds on a small machine.)
        if str(REPO_ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        ray.init(address="local", num_cpus=settings.num_cpus, include_dashboard=False)
    return True


def _run_shards(pending: list[Path], features_dir: Path, settings: ProcessConfig) -> tuple[list[dict], dict[str, str]]:
    """Run the shard tasks; returns (the stats of each shard that finished, shard name -> error for
    each that failed after all retries)."""
    import ray
    from tqdm import tqdm

    task = ray.remote(process_shard).options(
        num_cpus=settings.cpus_per_task, num_gpus=settings.gpus_per_task, max_retries=settings.max_retries,
    )
    hook_dir = os.environ.get(HOOK_DIR_ENV, "")
    refs = {task.remote(str(raw), str(features_dir), settings, hook_dir): raw.stem for raw in pending}
    finished_stats: list[dict] = []
    errors: dict[str, str] = {}
    with tqdm(total=len(refs), desc="process shards", unit="shard") as progress:
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            try:
                finished_stats.append(ray.get(done[0]))
            except (ray.exceptions.RayError, UserError) as err:
                errors[refs[done[0]]] = str(err).strip().splitlines()[-1][:300]
            progress.update(1)
    return finished_stats, errors


def filter_precision_recall(web_dropped: list[bool], is_mismatched: list[bool]) -> dict:
    """Precision/recall of the filter as a detector of mismatched captions (positive = web caption dropped)."""
    if len(web_dropped) != len(is_mismatched):
        raise ValueError("web_dropped and is_mismatched must have one entry per sample")
    tp = sum(d and m for d, m in zip(web_dropped, is_mismatched))
    fp = sum(d and not m for d, m in zip(web_dropped, is_mismatched))
    fn = sum(m and not d for d, m in zip(web_dropped, is_mismatched))
    tn = len(web_dropped) - tp - fp - fn
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def score_against_truth(features_dir: Path, truth_path: str) -> dict:
    """Join every processed (not failed) sample's decision with the demo's ground truth by URL path."""
    import pandas as pd

    tables = [pd.read_parquet(p) for p in sorted(features_dir.glob("*_decisions.parquet"))]
    if not tables:
        return {**filter_precision_recall([], []), "samples_scored": 0}
    decisions = pd.concat(tables)
    decisions = decisions[decisions["status"] != "failed"]
    truth = pd.read_parquet(truth_path, columns=["url_path", "is_mismatched"])
    # "http://host:port/img/000042.jpg" -> "img/000042.jpg"
    decisions["url_path"] = decisions["url"].str.split("/", n=3).str[3]
    joined = decisions.merge(truth, on="url_path", how="inner")
    result = filter_precision_recall((~joined["web_kept"]).tolist(), joined["is_mismatched"].astype(bool).tolist())
    result["samples_scored"] = len(joined)
    return result


def summarize(features_dir: Path, shard_names: list[str]) -> dict:
    """Totals over the per-shard stats files of `shard_names` (those present)."""
    import json

    totals = Counter(dict.fromkeys(("shards_done", *SUMMED_STATS), 0))
    failed, decisions = Counter(), Counter()
    seconds = 0.0
    for name in shard_names:
        path = stats_path(features_dir, name)
        if not path.is_file():
            continue
        stats = json.loads(path.read_text())
        totals["shards_done"] += 1
        for key in SUMMED_STATS:
            totals[key] += stats[key]
        failed.update(stats["failed"])
        decisions.update(stats["decisions"])
        seconds += stats["seconds"]
    return {**totals, "failed": dict(failed), "decisions": dict(decisions), "task_seconds": round(seconds, 2)}


def run_process(config: Config) -> dict:
    """Process every raw shard under `<root>/raw` into `<root>/features`; returns the stage summary."""
    settings = config.process
    check_process_config(settings)
    features_dir = Path(config.root) / "features"
    raw_shards = list_raw_shards(config)
    if settings.train_demo_clip and not Path(settings.clip_pretrained).is_file():
        from data_ingest.demo_clip import train_demo_clip

        train_demo_clip(config)
    _check_inputs_exist(settings)
    features_dir.mkdir(parents=True, exist_ok=True)
    pending = [raw for raw in raw_shards if not stats_path(features_dir, raw.stem).is_file()]
    started = time.time()
    finished_stats: list[dict] = []
    errors: dict[str, str] = {}
    if pending:
        started_ray = start_ray(settings)
        try:
            finished_stats, errors = _run_shards(pending, features_dir, settings)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    wall = time.time() - started
    summary = summarize(features_dir, [raw.stem for raw in raw_shards])  # shards skipped as finished too
    samples_processed_now = sum(stats["raw_samples"] for stats in finished_stats)
    summary.update({
        "shards_total": len(raw_shards),
        "shards_skipped": len(raw_shards) - len(pending),
        "shards_failed": errors,
        "wall_seconds": round(wall, 2),
        "samples_per_second": round(samples_processed_now / wall, 1) if pending and wall > 0 else None,
    })
    if settings.demo_truth:
        summary["filter_vs_truth"] = score_against_truth(features_dir, settings.demo_truth)
    atomic_write_json(features_dir / "process_summary.json", summary)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    lines = [
        f"[process] shards {summary.get('shards_done', 0)}/{summary['shards_total']} done "
        f"({summary['shards_skipped']} skipped as finished, {len(summary['shards_failed'])} failed)",
        f"[process] samples in {summary.get('raw_samples', 0)} = written {summary.get('written', 0)} "
        f"+ dropped by filter {summary.get('dropped_by_filter', 0)} + failed {sum(summary['failed'].values())} "
        f"{summary['failed']}",
        f"[process] decisions {summary['decisions']}; captions kept {summary.get('captions_kept', 0)} "
        f"(synthetic {summary.get('synthetic_captions_kept', 0)})",
    ]
    if summary["samples_per_second"] is not None:
        lines.append(f"[process] throughput {summary['samples_per_second']} samples/s ({summary['wall_seconds']} s wall)")
    if "filter_vs_truth" in summary:
        truth = summary["filter_vs_truth"]
        lines.append(f"[process] filter vs ground truth: precision {truth['precision']:.3f} recall {truth['recall']:.3f} "
                     f"(tp {truth['tp']} fp {truth['fp']} fn {truth['fn']} tn {truth['tn']})")
    for name, error in summary["shards_failed"].items():
        lines.append(f"[process] shard {name} FAILED: {error}")
    print("\n".join(lines), flush=True)
