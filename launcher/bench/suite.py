"""The benchmark suite: `python -m launcher.bench [--quick | --gpu] [--only train,mapper,geodesic,clip,ingest] [--out DIR]`.

Each section, as soon as it finishes, writes `sections/<name>.json` (a report of that section alone)
and `sections/<name>.md` (its summary rows) into `--out`, then `bench.json` and `bench.md` (the summary
table with at least one row per section so far) are replaced with every section so far: a run killed
later keeps each finished section. Reports are checked against `BENCH_SCHEMA` when jsonschema is
installed (the schema itself is checked before any section runs); without it they are written
unchecked and say so. Every figure is measured in this one run, and every ratio is of two things
measured side by side in it (absolute times on a shared machine mean little); goals on an absolute
figure (the GPU's samples/s, the k-NN's 3 s) are shown beside the measured figure, not divided into it.

Sections (each one module's `run_benchmark`):
- ingest: img2dataset from the loopback demo server vs a bare threaded fetch (`launcher.bench.ingest`);
- clip: our CLIP stage vs the bare image tower, and vs clip-retrieval's `clip_inference` when it
  imports here (`launcher.bench.clip`); if it does not, the section says why;
- train: the full training step at GPT-2 small's geometry vs the bare LM forward+backward and vs
  ClipCap's own step (its COCO recipe, prefix 40 and clip length 40, and at prefix 10; the same
  optimizer implementation as ours, named in the table), alignment off and on, each loss term's
  share (`launcher.bench.train`, `launcher.bench.clipcap`);
- mapper: MoE vs dense vs folded vs static fold at batch 1, 64, 1024 (`launcher.bench.mapper`);
- geodesic: k-NN graph build per backend and a geodesic refresh over a 65,536 x 512 bank, as a share
  of the training step at the refresh interval (`launcher.bench.geodesic`; the share needs the
  train section in the same run); on a GPU, the 1M x 512 k-NN graph's time beside its 3 s goal.

`--quick` shrinks every size (the whole suite in under two minutes on a 2-core machine); `--gpu`
runs the sizes of one GPU (bf16, the frozen LM and mapper compiled, batch 256, a 1M x 512 k-NN graph).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

from vlpdist.errors import exit_on_user_error

SECTIONS = ("ingest", "clip", "train", "mapper", "geodesic")

_ROW = {
    "type": "object",
    "required": ["figure", "value", "unit", "ratio", "vs", "goal", "met"],
    "properties": {
        "figure": {"type": "string"},
        "value": {"type": ["number", "null"]},
        "unit": {"type": "string"},
        "ratio": {"type": ["number", "null"]},
        "vs": {"type": ["string", "null"]},
        "goal": {"type": ["string", "null"]},
        "met": {"type": ["boolean", "null"]},
    },
    "additionalProperties": False,
}
BENCH_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["mode", "command", "machine", "sections"],
    "properties": {
        "mode": {"enum": ["quick", "full", "gpu"]},
        "command": {"type": "string"},
        "schema_checked": {"type": "boolean"},
        "machine": {
            "type": "object",
            "required": ["cpu", "cores", "python", "torch", "deepspeed", "transformers", "gpu"],
            "properties": {"cpu": {"type": "string"}, "cores": {"type": "integer", "minimum": 1},
                           "torch_threads": {"type": "integer"}, "gpu": {"type": ["string", "null"]}},
        },
        "sections": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"enum": list(SECTIONS)},
            "additionalProperties": {
                "type": "object",
                "required": ["status", "reason", "seconds", "summary", "detail"],
                "properties": {
                    "status": {"enum": ["ok", "unavailable", "error"]},
                    "reason": {"type": ["string", "null"]},
                    "seconds": {"type": "number", "minimum": 0},
                    "summary": {"type": "array", "items": _ROW},
                    "detail": {"type": ["object", "null"]},
                },
                "if": {"properties": {"status": {"const": "ok"}}},
                "then": {"properties": {"summary": {"minItems": 1}}},
            },
        },
    },
}


class SectionUnavailable(Exception):
    """A section that cannot run on this machine (a missing package, no GPU): the report says why."""


def row(figure: str, value, unit: str, ratio=None, vs: str | None = None, goal: str | None = None, met: bool | None = None) -> dict:
    return {"figure": figure, "value": None if value is None else float(value), "unit": unit,
            "ratio": None if ratio is None else float(ratio), "vs": vs, "goal": goal, "met": met}


def describe_machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = {}
    for package in ("deepspeed", "transformers", "faiss", "open_clip", "img2dataset"):
        try:
            module = __import__(package)
            versions[package] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - any import failure: not usable here
            versions[package] = None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# -- sections ------------------------------------------------------------------------------------

def section_ingest(mode: str, work: Path, results: dict) -> tuple[list[dict], dict]:
    from launcher.bench.ingest import run_benchmark

    try:
        import img2dataset  # noqa: F401
    except ImportError as err:
        raise SectionUnavailable(f"img2dataset does not import here: {err}") from None
    sizes = {"quick": dict(num_samples=100, samples_per_shard=100, repeats=1)}.get(mode, dict(num_samples=2000, samples_per_shard=500, repeats=2))
    detail = run_benchmark(**sizes, processes=1, threads=16, work=work)
    summary = [
        row("img2dataset rows per CPU-second (per core), 1 process x 16 threads", detail["img2dataset"]["rows_per_cpu_s"], "rows/CPU-s",
            detail["ratio_per_cpu_s"], "bare threaded fetch of the same URLs (bytes only)"),
        row("img2dataset rows/s, wall, 1 process", detail["img2dataset"]["rows_per_s"], "rows/s", detail["ratio_wall"],
            "bare threaded fetch of the same URLs (bytes only)"),
    ]
    return summary, detail


def section_clip(mode: str, work: Path, results: dict) -> tuple[list[dict], dict]:
    from launcher.bench.clip import run_benchmark

    try:
        import open_clip  # noqa: F401
    except ImportError as err:
        raise SectionUnavailable(f"open_clip does not import here: {err}") from None
    settings = {
        "quick": dict(num_samples=100, samples_per_shard=50, repeats=1, with_ray=False, download=False),
        "full": dict(num_samples=2000, samples_per_shard=250, repeats=1, with_ray=True),
        # 65,536 images: about 3 s of ViT-B-32 tower at the 21.7k images/s measured on an H100, so neither
        # clock is dominated by what happens once per call.
        "gpu": dict(num_samples=65536, samples_per_shard=16384, repeats=2, with_ray=False, download=False, model_name="ViT-B-32",
                    device="cuda", batch_size=1024, workers=12),
    }[mode]
    detail = run_benchmark(work, clip_retrieval_pythonpath=os.environ.get("VLPDIST_BENCH_PYTHONPATH", ""), **settings)
    rows = {r["name"]: r for r in detail["rows"]}
    ours = rows["vlpdist ShardProcessor, 1 process, model loaded, workers started"]
    on_gpu = mode == "gpu"
    summary = [row(f"CLIP stage images/s ({detail['model']}, {detail['device']}, batch {detail['batch_size']}, {ours['images']:,} images, "
                   "model loaded and loader workers started before the clock)", ours["best_images_per_s"], "images/s", detail["ratio_stage_over_bare_tower"],
                   f"bare CLIP image tower, model loaded before the clock, {rows['bare CLIP image tower']['best_images_per_s']:.3g} images/s",
                   "stage >= 0.9 x bare tower (GPU)", detail["ratio_stage_over_bare_tower"] >= 0.9 if on_gpu else None)]
    cold = rows.get("vlpdist ShardProcessor, 1 process, model load included")
    if detail["clip_retrieval"]["available"]:
        summary.append(row("CLIP stage (model load included) vs clip-retrieval", cold["best_images_per_s"], "images/s",
                           detail["ratio_ours_over_clip_inference"], "clip_inference (model load included), same shards and model"))
    else:
        summary.append(row(f"vs clip-retrieval: not measured ({detail['clip_retrieval']['reason']})", None, "images/s"))
    for name, measured in rows.items():
        if name.startswith("vlpdist run_process"):
            summary.append(row(name, measured["best_images_per_s"], "images/s",
                               measured["best_images_per_s"] / cold["best_images_per_s"], "ShardProcessor, 1 process, model load included"))
    return summary, detail


def section_train(mode: str, work: Path, results: dict) -> tuple[list[dict], dict]:
    from launcher.bench.train import QUICK, run_benchmark

    settings = {"quick": QUICK | {"compiled_rows": True}, "full": dict(batch=8, steps=1, rounds=5, compiled_rows=True),
                # One GPU: everything compiled (ClipCap's steps too), the cached text target only, no unfused-AdamW
                # row and ClipCap at its recipe and prefix 10 only (each compile costs some of the few minutes).
                "gpu": dict(batch=256, steps=5, rounds=3, compile_lm=True, text_targets=("lm_cached",), unfused_adamw_row=False,
                            clipcap_variants=("ClipCap step, prefix 40/40", "ClipCap step, prefix 10/10"))}[mode]
    detail = run_benchmark(**settings, work=work / "batch")
    # On CPU, a second run at 4x the batch with the caption-only rows: the per-step costs that do not
    # grow with the batch (the optimizer over the mapper, ZeRO's copies) weigh 4x less, as they do at
    # a GPU's batch (the recipe's 256 per GPU).
    larger = None
    if mode != "gpu":
        larger = run_benchmark(**(settings | {"batch": 4 * settings["batch"], "text_targets": (), "unfused_adamw_row": False,
                                              "compiled_rows": False}), work=work / "larger_batch")
        detail["larger_batch"] = larger
    rows = {r["name"]: r for r in detail["rows"]}
    off = rows["full, alignment off"]
    on_gpu = mode == "gpu"
    bare_goal = 0.85 if on_gpu else 0.95

    def full_step_rows(report: dict) -> list[dict]:
        """The full step (alignment off) of one run against the bare LM step and ClipCap's steps, all measured in it."""
        measured = {r["name"]: r for r in report["rows"]}
        full = measured["full, alignment off"]
        lm = report["lm"]
        geometry = (f"LM {lm['layers']}x{lm['width']}, vocab {lm['vocab_size']:,}, batch {report['batch']}, "
                    f"{report['prefix_length']}+{report['caption_tokens']} tokens")
        clipcap = report["clipcap"]
        how = (f"{clipcap['layers']}-layer transformer mapper, GPT-2 in eval mode, full logits, {clipcap['precision']}"
               f"{', compiled' if clipcap['compiled'] else ''}, {clipcap['optimizer']['name']} as ours")
        rows = [row(f"full step samples/s ({geometry}, {report['optimizer']['name']})", full["samples_per_s"], "samples/s",
                    full["x_bare"], "bare LM fwd+bwd" + (" (compiled)" if report["compiled"] else ""), f">= {bare_goal} x bare",
                    full["x_bare"] >= bare_goal)]
        for variant in clipcap["variants"]:
            name, prefix = variant["name"], variant["prefix_length"]
            ratio = measured[name]["ms"] / full["ms"]
            recipe = (prefix, variant["clip_length"], variant["lm_weight_grads"]) == (40, 40, True)
            rows.append(row(f"full step vs {name}, batch {report['batch']}", full["samples_per_s"], "samples/s", ratio,
                            f"{how}{'' if variant['lm_weight_grads'] else '; GPT-2 weights without gradients'}: "
                            f"{measured[name]['samples_per_s']:.3g} samples/s",
                            ">= 2 x ClipCap's recipe" if recipe else None, ratio >= 2.0 if recipe else None))
        return rows

    summary = full_step_rows(detail) + (full_step_rows(larger) if larger is not None else [])
    if on_gpu:
        summary.append(row("full step samples/s on one GPU", off["samples_per_s"], "samples/s", None, None,
                           "> 8,000 samples/s", off["samples_per_s"] > 8000))
    for name, measured in rows.items():
        if "ITC+SupCon" in name:
            cached = name.endswith("lm_cached")
            summary.append(row(f"{name} (time x alignment off)", measured["samples_per_s"], "samples/s", measured["x_alignment_off"],
                               "full, alignment off", "<= 1.15 with cached text" if cached else None,
                               measured["x_alignment_off"] <= 1.15 if cached else None))
    if "full, alignment off, unfused AdamW" in rows:
        unfused = rows["full, alignment off, unfused AdamW"]
        summary.append(row("full step with unfused torch AdamW (time x the default)", unfused["samples_per_s"], "samples/s",
                           unfused["x_alignment_off"], f"full, alignment off ({detail['optimizer']['name']}, the default)"))
    if "full, alignment off, compiled" in rows:
        compiled = rows["full, alignment off, compiled"]
        summary += [
            row("full step with train.compile (time x eager)", compiled["samples_per_s"], "samples/s", compiled["x_alignment_off"],
                "full, alignment off, eager"),
            row("full step with train.compile vs the bare LM step compiled", compiled["samples_per_s"], "samples/s", compiled["x_bare"],
                "bare LM fwd+bwd, compiled"),
            row("bare LM step compiled (time x eager)", rows["bare LM fwd+bwd, compiled"]["samples_per_s"], "samples/s",
                rows["bare LM fwd+bwd, compiled"]["ms"] / rows["bare LM fwd+bwd"]["ms"], "bare LM fwd+bwd, eager"),
        ]
    for piece in detail["pieces"]:
        summary.append(row(f"aligned lm_cached step: {piece['name']}", piece["ms"], "ms", piece["share_of_step"], "share of the aligned step"))
    return summary, detail


def section_mapper(mode: str, work: Path, results: dict) -> tuple[list[dict], dict]:
    from launcher.bench.mapper import QUICK_GEOMETRY, run_benchmark

    if mode == "gpu":
        return mapper_on_gpu((1, 64, 1024))
    settings = {"quick": QUICK_GEOMETRY, "full": {}}[mode]
    detail = run_benchmark((1, 64, 1024), **settings)
    summary = []
    for result in detail["results"]:
        rows = {r["mapper"]: r for r in result["rows"]}
        folded = rows["folded"]
        path = folded["path"]["path"] if folded["path"] else "?"
        summary.append(row(f"folded [{path}] eval, batch {result['batch']} (time x MoE)", folded["eval_ms"], "ms", folded["eval_x_moe"],
                           "MoE mapper, eval", "<= 1.0 x MoE", folded["eval_x_moe"] <= 1.0))
        summary.append(row(f"dense (k experts always on) eval, batch {result['batch']} (time x MoE)", rows["dense"]["eval_ms"], "ms",
                           rows["dense"]["eval_x_moe"], "MoE mapper, eval"))
        summary.append(row(f"static fold eval, batch {result['batch']} (time x MoE)", rows["static"]["eval_ms"], "ms",
                           rows["static"]["eval_x_moe"], "MoE mapper, eval"))
    first = {r["mapper"]: r for r in detail["results"][0]["rows"]}
    for name in ("dense", "folded", "static"):
        summary.append(row(f"parameters stored: {name}", first[name]["params_stored"], "parameters",
                           first[name]["params_stored"] / first["moe"]["params_stored"], "MoE mapper stored"))
    summary.append(row("static fold relative error vs the exact fold", detail["static_fold_error"], "relative error"))
    return summary, detail


def section_geodesic(mode: str, work: Path, results: dict) -> tuple[list[dict], dict]:
    from launcher.bench.geodesic import run_benchmark
    from vlpdist.config import AlignConfig

    refresh_every = AlignConfig().geodesic_refresh_every
    if mode == "gpu":
        return knn_graph_on_gpu(1 << 20, 512, 10)
    settings = {"quick": dict(nodes=2048, dim=64, backends=("torch", "faiss_flat"), repeats=1),
                "full": dict(nodes=65536, dim=512, repeats=1)}[mode]
    detail = run_benchmark(**settings, device="cpu")
    backends = [name for name in detail if name != "settings"]
    train = results.get("train")
    step_ms = None
    if train is not None and train["status"] == "ok":
        step_ms = train["detail"]["aligned_step_ms"].get("lm_cached") or next(iter(train["detail"]["aligned_step_ms"].values()))
    detail["train_step_ms"] = step_ms
    detail["refresh_every"] = refresh_every
    nodes, dim = detail["settings"]["nodes"], detail["settings"]["dim"]
    summary = []
    torch_build = detail["torch"]["build_knn_s"] if "torch" in detail else None
    for backend in backends:
        measured = detail[backend]
        summary.append(row(f"k-NN graph build {nodes:,} x {dim}, {backend} (recall@k {measured['recall_at_k']:.3f})",
                           measured["build_knn_s"], "s", measured["build_knn_s"] / torch_build if torch_build else None,
                           "torch brute force build"))
        if step_ms is None:
            summary.append(row(f"geodesic refresh, {backend} (share of the step: no train section in this run)",
                               measured["refresh_s"], "s"))
            continue
        interval_s = refresh_every * step_ms / 1e3
        share = measured["refresh_s"] / interval_s
        summary.append(row(f"geodesic refresh, {backend}, share of {refresh_every} aligned steps", measured["refresh_s"], "s", share,
                           f"{refresh_every} x the aligned lm_cached training step", "<= 0.05", share <= 0.05))
        summary.append(row(f"per-step geodesic distances (exact, limited), {backend}, share of a step", measured["exact_step_s"], "s",
                           measured["exact_step_s"] / (step_ms / 1e3), "the aligned lm_cached training step"))
    return summary, detail


def mapper_on_gpu(batches: tuple[int, ...], repeats: int = 20) -> tuple[list[dict], dict]:
    """Folded vs MoE mapper eval latency on the GPU (GPT-2 width, E=8, k=2, P=10), the folded mapper on the path its rule picks."""
    import statistics

    import torch

    from launcher.bench.mapper import unit_norm_clip
    from vlpdist.config import ModelConfig
    from vlpdist.models.fold import fold_mapper
    from vlpdist.models.mapper import build_mapper

    if not torch.cuda.is_available():
        raise SectionUnavailable("--gpu needs a CUDA device")
    torch.manual_seed(0)
    cfg = ModelConfig(prefix_length=10, mapper_depth=2, num_experts=8, top_k=2)
    moe = build_mapper(cfg, 512, 768).cuda().eval()
    folded = fold_mapper(moe).cuda().eval()
    summary, detail = [], {"batches": {}}
    for batch in batches:
        clip_BC = unit_norm_clip(batch, 512, 3).cuda()
        times: dict[str, list[float]] = {"moe": [], "folded": []}
        with torch.no_grad():
            for mapper in (moe, folded):
                mapper(clip_BC)
            for _ in range(repeats):
                for name, mapper in (("moe", moe), ("folded", folded)):
                    torch.cuda.synchronize()
                    started = time.perf_counter()
                    mapper(clip_BC)
                    torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - started)
        median = {name: statistics.median(values) for name, values in times.items()}
        detail["batches"][batch] = median
        ratio = median["folded"] / median["moe"]
        summary.append(row(f"folded eval on the GPU, batch {batch} (time x MoE)", 1e3 * median["folded"], "ms", ratio,
                           "MoE mapper, eval, GPU", "<= 1.0 x MoE", ratio <= 1.0))
    return summary, detail


def knn_graph_on_gpu(nodes: int, dim: int, k: int) -> tuple[list[dict], dict]:
    """The k-NN graph of `nodes` x `dim` unit vectors by torch brute force on the GPU (fp32, then with TF32 matmuls)."""
    import torch

    from launcher.bench.geodesic import make_embeddings
    from vlpdist.geodesic.knn import build_knn, similarity_block_rows

    if not torch.cuda.is_available():
        raise SectionUnavailable("--gpu needs a CUDA device")
    nodes_ND = make_embeddings(nodes, dim, 0, "cuda")
    build_knn(nodes_ND[:4096], k)  # warm-up
    seconds = {}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.cuda.synchronize()
        started = time.perf_counter()
        build_knn(nodes_ND, k)
        torch.cuda.synchronize()
        seconds["tf32" if tf32 else "fp32"] = time.perf_counter() - started
    torch.backends.cuda.matmul.allow_tf32 = False
    block = similarity_block_rows(nodes, nodes_ND.device)
    summary = [row(f"k-NN graph {nodes:,} x {dim}, k {k}, torch brute force on the GPU, {name}, blocks of {block:,} rows", value, "s",
                   goal="<= 3 s", met=value <= 3.0) for name, value in seconds.items()]
    return summary, {"nodes": nodes, "dim": dim, "k": k, "block_rows": block, "seconds": seconds}


RUNNERS = {"ingest": section_ingest, "clip": section_clip, "train": section_train, "mapper": section_mapper,
           "geodesic": section_geodesic}


# -- report --------------------------------------------------------------------------------------

def _format(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "parameters":
        return f"{value:,.0f}"
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"


def section_lines(name: str, section: dict) -> list[str]:
    """The summary table's rows of one section (one row saying why where it did not run)."""
    if section["status"] != "ok":
        return [f"| {name} | {section['status']}: {section['reason']} | - | - | - | - | - |"]
    lines = []
    for item in section["summary"]:
        met = {True: "yes", False: "**no**", None: "-"}[item["met"]]
        ratio = f"{item['ratio']:.3g}" if item["ratio"] is not None else "-"
        lines.append(f"| {name} | {item['figure']} | {_format(item['value'], item['unit'])} {item['unit']} | {ratio} | "
                     f"{item['vs'] or '-'} | {item['goal'] or '-'} | {met} |")
    return lines


TABLE_HEAD = ["| section | figure | value | ratio | vs | goal | met |", "|---|---|---|---|---|---|---|"]


def render_markdown(report: dict) -> str:
    machine = report["machine"]
    checked = "checked against its schema" if report["schema_checked"] else "NOT schema-checked (jsonschema is not installed)"
    lines = [
        f"Benchmark (`{report['command']}`, mode {report['mode']}) on {machine['cpu']}, {machine['cores']} cores "
        f"({machine['torch_threads']} torch threads), GPU {machine['gpu'] or 'none'}; torch {machine['torch']}, "
        f"deepspeed {machine['deepspeed']}, transformers {machine['transformers']}, faiss {machine['faiss']}. "
        f"Every figure is measured in this run; ratios are of two figures measured side by side; bench.json {checked}.",
        "",
        *TABLE_HEAD,
    ]
    for name, section in report["sections"].items():
        lines += section_lines(name, section)
    return "\n".join(lines) + "\n"


def schema_validator():
    """jsonschema's validator of `BENCH_SCHEMA`, the schema itself checked first; None where jsonschema
    is not installed (a bare GPU machine): the report is then written unchecked and says so."""
    try:
        import jsonschema
    except ImportError:
        return None
    validator_class = jsonschema.validators.validator_for(BENCH_SCHEMA)
    validator_class.check_schema(BENCH_SCHEMA)
    return validator_class(BENCH_SCHEMA)


def prepare_out(out: Path) -> Path:
    """The one place the output folder is made ready: claimed as the benchmark's (created and marked
    when missing or empty, reused on a rerun, refused when it holds anything else), and the
    per-section files of the run that last wrote its bench.json removed (that report names them), so
    that only this run's sections lie there. Returns the per-section folder."""
    from vlpdist.atomic import claim_output_dir, remove_stale_staging

    claim_output_dir(out, "launcher.bench", "--out")
    sections_dir = out / "sections"
    sections_dir.mkdir(parents=True, exist_ok=True)
    try:
        previous = json.loads((out / "bench.json").read_text()).get("sections", {})
    except (OSError, ValueError, AttributeError):
        previous = {}
    for name in previous:
        if name in SECTIONS:
            for suffix in (".json", ".md"):
                (sections_dir / f"{name}{suffix}").unlink(missing_ok=True)
    for path in (out / "bench.json", out / "bench.md"):
        remove_stale_staging(path)
    return sections_dir


class ReportWriter:
    """Writes each section's JSON and markdown rows under --out as soon as it finishes, then bench.json
    and bench.md with every section so far (each file replaced atomically), so a run killed later keeps
    every finished section on disk. Each written report is checked against the schema first when
    jsonschema is there; a failed check is kept (the figures are still written) and fails the run at the end."""

    def __init__(self, out: Path, validator):
        self.out, self.validator = out, validator
        self.sections_dir = prepare_out(out)
        self.header: dict = {}  # mode, command, machine: set by the caller before the first section
        self.sections: dict[str, dict] = {}
        self.schema_errors: list[str] = []
        self.started = time.perf_counter()

    def _report(self, sections: dict) -> dict:
        report = {**self.header, "schema_checked": self.validator is not None, "seconds": time.perf_counter() - self.started,
                  "sections": sections}
        report = json.loads(json.dumps(report, default=float))  # numpy scalars and the like as plain numbers
        if self.validator is not None:
            for error in self.validator.iter_errors(report):
                message = f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
                if message not in self.schema_errors:  # a section's error shows in its own report and in bench.json
                    self.schema_errors.append(message)
        return report

    def add(self, name: str, result: dict) -> None:
        from vlpdist.atomic import atomic_write_json, atomic_write_text

        self.sections[name] = result
        atomic_write_json(self.sections_dir / f"{name}.json", self._report({name: result}))
        atomic_write_text(self.sections_dir / f"{name}.md", "\n".join([*TABLE_HEAD, *section_lines(name, result)]) + "\n")
        self.report = self._report(self.sections)
        atomic_write_json(self.out / "bench.json", self.report)
        atomic_write_text(self.out / "bench.md", render_markdown(self.report))


def run_suite(mode: str, sections: list[str], work: Path, writer: ReportWriter) -> dict:
    results: dict[str, dict] = {}
    for name in SECTIONS:
        if name not in sections:
            continue
        print(f"[bench] {name} ({mode}) ...", flush=True)
        started = time.perf_counter()
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            summary, detail = RUNNERS[name](mode, folder, results)
            results[name] = {"status": "ok", "reason": None, "summary": summary, "detail": detail}
        except SectionUnavailable as err:
            results[name] = {"status": "unavailable", "reason": str(err), "summary": [], "detail": None}
        except Exception as err:  # noqa: BLE001 - one failing section must not lose the others' numbers
            traceback.print_exc()
            results[name] = {"status": "error", "reason": f"{type(err).__name__}: {err}", "summary": [], "detail": None}
        results[name]["seconds"] = time.perf_counter() - started
        writer.add(name, results[name])
        print(f"[bench] {name}: {results[name]['status']} in {results[name]['seconds']:.0f} s; wrote "
              f"{writer.sections_dir / name}.json and .md, {writer.out / 'bench.json'}", flush=True)
    return results


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher.bench", description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="every size shrunk: the whole suite in under two minutes")
    sizes.add_argument("--gpu", action="store_true", help="one GPU's sizes: bf16, compiled frozen LM and mapper")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.md")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--only: unknown sections {unknown}; choose from {list(SECTIONS)}" if unknown else "--only: no section named")
    mode = "quick" if args.quick else "gpu" if args.gpu else "full"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    validator = schema_validator()  # before any section: a broken schema costs no measurement
    if validator is None:
        print("[bench] jsonschema is not installed: bench.json and the section files are written without the schema check",
              flush=True)
    writer = ReportWriter(Path(args.out), validator)  # claims --out before anything is measured
    writer.header = {"mode": mode, "command": "python -m launcher.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "machine": describe_machine()}
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        results = run_suite(mode, sections, work, writer)
    else:
        with tempfile.TemporaryDirectory(prefix="vlpdist-bench-") as folder:
            results = run_suite(mode, sections, Path(folder), writer)
    print(render_markdown(writer.report), flush=True)
    print(f"[bench] {len(results)} sections in {writer.report['seconds']:.0f} s; wrote {writer.out / 'bench.json'} and "
          f"{writer.out / 'bench.md'}", flush=True)
    for error in writer.schema_errors:
        print(f"[bench] schema check failed: {error}", file=sys.stderr)
    return 1 if writer.schema_errors or any(section["status"] == "error" for section in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
