"""The embedded demo, end to end: `python -m launcher.demo [--config configs/demo.yaml] [key=value ...]`.

It makes its own world (no hub, no internet) and runs the real pipeline on it, stage by stage:

1. download: synthetic image-caption pairs served with every kind of broken URL on a loopback
   HTTP server, fetched by img2dataset into webdataset shards (`<root>/raw`);
2. process: a small open_clip model pretrained on those shards with open_clip's contrastive loss
   (no pretrained CLIP can be downloaded here), then Ray tasks compute CLIP features, filter the
   captions against the image (CapFilt) and extract object labels (`<root>/features`); the filter
   is scored against the known mismatched captions;
3. train: a small GPT-2-style LM is built for the demo's language, then `deepspeed` trains the MoE
   mapper on 2 CPU ranks with expert parallelism (`ep_size` 2) and evaluates on held-out shards;
4. export: the MoE mapper is folded into one dense layer and the self-contained export written
   (`<root>/export`, `python -m launcher.export`), with a few held-out images as JPEG files
   (`<root>/sample_images`) to caption with it.

It ends with one summary table (on the terminal and as `<root>/summary.md`, numbers in
`<root>/summary.json`): ingestion counts by reason, the caption filter against the known noise,
caption metrics against the trivial baselines, VQA accuracy per answer type against the LM without the
image and the most common training answer per question type, retrieval R@K, the fold's error and the folded vs
MoE mapper latency, each stage's wall time and throughput. It then writes the run report, one
self-contained HTML page (`<root>/report.html`, `python -m launcher.report`), and prints its path
among the commands to try next. Every stage reuses what a previous run
finished, and says so; `--fresh` removes the stage outputs under the root first. The root must be
new, empty, or the demo's own (its marker, `vlpdist.atomic.claim_output_dir`): a folder holding
anything else is refused, never written into or cleared.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

from launcher.paths import DEFAULT_CONFIG, REPO, TRAIN_SCRIPT
from launcher.report import write_run_report
from vlpdist.atomic import claim_output_dir
from vlpdist.config import Config, load_config, save_config
from vlpdist.errors import UserError, exit_on_user_error

DEMO_TRAINING_RANKS = 2
STAGES = ("download", "process", "train", "export")
SAMPLE_IMAGES = 4
LATENCY_BATCHES = (1, 64)
LATENCY_REPEATS = 30
# What the demo writes under its root (with the config's defaults); --fresh removes exactly these.
WRITER = "launcher.demo"
# A fold error at this level is float32 rounding of the same sums in another order, not a difference of the models.
FLOAT32_ROUNDING = 1e-6
STAGE_OUTPUTS = ("source", "raw", "features", "clip", "lm", "train", "export", "sample_images", "ingest_state.json",
                 "ingest_summary.json", "config.yaml", "summary.md", "summary.json", "sample_captions.jsonl", "report.html",
                 "report.png")


def write_demo_url_list(config: Config, base_url: str, samples) -> Path:
    """Write `<root>/source/urls.parquet` (what ingestion reads: url, caption and the question
    columns, which img2dataset carries into the raw shards) and the ground truth beside it."""
    import pandas as pd

    from data_ingest.sources.synthetic import QUESTION_COLUMNS, demo_url_rows
    from vlpdist.atomic import atomic_write_bytes

    rows = pd.DataFrame(demo_url_rows(samples, config.demo, base_url))
    source = Path(config.root) / "source"
    source.mkdir(parents=True, exist_ok=True)
    url_list = source / "urls.parquet"
    atomic_write_bytes(url_list, rows[["url", "caption", *QUESTION_COLUMNS]].to_parquet(index=False))
    truth = rows.assign(url_path=rows["url"].str.replace(base_url + "/", "", regex=False)).drop(columns=["url"])
    atomic_write_bytes(source / "demo_truth.parquet", truth.to_parquet(index=False))
    return url_list


def remove_stage_outputs(root: Path) -> list[str]:
    """`--fresh`: delete the demo's own outputs under `root` (a link is removed, never followed); their names."""
    resolved = root.resolve()
    if resolved in (Path(resolved.anchor), Path.home().resolve(), REPO.resolve()):
        raise UserError(f"--fresh refuses to clear root={root}: give the demo its own folder")
    removed = []
    for name in STAGE_OUTPUTS:
        target = root / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        else:
            continue
        removed.append(name)
    return removed


def fold_note(error: float, tolerance: float) -> str:
    """The summary's note on the measured fold error, against the tolerance the export checked it with."""
    level = "float32 rounding" if error <= FLOAT32_ROUNDING else "above float32 rounding"
    return f"measured {error:.1e} on random inputs: {level}; the export refuses above {tolerance:.0e}"


def stage_record(name: str, reused: bool, note: str, started: float, throughput: str) -> dict:
    return {"stage": name, "reused": reused, "note": note, "wall_s": round(time.perf_counter() - started, 1), "throughput": throughput}


def finished_download(config: Config) -> dict | None:
    """The ingestion summary of a finished download of this demo's URL list, or None."""
    from data_ingest.download import STATE_FILENAME, SUMMARY_FILENAME, finished_shards, raw_dir
    from data_ingest.sources.synthetic import broken_paths

    root = Path(config.root)
    if not ((root / STATE_FILENAME).is_file() and (root / SUMMARY_FILENAME).is_file()):
        return None
    state = json.loads((root / STATE_FILENAME).read_text())
    if not set(range(state["original_shards"])) <= set(finished_shards(raw_dir(config))):
        return None
    expected_rows = config.demo.num_samples + len(broken_paths(config.demo))
    if state["input_rows"] != expected_rows:
        raise UserError(f"{root} holds a demo download of {state['input_rows']} rows, this config makes {expected_rows}: "
                        "rerun with --fresh (or another root=)")
    return json.loads((root / SUMMARY_FILENAME).read_text())


def stage_download(config: Config) -> tuple[dict, dict]:
    from data_ingest.download import run_download
    from data_ingest.sources.demo_server import DemoImageServer
    from data_ingest.sources.synthetic import broken_paths, generate_demo_samples

    started = time.perf_counter()
    summary = finished_download(config)
    raw = Path(config.root) / "raw"
    if summary is not None:
        config.download.url_list = str(Path(config.root) / "source" / "urls.parquet")
        run = summary["this_run"]
        return summary, stage_record("download", True, f"reused ({summary['success']} images in {raw})", started,
                                     f"{run['rows_per_s']:.0f} rows/s when it ran")
    samples = generate_demo_samples(config.demo)
    print(f"[demo] generated {len(samples)} images ({sum(s.is_mismatched for s in samples)} with mismatched captions)")
    broken = broken_paths(config.demo)
    with DemoImageServer({s.path: s.jpeg for s in samples}, broken, config.demo.slow_response_s) as server:
        print(f"[demo] serving them on {server.base_url} with {len(broken)} broken URLs")
        config.download.url_list = str(write_demo_url_list(config, server.base_url, samples))
        summary = run_download(config)
    run = summary["this_run"]
    return summary, stage_record("download", False, f"{summary['success']} images into {raw}", started,
                                 f"{run['rows_per_s']:.0f} rows/s")


def stage_process(config: Config) -> tuple[dict, dict]:
    """CLIP pretraining (demo) + Ray feature extraction and filtering; reused when every raw shard is processed."""
    from data_ingest.download import list_raw_shards
    from data_ingest.process.run import run_process, stats_path

    started = time.perf_counter()
    features = Path(config.root) / "features"
    summary_file = features / "process_summary.json"
    done = Path(config.process.clip_pretrained).is_file() and summary_file.is_file() and all(
        stats_path(features, raw.stem).is_file() for raw in list_raw_shards(config))
    if done:
        summary = json.loads(summary_file.read_text())
        rate = summary.get("samples_per_second")
        return summary, stage_record("process", True, f"reused ({summary['written']} samples in {summary['shards_done']} "
                                     f"shards in {features})", started, f"{rate:.0f} samples/s when it ran" if rate else "-")
    summary = run_process(config)
    rate = summary.get("samples_per_second")
    return summary, stage_record("process", False, f"{summary['written']} samples into {features} (demo CLIP trained first)",
                                 started, f"{rate:.0f} samples/s" if rate else "-")


def stage_demo_lm(config: Config) -> Path:
    """The demo's language model: a tokenizer and a tiny GPT-2 trained on the training shards' captions
    and their questions (prompt and most common answer, as GPT-2 has read questions before it sees an image)."""
    from data_ingest.sources.demo_lm import make_demo_lm
    from vlpdist.data.feature_format import iterate_feature_shards
    from vlpdist.data.feature_shards import list_feature_shards, split_heldout
    from vlpdist.data.question_answer import ANSWERS, QUESTION, choose_answer_target, format_question_prompt

    lm_dir = Path(config.model.lm_name)
    if (lm_dir / "config.json").is_file():
        print(f"[demo] language model: reused ({lm_dir})")
        return lm_dir
    train_shards, _ = split_heldout(list_feature_shards(Path(config.root) / "features"), config.train.heldout_shards)
    samples = list(iterate_feature_shards([str(s) for s in train_shards]))
    captions = [c for sample in samples for c in sample.captions]
    questions = [f"{format_question_prompt(config.model.question_template, sample.qa[QUESTION])} "
                 f"{choose_answer_target(sample.qa[ANSWERS], 'most_common', None)}" for sample in samples if sample.qa]
    started = time.perf_counter()
    make_demo_lm(lm_dir, captions + questions, steps=config.demo.lm_steps)
    print(f"[demo] language model for the demo captions and questions ({len(captions)} training captions, "
          f"{len(questions)} questions, {config.demo.lm_steps} steps) in {time.perf_counter() - started:.0f} s")
    return lm_dir


def finished_training(config: Config) -> dict | None:
    """The eval.json of a run that reached train.max_steps and exported, or None."""
    from vlpdist.parallel.consolidate import EXPORT_WEIGHTS

    out = Path(config.train.output_dir)
    export_meta = out / "export" / "export.json"
    if not ((out / "eval.json").is_file() and export_meta.is_file() and (out / "export" / EXPORT_WEIGHTS).is_file()):
        return None
    if json.loads(export_meta.read_text()).get("step") != config.train.max_steps:
        return None
    return json.loads((out / "eval.json").read_text())


def stage_train(config: Config, config_path: Path) -> tuple[dict, dict]:
    from vlpdist.parallel.launch import run_deepspeed

    started = time.perf_counter()
    evaluation = finished_training(config)
    if evaluation is not None and (Path(config.model.lm_name) / "config.json").is_file():
        training = evaluation.get("training") or {}
        rate = training.get("samples_per_s")
        return evaluation, stage_record("train", True, f"reused ({config.train.max_steps} steps in {config.train.output_dir})",
                                        started, f"{rate:.0f} samples/s when it ran" if rate else "-")
    stage_demo_lm(config)
    print(f"[demo] training on {DEMO_TRAINING_RANKS} CPU ranks with ep_size {config.train.ep_size} "
          f"(deepspeed launcher/train.py --config {config_path})", flush=True)
    returncode = run_deepspeed(TRAIN_SCRIPT, config_path, [], num_procs=DEMO_TRAINING_RANKS, cwd=REPO)
    if returncode != 0:
        raise SystemExit(f"[demo] training failed with exit code {returncode}")
    evaluation = json.loads((Path(config.train.output_dir) / "eval.json").read_text())
    rate = (evaluation.get("training") or {}).get("samples_per_s")
    return evaluation, stage_record("train", False, f"{config.train.max_steps} steps on {DEMO_TRAINING_RANKS} ranks, "
                                    f"ep_size {config.train.ep_size}, + held-out evaluation", started,
                                    f"{rate:.0f} samples/s" if rate else "-")


def stage_export(config: Config, train_reused: bool) -> tuple[dict, dict]:
    """The self-contained export (`launcher.export`) and the sample images to caption with it."""
    from launcher.export import main as export_main
    from vlpdist.models.export_bundle import EXPORT_FORMAT, MANIFEST_FILE
    from vlpdist.parallel.consolidate import EXPORT_WEIGHTS

    started = time.perf_counter()
    checkpoint = Path(config.train.output_dir) / "export" / EXPORT_WEIGHTS
    out = Path(config.root) / "export"
    manifest = json.loads((out / MANIFEST_FILE).read_text()) if (out / MANIFEST_FILE).is_file() else {}
    reused = (train_reused and manifest.get("format") == EXPORT_FORMAT
              and manifest.get("source_checkpoint") == str(checkpoint.resolve()) and "fold_tolerance" in manifest)
    if not reused:
        export_main(["--checkpoint", str(checkpoint), "--out", str(out)])
        manifest = json.loads((out / MANIFEST_FILE).read_text())
    images = write_sample_images(config)
    megabytes = sum(manifest["files"].values()) / 2**20
    note = f"{out} ({len(manifest['files'])} files, {megabytes:.1f} MB) + {len(images)} images in {images[0].parent}"
    return manifest, stage_record("export", reused, f"reused ({note})" if reused else note, started,
                                  "-" if reused else f"{megabytes / max(time.perf_counter() - started, 1e-9):.1f} MB/s")


def write_sample_images(config: Config) -> list[Path]:
    """The first SAMPLE_IMAGES images of the held-out raw shard as JPEG files in `<root>/sample_images` (kept if there)."""
    import tarfile

    from PIL import Image

    from data_ingest.download import list_raw_shards
    from vlpdist.atomic import atomic_write_bytes
    from vlpdist.data.feature_shards import split_heldout

    folder = Path(config.root) / "sample_images"
    existing = sorted(folder.glob("*.jpg"))
    if len(existing) >= SAMPLE_IMAGES:
        return existing[:SAMPLE_IMAGES]
    train, heldout = split_heldout(list_raw_shards(config), config.train.heldout_shards)
    written = []
    with tarfile.open((heldout or train)[-1]) as tar:
        for member in tar:
            if len(written) == SAMPLE_IMAGES:
                break
            if not member.isfile() or Path(member.name).suffix not in (".jpg", ".jpeg", ".png", ".webp"):
                continue
            buffer = io.BytesIO()
            # Re-encoded, so the folder holds JPEG files whatever format the download was told to write.
            Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB").save(buffer, format="JPEG", quality=95)
            written.append(atomic_write_bytes(folder / f"{Path(member.name).stem}.jpg", buffer.getvalue()))
    return written


def measure_fold_latency(config: Config) -> list[dict]:
    """Folded vs MoE mapper eval latency on the trained demo mapper, timed side by side (median of interleaved runs)."""
    from safetensors.torch import load_file

    from launcher.bench.mapper import eval_step, interleaved_median_seconds, unit_norm_clip
    from launcher.export import mapper_state
    from vlpdist.models.fold import load_folded_mapper
    from vlpdist.models.mapper import build_mapper
    from vlpdist.parallel.consolidate import EXPORT_WEIGHTS

    state = mapper_state(load_file(str(Path(config.train.output_dir) / "export" / EXPORT_WEIGHTS)))
    clip_dim = state["input_proj.weight"].shape[1]
    moe = build_mapper(config.model, clip_dim, state["input_proj.weight"].shape[0] // config.model.prefix_length).float()
    moe.load_state_dict(state)
    folded = load_folded_mapper(Path(config.root) / "export")
    rows = []
    for batch in LATENCY_BATCHES:
        clip_BC = unit_norm_clip(batch, clip_dim, seed=0)
        seconds = interleaved_median_seconds({"moe": eval_step(moe, clip_BC), "folded": eval_step(folded, clip_BC)},
                                             LATENCY_REPEATS, warmup=3)
        rows.append({"batch": batch, "moe_ms": 1e3 * seconds["moe"], "folded_ms": 1e3 * seconds["folded"],
                     "moe_over_folded": seconds["moe"] / seconds["folded"]})
    return rows


def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(section, measure, value, against) rows of the one summary table."""
    download, process, evaluation, export = results["download"], results["process"], results["train"], results["export"]
    rows = [("ingestion", "URL rows in", str(download["input_rows"]), ""),
            ("ingestion", "downloaded", str(download["success"]), "")]
    rows += [("ingestion", f"failed: {reason}", str(count), "") for reason, count in download["failures_by_reason"].items()]
    rows += [("ingestion", "processed: written", str(process["written"]), f"of {process['raw_samples']} downloaded"),
             ("ingestion", "processed: dropped by the caption filter", str(process["dropped_by_filter"]), "")]
    # A sample whose caption the filter drops but that holds a question is kept for its question alone.
    question_only = process.get("decisions", {}).get("question_only", 0)
    if question_only:
        rows.append(("ingestion", "processed: caption dropped, question kept", str(question_only),
                     f"captions kept {process.get('captions_kept', 0)}"))
    rows += [("ingestion", f"processed: failed {reason}", str(count), "") for reason, count in process["failed"].items()]
    truth = process.get("filter_vs_truth") or {}
    if truth:
        noise = truth["tp"] + truth["fn"]
        rows += [("filter", "precision vs the known mismatched captions", f"{truth['precision']:.3f}",
                  f"{noise} mismatched of {truth['samples_scored']}"),
                 ("filter", "recall vs the known mismatched captions", f"{truth['recall']:.3f}", "")]
    rows.append(("captions", f"held-out caption loss ({evaluation['samples']} samples)", f"{evaluation['caption_loss']:.3f}",
                 f"LM without the image {evaluation['lm_without_image_loss']:.3f}"))
    baseline = evaluation["most_frequent_caption_metrics"]
    for metric, value in evaluation["metrics"].items():
        rows.append(("captions", f"{metric} (greedy, x100)", f"{100 * value:.2f}", f"most-frequent caption {100 * baseline[metric]:.2f}"))
    if evaluation.get("vqa"):
        from vlpdist.eval.vqa import format_vqa_rows

        rows += [("questions", measure, ours, against) for measure, ours, against in format_vqa_rows(evaluation["vqa"])]
    retrieval = evaluation["retrieval"]
    for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        rows.append(("retrieval", f"{label} R@1 / R@5 / R@10 (%)",
                     " / ".join(f"{100 * retrieval[f'{direction}_R@{k}']:.1f}" for k in (1, 5, 10)),
                     f"chance {100 / evaluation['samples']:.1f} / {500 / evaluation['samples']:.1f} / {1000 / evaluation['samples']:.1f}"))
    rows.append(("fold", "relative error, folded vs MoE mapper", f"{export['fold_relative_error']:.1e}",
                 fold_note(export["fold_relative_error"], export["fold_tolerance"])))
    for row in results["latency"]:
        rows.append(("fold", f"eval latency, batch {row['batch']}", f"folded {row['folded_ms']:.3f} ms",
                     f"MoE {row['moe_ms']:.3f} ms (folded {row['moe_over_folded']:.1f}x faster)"))
    for stage in results["stages"]:
        rows.append(("stage", stage["stage"], f"{stage['wall_s']:.0f} s", f"{stage['throughput']}; {stage['note']}"))
    return rows


def format_summary_table(rows: list[tuple[str, str, str, str]]) -> str:
    """A markdown table (readable as plain text on the terminal too)."""
    header = ("", "measure", "value", "against / note")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    line = lambda cells: "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, rows)])


def next_commands(config: Config) -> list[str]:
    root = Path(config.root)
    shards = sorted((root / "features").glob("*.tar"))
    cut = len(shards) - config.train.heldout_shards
    commands = [f"tensorboard --logdir {Path(config.train.output_dir) / 'tb'} --host 127.0.0.1",
                f"python -m launcher.caption --export {root / 'export'} {root / 'sample_images'} --out {root / 'sample_captions.jsonl'}"]
    if config.train.heldout_shards:
        # The training shards give the most-frequent-caption baseline, as at the end of training.
        commands.append(f"python -m launcher.evaluate --model {root / 'export'} --features {' '.join(map(str, shards[cut:]))} "
                        f"--train-features {' '.join(map(str, shards[:cut]))} --beams 3 --vqa --out {root / 'eval_export.json'} "
                        f"--report {root / 'eval_export.html'}")
    # The page the demo just wrote, rebuilt and rendered in headless Chromium (the README's screenshot).
    commands.append(f"python -m launcher.report {root} --out {root / 'report.html'} --screenshot {root / 'report.png'}")
    return commands


def write_summary(config: Config, results: dict, table: str, commands: list[str]) -> None:
    from vlpdist.atomic import atomic_write_json, atomic_write_text

    root = Path(config.root)
    reused = [stage["stage"] for stage in results["stages"] if stage["reused"]]
    markdown = (f"# vlpdist demo summary\n\n{table}\n\nStages reused from an earlier run: {', '.join(reused) or 'none'}.\n\n"
                "Try next:\n\n" + "".join(f"    {command}\n" for command in commands))
    atomic_write_text(root / "summary.md", markdown)
    atomic_write_json(root / "summary.json", {**results, "next_commands": commands})


def run_stage(results: dict, name: str, stage) -> dict:
    """Run one stage function ((result, record)), keep both, say what it did or reused."""
    results[name], record = stage()
    results["stages"].append(record)
    print(f"[demo] {name}: {record['note']}", flush=True)
    return record


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--fresh", action="store_true", help="remove the demo's outputs under its root first and start over")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if set(stages) - set(STAGES):
        raise UserError(f"--stages {args.stages}: the stages are {','.join(STAGES)}")
    root = Path(config.root)
    claim_output_dir(root, WRITER, "root=")  # refused when it holds what the demo did not write
    if args.fresh:
        removed = remove_stage_outputs(root)
        print(f"[demo] --fresh: removed {', '.join(removed) or 'nothing'} under {root}", flush=True)

    started = time.perf_counter()
    results: dict = {"stages": []}
    if "download" in stages:
        run_stage(results, "download", lambda: stage_download(config))
    else:
        config.download.url_list = str(root / "source" / "urls.parquet")
    config_path = save_config(config, config.root)
    if "process" in stages:
        run_stage(results, "process", lambda: stage_process(config))
    train_reused = False
    if "train" in stages:
        train_reused = run_stage(results, "train", lambda: stage_train(config, config_path))["reused"]
    if "export" in stages:
        run_stage(results, "export", lambda: stage_export(config, train_reused))
    if set(stages) != set(STAGES):
        print(f"[demo] stages {','.join(stages)} done in {time.perf_counter() - started:.0f} s; outputs under {root}")
        return results
    results["latency"] = measure_fold_latency(config)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    table = format_summary_table(summary_rows(results))
    commands = next_commands(config)
    write_summary(config, results, table, commands)
    report = write_run_report(root, root / "report.html", "the demo's report")
    print(f"\n[demo] ===== summary ({root / 'summary.md'}) =====\n{table}\n")
    print(f"[demo] run report (open it in a browser): {report}")
    print(f"[demo] done in {results['wall_s']:.0f} s; outputs under {root}; try next:")
    for command in commands:
        print(f"    {command}")
    return results


if __name__ == "__main__":
    main()
