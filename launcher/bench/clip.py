"""CLIP feature throughput: our processing stage vs clip-retrieval's `clip_inference`, side by side.

`python -m launcher.bench.clip [--root /tmp/vlpdist_bench] [--num-samples 4000] [--repeats 3]`

Same raw webdataset shards (made by the demo: img2dataset from the loopback server), same CLIP
(a small open_clip model built from a config, saved as a checkpoint file, loaded by each tool
through its own loader: open_clip's `pretrained=<file>` for us, `clip.load(<file>)` for
clip-retrieval), same batch size, same machine, one run. Both compute image and caption
embeddings and write them to disk. Each measurement is one whole call (model load included) with
the library imports done beforehand; runs alternate between the tools and the best of
`--repeats` is compared. The embeddings of the two tools are checked to agree, which shows that
the same model and preprocessing were measured.

clip-retrieval runs in a subprocess: its OpenAI `clip` package imports `pkg_resources`, gone from
setuptools >= 81. If that import fails, put an older setuptools in a folder of its own and pass it:
`pip install --target /work/bench_venv/pkg_resources_shim 'setuptools<81'` and
`--clip-retrieval-pythonpath /work/bench_venv/pkg_resources_shim`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_CLIP_MODEL = "vlpdist-bench-clip"
# A ViT that OpenAI's CLIP loader can rebuild from the state dict alone: 64-wide heads, QuickGELU,
# the 77-token context and 49408-token vocabulary of its tokenizer.
BENCH_CLIP_CONFIG = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 2},
}


def make_raw_shards(root: Path, num_samples: int, samples_per_shard: int) -> list[Path]:
    """Run the demo's download stage (generate, serve, img2dataset) unless its shards are already there."""
    from data_ingest.download import finished_shards, list_raw_shards, raw_dir
    from launcher import demo
    from vlpdist.config import load_config

    overrides = [f"root={root}", f"demo.num_samples={num_samples}", f"download.samples_per_shard={samples_per_shard}"]
    config = load_config(demo.DEFAULT_CONFIG, overrides)
    if not finished_shards(raw_dir(config)):
        demo.main(["--stages", "download", *overrides])
    return list_raw_shards(config)


def make_bench_clip(folder: Path, model_name: str = BENCH_CLIP_MODEL) -> Path:
    """Build the benchmark CLIP from its config with open_clip and save `<name>.pt` with `<name>.json` beside it;
    another `model_name` is one of open_clip's own configs (random weights, `<name>.pt` only)."""
    import open_clip
    import torch

    from data_ingest.process.clip_model import register_clip_configs
    from vlpdist.atomic import atomic_path, atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    if model_name != BENCH_CLIP_MODEL:
        checkpoint = folder / f"{model_name}.pt"
        if not checkpoint.exists():
            torch.manual_seed(0)
            with atomic_path(checkpoint) as staging:
                torch.save(open_clip.create_model(model_name).state_dict(), staging)
        return checkpoint
    checkpoint = folder / f"{BENCH_CLIP_MODEL}.pt"
    config_file = folder / f"{BENCH_CLIP_MODEL}.json"
    if checkpoint.exists() and config_file.exists() and json.loads(config_file.read_text()) == BENCH_CLIP_CONFIG:
        return checkpoint
    atomic_write_json(config_file, BENCH_CLIP_CONFIG)
    register_clip_configs(BENCH_CLIP_MODEL, str(checkpoint))  # finds the config beside the checkpoint
    torch.manual_seed(0)
    model = open_clip.create_model(BENCH_CLIP_MODEL)
    with atomic_path(checkpoint) as staging:
        torch.save(model.state_dict(), staging)
    return checkpoint


CLIP_RETRIEVAL_RUNNER = r"""
import json, os, sys, time
import numpy as np, pandas as pd
import clip, sentence_transformers, torch, webdataset  # imported before the clock starts, as ours are
from clip_retrieval.clip_inference import clip_inference
args = json.loads(sys.argv[1])
cpu_before = sum(os.times()[:4])  # user + system, this process and its reaped children (the decode workers)
started = time.perf_counter()
clip_inference(input_dataset=args["shards"], output_folder=args["output"], input_format="webdataset",
               batch_size=args["batch_size"], num_prepro_workers=args["workers"], enable_text=True,
               enable_metadata=False, clip_model=args["checkpoint"], use_jit=False)
seconds = time.perf_counter() - started
cpu_seconds = sum(os.times()[:4]) - cpu_before
embeddings = np.concatenate([np.load(p) for p in sorted(__import__("glob").glob(args["output"] + "/img_emb/*.npy"))])
keys = pd.concat([pd.read_parquet(p) for p in sorted(__import__("glob").glob(args["output"] + "/metadata/*.parquet"))])["image_path"]
np.save(args["output"] + "/by_key.npy", embeddings)
pd.Series(list(keys)).to_frame("key").to_parquet(args["output"] + "/by_key.parquet")
print("RESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "images": int(embeddings.shape[0])}))
"""


def run_clip_retrieval(shards: list[Path], checkpoint: Path, output: Path, batch_size: int, workers: int,
                       extra_pythonpath: str) -> dict:
    """One timed `clip_inference` call in a fresh interpreter; returns seconds and images embedded."""
    shutil.rmtree(output, ignore_errors=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if extra_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_pythonpath, env.get("PYTHONPATH", "")) if p)
    args = {"shards": [str(s) for s in shards], "output": str(output), "batch_size": batch_size,
            "workers": workers, "checkpoint": str(checkpoint)}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", CLIP_RETRIEVAL_RUNNER, json.dumps(args)],
                          env=env, capture_output=True, text=True)
    result_lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not result_lines:
        hint = ""
        if "pkg_resources" in done.stderr:
            hint = ("\nclip-anytorch needs pkg_resources: pip install --target <dir> 'setuptools<81' and pass "
                    "--clip-retrieval-pythonpath <dir>")
        raise SystemExit(f"clip_inference failed (exit {done.returncode}):\n{done.stderr[-3000:]}{hint}")
    return json.loads(result_lines[-1][len("RESULT "):])


def process_settings(checkpoint: Path, batch_size: int, workers: int, model: str = BENCH_CLIP_MODEL, device: str = "cpu",
                     loader_workers: int = -1):
    """Our stage's settings for the benchmark: CLIP features of every sample (filter off, no captioner)."""
    from vlpdist.config import ProcessConfig

    return ProcessConfig(clip_model=model, clip_pretrained=str(checkpoint), filter="none",
                         caption_policy="web", captioner="", vocab="demo_shapes", device=device,
                         batch_size=batch_size, num_cpus=workers, cpus_per_task=1.0, loader_workers=loader_workers)


def make_shard_processor(checkpoint: Path, batch_size: int, model: str = BENCH_CLIP_MODEL, device: str = "cpu",
                         workers: int = 1):
    """What each Ray task of the stage holds (`ShardProcessor`: its models, loaded once, and its loader's
    workers, started at its first shard and kept), for `workers` CPUs: the loader decodes on workers - 1 processes."""
    from data_ingest.process.shard import ShardProcessor

    return ShardProcessor(process_settings(checkpoint, batch_size, 1, model, device, loader_workers=workers - 1))


def run_process_shard_loop(shards: list[Path], checkpoint: Path, output: Path, batch_size: int,
                           model: str = BENCH_CLIP_MODEL, device: str = "cpu", workers: int = 1, processor=None) -> dict:
    """Our per-shard work (what each Ray task runs) on every shard in this process. With `processor`
    (a warm `make_shard_processor`) the clock holds the shards alone; without, it also holds the model
    load and the loader's workers starting, as clip_inference's call does."""
    shutil.rmtree(output, ignore_errors=True)
    cpu_before, started = time.process_time(), time.perf_counter()
    task = processor or make_shard_processor(checkpoint, batch_size, model, device, workers)
    written = sum(task.process(str(raw), str(output))["written"] for raw in shards)
    if processor is None:
        task.chunk_loader.close()
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_before, "images": written}


def run_process_stage(root: Path, checkpoint: Path, batch_size: int, workers: int, ray_running: bool) -> dict:
    """The whole stage: `run_process` runs one Ray task per shard on `workers` CPUs.

    With `ray_running` False the call starts Ray itself (in-process, as the demo does); with True
    Ray is started before the clock, as on a cluster where `ray start` ran once and jobs join it.
    Either way the workers start, import torch and load CLIP inside the measured time.
    """
    import ray

    from data_ingest.process.run import run_process, start_ray
    from vlpdist.config import load_config

    stage_root = root / "out_ours_stage"
    shutil.rmtree(stage_root, ignore_errors=True)
    stage_root.mkdir(parents=True)
    (stage_root / "raw").symlink_to(root / "raw")
    config = load_config(None, [f"root={stage_root}"])
    config.process = process_settings(checkpoint, batch_size, workers)
    if ray_running:
        start_ray(config.process)
    try:
        started = time.perf_counter()
        summary = run_process(config)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    return {"seconds": seconds, "images": summary["written"]}


def ours_embeddings(features_dir: Path) -> dict[str, "object"]:
    from vlpdist.data.feature_format import iterate_feature_shards

    shards = [str(p) for p in sorted(features_dir.glob("*.tar"))]
    return {sample.key: sample.image_embedding for sample in iterate_feature_shards(shards)}


def clip_retrieval_embeddings(output: Path) -> dict[str, "object"]:
    import numpy as np
    import pandas as pd

    keys = pd.read_parquet(output / "by_key.parquet")["key"]
    embeddings = np.load(output / "by_key.npy")
    return dict(zip(keys, embeddings))


def summarize(name: str, runs: list[dict]) -> dict:
    rates = [run["images"] / run["seconds"] for run in runs]
    # Images per CPU-second resists other load on the machine (which skews wall-clock rates); the Ray
    # stage's CPU time is spread over Ray's worker processes and is not measured.
    per_cpu = [run["images"] / run["cpu_seconds"] for run in runs if run.get("cpu_seconds")]
    return {"name": name, "images": runs[0]["images"], "best_images_per_s": max(rates),
            "median_images_per_s": statistics.median(rates), "runs_images_per_s": [round(r, 1) for r in rates],
            "best_images_per_cpu_s": max(per_cpu) if per_cpu else None}


def clip_retrieval_unavailable(extra_pythonpath: str) -> str | None:
    """Why clip-retrieval's `clip_inference` cannot run here (its import's last error line), or None."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if extra_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_pythonpath, env.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", "import clip, clip_retrieval.clip_inference"],
                          env=env, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1]
    hint = " (clip-anytorch needs pkg_resources: see launcher/bench/clip.py's docstring)" if "pkg_resources" in done.stderr else ""
    return f"clip-retrieval does not import here: {last}{hint}"


# Distinct demo images drawn for directly written shards; more samples reuse them under their own keys
# (decoding and embedding cost the same), so tens of thousands of samples take seconds to write.
DISTINCT_IMAGES = 4096


def write_raw_shards(root: Path, num_samples: int, samples_per_shard: int) -> list[Path]:
    """Raw shards of `num_samples` demo images written directly (key.jpg / key.txt / key.json, as img2dataset
    writes them), for machines without img2dataset; the CLIP stage reads them the same way."""
    import webdataset as wds

    from data_ingest.sources.synthetic import generate_demo_samples
    from vlpdist.config import load_config

    folder = root / "raw"
    shards = sorted(folder.glob("*.tar"))
    if shards:
        return shards
    folder.mkdir(parents=True, exist_ok=True)
    samples = generate_demo_samples(load_config(None, [f"demo.num_samples={min(num_samples, DISTINCT_IMAGES)}"]).demo)
    for start in range(0, num_samples, samples_per_shard):
        with wds.TarWriter(str(folder / f"{start // samples_per_shard:05d}.tar")) as writer:
            for index in range(start, min(start + samples_per_shard, num_samples)):
                sample, key = samples[index % len(samples)], f"{index:09d}"
                writer.write({"__key__": key, "jpg": sample.jpeg, "txt": sample.caption,
                              "json": json.dumps({"key": key, "url": sample.path, "caption": sample.caption}).encode()})
    return sorted(folder.glob("*.tar"))


def run_bare_tower(checkpoint: Path, model_name: str, images: int, batch_size: int, device: str) -> dict:
    """The CLIP image tower alone on ready (B, 3, H, W) pixel batches: `images` images, no decoding, no writing."""
    import torch

    from data_ingest.process.clip_model import encode_images, load_clip

    model, _, _ = load_clip(model_name, str(checkpoint), device)
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    pixels = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.pin_memory() if device == "cuda" else pixels
    encode_images(model, pixels, device)  # warm-up
    started = time.perf_counter()
    for start in range(0, images, batch_size):
        encode_images(model, pixels[: min(batch_size, images - start)], device)
    return {"seconds": time.perf_counter() - started, "images": images}


def run_benchmark(root: Path, num_samples: int = 4000, samples_per_shard: int = 250, batch_size: int = 64, workers: int = 2,
                  repeats: int = 3, with_ray: bool = True, clip_retrieval_pythonpath: str = "",
                  model_name: str = BENCH_CLIP_MODEL, device: str = "cpu", download: bool = True) -> dict:
    """Rows (images/s, best of `repeats`, runs alternating): our per-shard stage work and the bare
    image tower on the same number of images, timed alike (for both, the model loaded before the clock;
    for the stage, also its loader's workers started and a first shard run through it, as in a Ray
    task past its first shard; what the stage does per shard - decoding, preprocessing, writing -
    stays in); clip-retrieval's `clip_inference` when it
    imports, and (with `with_ray`) the whole Ray stage cold and with Ray running, against our stage
    function with its model load in the measured call as theirs; JSON-ready. The raw shards come
    from the demo's download stage, or (`download` False, or no img2dataset) are written directly."""
    root = Path(root).resolve() / str(num_samples)
    try:
        import img2dataset  # noqa: F401
    except ImportError:
        download = False
    if download:
        shards = make_raw_shards(root, num_samples, samples_per_shard)
        made_by = "img2dataset from the loopback server"
    else:
        shards = write_raw_shards(root, num_samples, samples_per_shard)
        made_by = "written directly"
    checkpoint = make_bench_clip(root / "bench_clip", model_name)
    ours, cold = "vlpdist ShardProcessor, 1 process, model loaded, workers started", "vlpdist ShardProcessor, 1 process, model load included"
    # The warm-up, outside every clock: the model loaded, CUDA and the loader's workers started (they stay).
    warm = make_shard_processor(checkpoint, batch_size, model_name, device, workers)
    run_process_shard_loop(shards[:1], checkpoint, root / "out_warm_up", batch_size, processor=warm)
    contenders = {ours: lambda: run_process_shard_loop(shards, checkpoint, root / "out_ours_loop", batch_size, processor=warm)}
    contenders["bare CLIP image tower"] = lambda: run_bare_tower(checkpoint, model_name, num_samples, batch_size, device)
    unavailable = clip_retrieval_unavailable(clip_retrieval_pythonpath)
    if unavailable is None or with_ray:  # what includes its model load is compared with our call that does too
        contenders[cold] = lambda: run_process_shard_loop(shards, checkpoint, root / "out_ours_cold", batch_size, model_name, device,
                                                          workers=workers)
    if unavailable is None:
        contenders[f"clip_inference, {workers} decode workers"] = lambda: run_clip_retrieval(
            shards, checkpoint, root / "out_clip_retrieval", batch_size, workers, clip_retrieval_pythonpath)
    if with_ray:
        contenders[f"vlpdist run_process, starts Ray, {workers} CPUs"] = lambda: run_process_stage(
            root, checkpoint, batch_size, workers, ray_running=False)
        contenders[f"vlpdist run_process, Ray running, {workers} CPUs"] = lambda: run_process_stage(
            root, checkpoint, batch_size, workers, ray_running=True)
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    try:
        for _ in range(repeats):
            for name, measure in contenders.items():
                runs[name].append(measure())
    finally:
        warm.chunk_loader.close()
    rows = [summarize(name, measured) for name, measured in runs.items()]
    best = {row["name"]: row["best_images_per_s"] for row in rows}
    result = {"shards": len(shards), "shards_made_by": made_by, "model": model_name, "device": device, "batch_size": batch_size,
              "workers": workers, "repeats": repeats, "rows": rows,
              "ratio_stage_over_bare_tower": best[ours] / best["bare CLIP image tower"],
              "clip_retrieval": {"available": unavailable is None, "reason": unavailable}}
    if unavailable is None:
        theirs = f"clip_inference, {workers} decode workers"
        result["ratio_ours_over_clip_inference"] = best[cold] / best[theirs]
        result["agreement"] = embedding_agreement(ours_embeddings(root / "out_ours_loop"),
                                                  clip_retrieval_embeddings(root / "out_clip_retrieval"))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.bench.clip", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/vlpdist_bench",
                        help="benchmark folder; raw shards are made once per sample count, in <root>/<num-samples>")
    # Enough images that starting Ray and its workers (seconds) is not most of the stage's time,
    # as it is not on a real dataset.
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="decode workers of clip_inference; CPUs of our stage")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clip-retrieval-pythonpath", default=os.environ.get("VLPDIST_BENCH_PYTHONPATH", ""),
                        help="folder put first on clip-retrieval's PYTHONPATH (see the module docstring)")
    args = parser.parse_args(argv)

    root = Path(args.root).resolve() / str(args.num_samples)
    shards = make_raw_shards(root, args.num_samples, args.samples_per_shard)
    checkpoint = make_bench_clip(root / "bench_clip")
    contenders = {
        f"clip_inference, {workers} decode worker{'s' if workers > 1 else ''}": (
            lambda workers=workers: run_clip_retrieval(shards, checkpoint, root / "out_clip_retrieval", args.batch_size,
                                                       workers, args.clip_retrieval_pythonpath))
        for workers in sorted({1, args.workers})
    }
    contenders[f"vlpdist run_process, starts Ray, {args.workers} CPUs"] = lambda: run_process_stage(
        root, checkpoint, args.batch_size, args.workers, ray_running=False)
    contenders[f"vlpdist run_process, Ray running, {args.workers} CPUs"] = lambda: run_process_stage(
        root, checkpoint, args.batch_size, args.workers, ray_running=True)
    contenders["vlpdist ShardProcessor, 1 process"] = lambda: run_process_shard_loop(
        shards, checkpoint, root / "out_ours_loop", args.batch_size)
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for repeat in range(args.repeats):  # alternate the tools so that machine noise hits all of them alike
        for name, measure in contenders.items():
            runs[name].append(measure())
            print(f"repeat {repeat + 1}/{args.repeats}: {name}: {runs[name][-1]['images']} images, "
                  f"{runs[name][-1]['images'] / runs[name][-1]['seconds']:.1f} images/s", flush=True)

    agreement = embedding_agreement(ours_embeddings(root / "out_ours_stage" / "features"),
                                    clip_retrieval_embeddings(root / "out_clip_retrieval"))
    rows = [summarize(name, measured) for name, measured in runs.items()]
    print_table(rows, agreement, args, len(shards))
    return {"rows": rows, "agreement": agreement}


def embedding_agreement(ours: dict, theirs: dict) -> dict:
    """How closely the two tools' image embeddings agree on the samples both embedded."""
    import numpy as np

    common = sorted(set(ours) & set(theirs))
    if not common:
        raise SystemExit("the two tools embedded no sample in common: not the same shards?")
    cosines = [float(np.dot(ours[k].astype(np.float32), theirs[k].astype(np.float32))) for k in common]
    return {"common_samples": len(common), "min_cosine": min(cosines), "mean_cosine": statistics.fmean(cosines)}


def print_table(rows: list[dict], agreement: dict, args, num_shards: int) -> None:
    """The side-by-side table; ratios are against clip_inference in its best measured configuration."""
    import torch

    baseline = max((row for row in rows if row["name"].startswith("clip_inference")), key=lambda r: r["best_images_per_s"])
    print()
    print(f"CLIP feature throughput, {baseline['images']} images in {num_shards} shards, {BENCH_CLIP_MODEL} "
          f"(ViT {BENCH_CLIP_CONFIG['vision_cfg']['layers']}x{BENCH_CLIP_CONFIG['vision_cfg']['width']}, "
          f"{BENCH_CLIP_CONFIG['vision_cfg']['image_size']} px), batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"best of {args.repeats}")
    print(f"{'':44}{'best img/s':>11}{'median img/s':>14}{'ratio':>8}{'img/CPU-s':>11}   runs (img/s)")
    for row in rows:
        ratio = row["best_images_per_s"] / baseline["best_images_per_s"]
        per_cpu = f"{row['best_images_per_cpu_s']:11.1f}" if row["best_images_per_cpu_s"] else f"{'n/a':>11}"
        print(f"{row['name']:44}{row['best_images_per_s']:11.1f}{row['median_images_per_s']:14.1f}"
              f"{ratio:8.2f}{per_cpu}   {row['runs_images_per_s']}")
    print(f"ratio = best images/s over that of '{baseline['name']}' (clip-retrieval's best configuration here)")
    print(f"same model check: image embeddings of {agreement['common_samples']} samples agree, "
          f"cosine min {agreement['min_cosine']:.5f}, mean {agreement['mean_cosine']:.5f}")


if __name__ == "__main__":
    main()
