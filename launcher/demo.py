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
4. export: the MoE mapper is folded into one dense layer and written as safetensors.

Every stage skips what is already finished, so a rerun (or a run after a crash) resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from launcher.paths import DEFAULT_CONFIG, REPO, TRAIN_SCRIPT
from vlpdist.config import Config, load_config, save_config
from vlpdist.errors import exit_on_user_error

DEMO_TRAINING_RANKS = 2


def write_demo_url_list(config: Config, base_url: str, samples) -> Path:
    """Write `<root>/source/urls.parquet` (what ingestion reads) and the ground truth beside it."""
    import pandas as pd

    from data_ingest.sources.synthetic import demo_url_rows
    from vlpdist.atomic import atomic_write_bytes

    rows = pd.DataFrame(demo_url_rows(samples, config.demo, base_url))
    source = Path(config.root) / "source"
    source.mkdir(parents=True, exist_ok=True)
    url_list = source / "urls.parquet"
    atomic_write_bytes(url_list, rows[["url", "caption"]].to_parquet(index=False))
    truth = rows.assign(url_path=rows["url"].str.replace(base_url + "/", "", regex=False)).drop(columns=["url"])
    atomic_write_bytes(source / "demo_truth.parquet", truth.to_parquet(index=False))
    return url_list


def stage_download(config: Config) -> dict:
    from data_ingest.download import run_download
    from data_ingest.sources.demo_server import DemoImageServer
    from data_ingest.sources.synthetic import broken_paths, generate_demo_samples

    samples = generate_demo_samples(config.demo)
    print(f"[demo] generated {len(samples)} images ({sum(s.is_mismatched for s in samples)} with mismatched captions)")
    broken = broken_paths(config.demo)
    with DemoImageServer({s.path: s.jpeg for s in samples}, broken, config.demo.slow_response_s) as server:
        print(f"[demo] serving them on {server.base_url} with {len(broken)} broken URLs")
        config.download.url_list = str(write_demo_url_list(config, server.base_url, samples))
        return run_download(config)


def stage_demo_lm(config: Config) -> Path:
    """The demo's language model: a tokenizer and a tiny GPT-2 trained on the training shards' captions."""
    from data_ingest.sources.demo_lm import make_demo_lm
    from vlpdist.data.feature_format import iterate_feature_shards
    from vlpdist.data.feature_shards import list_feature_shards, split_heldout

    lm_dir = Path(config.model.lm_name)
    if (lm_dir / "config.json").is_file():
        print(f"[demo] language model {lm_dir} exists")
        return lm_dir
    train_shards, _ = split_heldout(list_feature_shards(Path(config.root) / "features"), config.train.heldout_shards)
    captions = [c for sample in iterate_feature_shards([str(s) for s in train_shards]) for c in sample.captions]
    started = time.perf_counter()
    make_demo_lm(lm_dir, captions)
    print(f"[demo] language model for the demo captions ({len(captions)} training captions) in {time.perf_counter() - started:.0f} s")
    return lm_dir


def stage_train(config: Config, config_path: Path) -> dict:
    from vlpdist.parallel.launch import run_deepspeed

    print(f"[demo] training on {DEMO_TRAINING_RANKS} CPU ranks with ep_size {config.train.ep_size} "
          f"(deepspeed launcher/train.py --config {config_path})", flush=True)
    returncode = run_deepspeed(TRAIN_SCRIPT, config_path, [], num_procs=DEMO_TRAINING_RANKS, cwd=REPO)
    if returncode != 0:
        raise SystemExit(f"[demo] training failed with exit code {returncode}")
    return json.loads((Path(config.train.output_dir) / "eval.json").read_text())


def stage_export(config: Config) -> dict:
    from launcher.export import main as export_main
    from vlpdist.train.loop import EXPORT_WEIGHTS

    checkpoint = Path(config.train.output_dir) / "export" / EXPORT_WEIGHTS
    return export_main(["--checkpoint", str(checkpoint), "--out", str(Path(config.root) / "export")])


def print_report(results: dict) -> None:
    download, process, evaluation = results["download"], results["process"], results["train"]
    truth = process.get("filter_vs_truth", {})
    print("\n[demo] ===== results =====")
    print(f"[demo] ingestion: {download['input_rows']} rows -> {download['success']} images, "
          f"{download['failed']} failed {download['failures_by_reason']}")
    print(f"[demo] caption filter vs the known mismatched captions: precision {truth.get('precision', float('nan')):.3f}, "
          f"recall {truth.get('recall', float('nan')):.3f}")
    print(f"[demo] held-out caption loss {evaluation['caption_loss']:.3f} vs LM without image "
          f"{evaluation['lm_without_image_loss']:.3f}")
    ours, baseline = evaluation["metrics"], evaluation["most_frequent_caption_metrics"]
    for metric in ("BLEU-4", "CIDEr"):
        print(f"[demo] {metric}: {ours[metric]:.3f} vs most-frequent caption {baseline[metric]:.3f}")
    export = results.get("export") or {}
    if "fold_relative_error" in export:
        print(f"[demo] folded mapper: relative error {export['fold_relative_error']:.2e} against the MoE mapper")


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--stages", default="download,process,train,export",
                        help="comma-separated subset of download,process,train,export")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]

    started = time.perf_counter()
    results: dict = {}
    if "download" in stages:
        results["download"] = stage_download(config)
    else:
        config.download.url_list = str(Path(config.root) / "source" / "urls.parquet")
    config_path = save_config(config, config.root)
    if "process" in stages:
        from data_ingest.process import run_process

        results["process"] = run_process(config)
    if "train" in stages:
        stage_demo_lm(config)
        results["train"] = stage_train(config, config_path)
    if "export" in stages:
        results["export"] = stage_export(config)
    if {"download", "process", "train"} <= set(results):
        print_report(results)
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; outputs under {config.root}")
    return results


if __name__ == "__main__":
    main()
