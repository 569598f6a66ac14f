"""The processing stage's driver: a pool of Ray actors runs the raw shards, then a summary over all shards.

`run_process(config)` starts Ray in-process (`process.ray_address: ""`) or joins a cluster
("auto" / an address), starts one `ShardProcessor` actor per `cpus_per_task`/`gpus_per_task`
slot the cluster has (on GPUs, one per GPU: each holds its models on the device Ray gave it),
hands every raw shard without a finished feature shard (finished with this run's paraphrase settings,
`shard_is_done`) to the next idle actor, retries a shard
whose actor died or whose read hit a transient `OSError` (`max_retries`) while the other shards
go on, and aggregates the per-shard stats: samples in/out, failures by reason, decisions,
throughput and, given ground truth, the filter's precision and recall in catching mismatched
captions. A shard that fails every attempt is reported (`shards_failed`; the CLI exits 1) and
is not marked done, so a rerun tries it again.

On a cluster of several nodes, `root` must be a folder every node sees (a shared file system):
tasks read `raw/` and write `features/` there directly.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, deque
from pathlib import Path

from data_ingest.download import list_raw_shards
from data_ingest.process.clip_model import check_clip_checkpoint
from data_ingest.process.shard import ShardProcessor, stats_path
from vlpdist.atomic import atomic_write_json
from vlpdist.config import Config, ProcessConfig
from vlpdist.data.provenance import write_provenance
from vlpdist.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
SUMMED_STATS = ("raw_samples", "written", "dropped_by_filter", "captions_kept", "synthetic_captions_kept", "questions_written",
                "paraphrases_written")
"""Per-shard stats that the stage summary adds up over shards."""


def check_process_config(settings: ProcessConfig) -> None:
    from data_ingest.process.capfilt import FILTERS, POLICIES
    from data_ingest.process.paraphrase import check_paraphraser_settings

    choices = {
        "process.filter": (settings.filter, FILTERS),
        "process.caption_policy": (settings.caption_policy, POLICIES),
        "process.device": (settings.device, ("auto", "cpu", "cuda")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"config key '{key}' is {value!r}; expected one of {list(allowed)}")
    if min(settings.batch_size, settings.num_synthetic_captions, settings.max_image_pixels) < 1:
        raise UserError("config keys 'process.batch_size', 'process.num_synthetic_captions' and "
                        "'process.max_image_pixels' must be >= 1")
    if settings.task_timeout_s <= 0 or settings.schedule_timeout_s <= 0:
        raise UserError("config keys 'process.task_timeout_s' and 'process.schedule_timeout_s' must be > 0 (seconds)")
    if not 0.0 <= settings.demo_clip_clean_fraction < 1.0:
        raise UserError("config key 'process.demo_clip_clean_fraction' must be in [0, 1)")
    if settings.caption_policy == "synthetic" and not settings.captioner:
        raise UserError("config key 'process.caption_policy' is 'synthetic' but no process.captioner is set")
    if settings.demo_truth and not Path(settings.demo_truth).is_file():
        raise UserError(f"config key 'process.demo_truth': file {settings.demo_truth} does not exist")
    check_paraphraser_settings(settings)


def _check_inputs_exist(settings: ProcessConfig) -> None:
    """Fail once in the driver, not once per shard task, on a missing checkpoint or vocabulary."""
    from data_ingest.process.capfilt import check_blip_folder
    from data_ingest.process.labels import resolve_vocab_path

    check_clip_checkpoint(settings.clip_pretrained)
    resolve_vocab_path(settings.vocab)
    for key, blip in (("process.captioner", settings.captioner),
                      ("process.itm_model", settings.itm_model if settings.filter == "itm" else "")):
        check_blip_folder(key, blip)


def shard_is_done(features_dir: Path, shard_name: str, settings: ProcessConfig) -> bool:
    """Whether a shard's features are finished for these settings: its stats file exists and records
    the run's paraphrase settings (a stats file from before paraphrasing existed records none, as
    does a run with paraphrasing off). A shard made with other paraphrase settings is done again."""
    from data_ingest.process.paraphrase import paraphrase_signature

    path = stats_path(features_dir, shard_name)
    return path.is_file() and json.loads(path.read_text()).get("paraphrase") == paraphrase_signature(settings)


def _record_label_vocabulary(features_dir: Path, settings: ProcessConfig) -> None:
    """Write the vocabulary the label ids index beside the shards, so training (SupCon, the bank) reads ids the same way."""
    from data_ingest.process.labels import load_vocabulary
    from vlpdist.data.feature_format import write_label_vocabulary

    write_label_vocabulary(features_dir, list(load_vocabulary(settings.vocab).names))


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


def _actor_slots(settings: ProcessConfig, shards: int) -> int:
    """How many shard actors the cluster holds now (at least one, at most one per shard)."""
    import ray

    resources = ray.cluster_resources()
    slots = [shards]
    for name, per_actor in (("CPU", settings.cpus_per_task), ("GPU", settings.gpus_per_task)):
        if per_actor > 0:
            slots.append(math.floor(resources.get(name, 0.0) / per_actor + 1e-9))
    return max(1, min(slots))


def _actor_demand(settings: ProcessConfig) -> dict[str, float]:
    """The Ray resources one shard actor asks for."""
    return {name: amount for name, amount in (("CPU", settings.cpus_per_task), ("GPU", settings.gpus_per_task)) if amount > 0}


def _unschedulable(settings: ProcessConfig) -> tuple[str, bool]:
    """(one line naming what keeps every shard actor from starting, whether the cluster lacks it
    altogether), from Ray's view of the cluster's total and free resources."""
    import ray

    demand, total, free = _actor_demand(settings), ray.cluster_resources(), ray.available_resources()
    missing = [f"{name} (an actor asks for {need:g}, the cluster has {total.get(name, 0.0):g})"
               for name, need in demand.items() if total.get(name, 0.0) + 1e-9 < need]
    waited = f"no shard actor became ready in {settings.schedule_timeout_s:g} s (process.schedule_timeout_s)"
    if missing:
        return f"{waited}: the cluster lacks {', '.join(missing)}", True
    free_now = ", ".join(f"{name} {free.get(name, 0.0):g} free of {total[name]:g}" for name in demand)
    return (f"{waited}: {free_now} (held by actors still loading their models, or by other work); still waiting",
            False)


def _run_shards(pending: list[Path], features_dir: Path, settings: ProcessConfig) -> tuple[list[dict], dict[str, str], dict[str, int]]:
    """Run the shards on a pool of `ShardProcessor` actors; returns (the stats of each shard that
    finished, shard name -> error for each that failed after all retries, shard name -> attempts for
    each shard that needed more than one).

    An attempt fails when its actor dies (worker killed, node lost): the actor is replaced and the
    shard goes back to the queue; or when the task raised an `OSError` (a transient read error):
    the shard goes back to the queue. Each shard has `1 + process.max_retries` attempts; any other
    exception is a bug or a bad input and fails the shard at once. An attempt running longer than
    `process.task_timeout_s` fails too: a running actor task cannot be cancelled, so its actor is
    killed and replaced. An actor whose models fail to load is not replaced; when none is left, the
    waiting shards fail with its error. While no actor is ready or running and none could start for
    `process.schedule_timeout_s`, the driver prints which resource is missing (and fails the waiting
    shards if the cluster has none of it). A shard is taken as done only from its own stats file or
    the attempt's answer, so it is never done twice.
    """
    import ray
    from tqdm import tqdm

    actor_class = ray.remote(num_cpus=settings.cpus_per_task, num_gpus=settings.gpus_per_task,
                             max_restarts=0)(ShardProcessor)
    starting: dict = {}  # ready() ref -> actor still loading its models

    def start_actor() -> None:
        actor = actor_class.remote(settings)
        starting[actor.ready.remote()] = actor

    for _ in range(_actor_slots(settings, len(pending))):
        start_actor()
    queue, idle, running = deque(pending), [], {}  # running: process() ref -> (actor, raw shard)
    attempt_started: dict = {}  # process() ref -> time.monotonic() at submission
    attempts: Counter = Counter()
    finished: dict[str, dict] = {}
    errors: dict[str, str] = {}

    def fail(raw: Path, err: Exception) -> None:
        errors[raw.stem] = str(err).strip().splitlines()[-1][:300]
        progress.update(1)

    def failed_attempt(raw: Path, err: Exception) -> None:
        if stats_path(features_dir, raw.stem).is_file():  # the attempt finished before its actor was lost
            finished[raw.stem] = json.loads(stats_path(features_dir, raw.stem).read_text())
            progress.update(1)
        elif attempts[raw.stem] <= settings.max_retries:
            queue.append(raw)
        else:
            fail(raw, err)

    # ray.wait returns at least this often, so that stuck attempts and missing resources are seen.
    poll_s = min(5.0, settings.task_timeout_s, settings.schedule_timeout_s)
    last_usable = time.monotonic()  # when an actor was last ready or running (or the run began)
    with tqdm(total=len(pending), desc="process shards", unit="shard") as progress:
        try:
            while queue or running:
                while idle and queue:
                    actor, raw = idle.pop(), queue.popleft()
                    attempts[raw.stem] += 1
                    attempt = actor.process.remote(str(raw), str(features_dir))
                    running[attempt], attempt_started[attempt] = (actor, raw), time.monotonic()
                if idle or running:
                    last_usable = time.monotonic()
                ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=poll_s)
                if not ready:
                    now = time.monotonic()
                    for attempt in [ref for ref in running if now - attempt_started[ref] > settings.task_timeout_s]:
                        actor, raw = running.pop(attempt)
                        del attempt_started[attempt]
                        ray.kill(actor, no_restart=True)
                        start_actor()
                        overrun = f"attempt {attempts[raw.stem]} ran over process.task_timeout_s={settings.task_timeout_s:g} s"
                        print(f"[process] shard {raw.stem}: {overrun}; its actor is killed", flush=True)
                        failed_attempt(raw, TimeoutError(overrun))
                    if not idle and not running and now - last_usable > settings.schedule_timeout_s:
                        message, never = _unschedulable(settings)
                        print(f"[process] {message}", flush=True)
                        last_usable = now  # the next report after another schedule_timeout_s
                        while never and queue:
                            fail(queue.popleft(), RuntimeError(message))
                    continue
                done = ready[0]
                if done in starting:
                    actor = starting.pop(done)
                    try:
                        ray.get(done)
                        idle.append(actor)
                    except ray.exceptions.RayActorError as err:
                        if not err.actor_init_failed:  # its node went away before the models loaded
                            start_actor()
                        elif not idle and not running and not starting:  # no actor loads the models
                            while queue:
                                fail(queue.popleft(), err)
                    continue
                actor, raw = running.pop(done)
                del attempt_started[done]
                try:
                    finished[raw.stem] = ray.get(done)
                    idle.append(actor)
                    progress.update(1)
                except ray.exceptions.RayActorError as err:
                    ray.kill(actor, no_restart=True)  # make sure it is gone before its shard runs elsewhere
                    start_actor()
                    failed_attempt(raw, err)
                except ray.exceptions.RayTaskError as err:
                    idle.append(actor)
                    if isinstance(err.cause, OSError):
                        failed_attempt(raw, err)
                    else:
                        fail(raw, err)
        finally:
            for actor in [*idle, *starting.values(), *(actor for actor, _ in running.values())]:
                ray.kill(actor, no_restart=True)
    retried = {name: count for name, count in sorted(attempts.items()) if count > 1}
    return list(finished.values()), errors, retried


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
            totals[key] += stats.get(key, 0)  # stats written before a key existed count 0
        failed.update(stats["failed"])
        decisions.update(stats["decisions"])
        seconds += stats["seconds"]
    return {**totals, "failed": dict(failed), "decisions": dict(decisions), "task_seconds": round(seconds, 2)}


def features_provenance(config: Config) -> dict:
    """The provenance manifest of the features this config makes: its CLIP, and the image preparation the
    download stage recorded beside `raw/` (this config's `download` settings for raw shards made elsewhere)."""
    from data_ingest.download import STATE_FILENAME
    from data_ingest.process.clip_model import SHIPPED_CLIP_CONFIG_DIR
    from vlpdist.data.provenance import build_provenance, ingestion_preparation
    from vlpdist.models.clip_identity import describe_clip

    state_path = Path(config.root) / STATE_FILENAME
    recorded = json.loads(state_path.read_text()).get("image_preparation") if state_path.is_file() else None
    ingestion = recorded or ingestion_preparation(config.download, recorded_by="process config")
    identity, _ = describe_clip(config.process.clip_model, config.process.clip_pretrained, config_dirs=[SHIPPED_CLIP_CONFIG_DIR])
    return build_provenance(identity, ingestion)


def refuse_other_provenance(features_dir: Path, provenance: dict) -> None:
    """Features already made with another CLIP or image preparation must not be mixed with new ones."""
    from vlpdist.data.provenance import INGESTION_KEYS, read_provenance, same_clip

    before = read_provenance(features_dir)
    if before is None:
        return
    same_preparation = all(before["ingestion"][key] == provenance["ingestion"][key] for key in INGESTION_KEYS)
    if not (same_clip(before["clip"], provenance["clip"]) and same_preparation
            and before["processing"] == provenance["processing"]):
        raise UserError(f"{features_dir} holds features made with another CLIP or image preparation ({features_dir}/provenance.json): "
                        "use a new root (or features folder) for this config")


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
    provenance = features_provenance(config)
    refuse_other_provenance(features_dir, provenance)
    features_dir.mkdir(parents=True, exist_ok=True)
    _record_label_vocabulary(features_dir, settings)
    pending = [raw for raw in raw_shards if not shard_is_done(features_dir, raw.stem, settings)]
    for raw in pending:  # a stats file made with other settings: the shard is not done until its new one is written
        stats_path(features_dir, raw.stem).unlink(missing_ok=True)
    started = time.time()
    finished_stats: list[dict] = []
    errors: dict[str, str] = {}
    retried: dict[str, int] = {}
    if pending:
        started_ray = start_ray(settings)
        try:
            finished_stats, errors, retried = _run_shards(pending, features_dir, settings)
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
        "shards_retried": retried,
        "wall_seconds": round(wall, 2),
        "samples_per_second": round(samples_processed_now / wall, 1) if pending and wall > 0 else None,
    })
    if settings.demo_truth:
        summary["filter_vs_truth"] = score_against_truth(features_dir, settings.demo_truth)
    atomic_write_json(features_dir / "process_summary.json", summary)
    write_provenance(features_dir, provenance)
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
        f"(synthetic {summary.get('synthetic_captions_kept', 0)}); question samples written {summary.get('questions_written', 0)}; "
        f"paraphrases written {summary.get('paraphrases_written', 0)}",
    ]
    if summary["samples_per_second"] is not None:
        lines.append(f"[process] throughput {summary['samples_per_second']} samples/s ({summary['wall_seconds']} s wall)")
    if "filter_vs_truth" in summary:
        truth = summary["filter_vs_truth"]
        lines.append(f"[process] filter vs ground truth: precision {truth['precision']:.3f} recall {truth['recall']:.3f} "
                     f"(tp {truth['tp']} fp {truth['fp']} fn {truth['fn']} tn {truth['tn']})")
    for name, attempts in summary["shards_retried"].items():
        lines.append(f"[process] shard {name} took {attempts} attempts")
    for name, error in summary["shards_failed"].items():
        lines.append(f"[process] shard {name} FAILED: {error}")
    print("\n".join(lines), flush=True)
