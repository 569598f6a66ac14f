"""The ablation runner: which alignment parts help? `python -m launcher.ablate [--variants ...] [--seeds 0,1] [--out DIR] [key=value ...]`.

Trains every variant with every seed through the real launcher (`deepspeed launcher/train.py`,
2 CPU ranks by default), reads each run's held-out evaluation, and writes `ablation.json` and
`ablation.md` into `--out`: caption BLEU-4 / CIDEr / ROUGE-L, VQA accuracy (overall and per answer
type) when the held-out samples hold questions, retrieval R@1/5/10 in both directions (visual prefix
vs text), training samples/s, each as mean ± standard deviation over the seeds, with the overrides
that made the row and the config.yaml each run resolved. A variant/seed whose eval.json exists is
not run again, so a stopped ablation resumes. `--out` must be new, empty or an earlier ablation's
(its marker): a folder holding anything else is refused.

`--variants` takes variant names and groups: `default` (the alignment, mapper and static-fold rows),
`questions` (caption, captions_only, paraphrase_captions, paraphrase_questions: questions + captions
vs captions only, and paraphrase augmentation of captions or of questions) and `all`.

On the demo config (the default) it first makes the demo's data when `<root>/features` holds no
shards (download, process and the demo LM, as `python -m launcher.demo` does). The paraphrase rows
train on shards processed with `process.paraphraser=synthetic`: the features are processed once
with it (in place; every other row trains on the same shards and ignores their paraphrases). The
captions_only row trains on a copy of the training shards without their question-only samples
(`<out>/captions_only_features`, made once; the held-out shards unchanged).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import statistics
import subprocess
from pathlib import Path

from launcher.paths import DEFAULT_CONFIG, TRAIN_SCRIPT
from vlpdist.atomic import atomic_write_json, atomic_write_text, claim_output_dir, refuse_foreign_output
from vlpdist.config import Config, load_config
from vlpdist.errors import UserError, exit_on_user_error

ITC = ["align.itc_weight=0.1"]
SUPCON = ["align.supcon_weight=0.1"]
GEODESIC = ["align.geodesic_refresh_every=10", "align.geodesic_k=10"]
# The shards must carry paraphrases (written at processing); the process override records which ones.
PARAPHRASE = ["process.paraphraser=synthetic", "train.paraphrase_prob=0.5"]
# Each variant's overrides on top of the config; "caption" switches the alignment terms off, whatever the config says.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "caption": ("caption loss only", ["align.itc_weight=0", "align.supcon_weight=0"]),
    "itc": ("+ ITC", ITC + ["align.supcon_weight=0"]),
    "itc_supcon": ("+ ITC + SupCon", ITC + SUPCON),
    "geodesic_hard": ("+ ITC + SupCon, geodesic hard negatives", ITC + SUPCON + GEODESIC + ["align.negatives=geodesic_hard"]),
    "geodesic_false_negatives": ("+ ITC + SupCon, geodesic false-negative removal",
                                 ITC + SUPCON + GEODESIC + ["align.false_negatives=geodesic"]),
    "geodesic_metric": ("+ ITC + SupCon, geodesic logit metric", ITC + SUPCON + GEODESIC + ["align.metric=geodesic"]),
    "bottleneck": ("+ ITC + SupCon, 4 bottleneck tokens", ITC + SUPCON + ["model.bottleneck_tokens=4"]),
    "mapper_mlp": ("ClipCap MLP mapper, caption loss only", ["align.itc_weight=0", "align.supcon_weight=0", "model.mapper=mlp", "train.ep_size=1"]),
    "mapper_transformer": ("ClipCap transformer mapper, caption loss only",
                           ["align.itc_weight=0", "align.supcon_weight=0", "model.mapper=transformer", "model.transformer_heads=4", "train.ep_size=1"]),
    # The question rows, each against "caption" (which trains questions beside captions at the config's
    # train.question_fraction): no questions at all, or a paraphrase in place of the caption / the question.
    "captions_only": ("captions only: no questions trained, caption loss only",
                      ["align.itc_weight=0", "align.supcon_weight=0", "train.question_fraction=0"]),
    "paraphrase_captions": ("+ paraphrase (captions), caption loss only",
                            ["align.itc_weight=0", "align.supcon_weight=0", *PARAPHRASE, "train.paraphrase_targets=captions"]),
    "paraphrase_questions": ("+ paraphrase (questions), caption loss only",
                             ["align.itc_weight=0", "align.supcon_weight=0", *PARAPHRASE, "train.paraphrase_targets=questions"]),
}
# Not a training variant: the caption-only MoE runs folded statically (one dense layer per block from
# the gates' mean over this many training samples), scored on the held-out shard like their exact fold.
STATIC_FOLD = "static_fold"
STATIC_FOLD_CALIBRATION = 1024
# Trains on `<out>/CAPTIONS_ONLY_FEATURES`: the training shards without question-only samples (which
# train as questions whatever train.question_fraction says: they have nothing else to train).
CAPTIONS_ONLY = "captions_only"
CAPTIONS_ONLY_FEATURES = "captions_only_features"
GROUPS = {
    "default": [name for name in VARIANTS if name not in (CAPTIONS_ONLY, "paraphrase_captions", "paraphrase_questions")] + [STATIC_FOLD],
    "questions": ["caption", CAPTIONS_ONLY, "paraphrase_captions", "paraphrase_questions"],
    "all": [*VARIANTS, STATIC_FOLD],
}
CAPTION_METRICS = ("BLEU-4", "CIDEr", "ROUGE-L")
VQA = "VQA"
"""The figure name of a run's overall VQA accuracy (x100); per answer type it is `VQA <type>`."""
WRITER = "launcher.ablate"
RETRIEVAL_METRICS = tuple(f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: each run gets its own rendezvous port (runs follow each other quickly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_variant(config_path: Path, overrides: list[str], run_dir: Path, ranks: int) -> dict:
    """Train one variant/seed into `run_dir` (unless its eval.json exists) and return its figures."""
    from vlpdist.parallel.launch import deepspeed_train_command

    eval_path = run_dir / "eval.json"
    overrides = [*overrides, f"train.output_dir={run_dir}", "train.resume=true"]
    if eval_path.is_file():
        check_reusable(config_path, overrides, run_dir)
    else:
        command = deepspeed_train_command(TRAIN_SCRIPT, config_path, overrides, ranks, free_port())
        log = run_dir.parent / f"{run_dir.name}.log"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            returncode = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
        if returncode != 0 or not eval_path.is_file():
            raise UserError(f"ablation run {run_dir} failed (exit {returncode}); see {log}")
    evaluation = json.loads(eval_path.read_text())
    figures = {name: evaluation["metrics"][name] for name in CAPTION_METRICS}
    figures.update({name: evaluation["retrieval"][name] for name in RETRIEVAL_METRICS})
    figures["caption_loss"] = evaluation["caption_loss"]
    figures["samples_per_s"] = evaluation["training"]["samples_per_s"]
    if evaluation.get("vqa"):  # the held-out samples held questions: the run answered them
        accuracy = evaluation["vqa"]["accuracy"]
        figures[VQA] = accuracy["accuracy"]
        figures.update({f"{VQA} {kind}": scores["accuracy"] for kind, scores in accuracy["per_answer_type"].items()})
    return figures


def check_reusable(config_path: Path, overrides: list[str], run_dir: Path) -> None:
    """A finished run is reused only when the config it resolved is the one this variant/seed asks for now: a
    table must never show figures made under other overrides. Paths compare resolved (the run's against the
    folder it was started from, ours against the working directory)."""
    from vlpdist.config import PATH_FIELDS, PATH_OR_NAME_FIELDS, load_run_config, resolve_config_paths

    wanted_config = resolve_config_paths(load_config(config_path, overrides), os.getcwd(), PATH_FIELDS + PATH_OR_NAME_FIELDS)
    wanted = flatten(dataclasses.asdict(wanted_config))
    saved = flatten(dataclasses.asdict(load_run_config(run_dir / "config.yaml")))
    differing = sorted(key for key in wanted.keys() | saved.keys() if key != "base_dir" and wanted.get(key) != saved.get(key))
    if differing:
        shown = ", ".join(f"{key} ({saved.get(key)!r} there, {wanted.get(key)!r} now)" for key in differing[:3])
        raise UserError(f"{run_dir} holds a finished run made with other settings: {shown}"
                        f"{' and more' if len(differing) > 3 else ''}; remove that folder or choose another --out")


def flatten(values: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_static_fold(config_path: Path, common: list[str], caption_run: Path, out_dir: Path) -> dict:
    """Export the caption-only run's MoE exactly and statically folded, evaluate both on the held-out
    shards with `launcher.evaluate`; the static fold's figures, with the exact fold's beside them."""
    import sys

    from launcher.evaluate import main as evaluate_main
    from launcher.export import main as export_main
    from vlpdist.data.feature_shards import list_feature_shards, split_heldout

    config = load_config(config_path, common)
    features = Path(config.train.features_dir) if config.train.features_dir else Path(config.root) / "features"
    _, heldout = split_heldout(list_feature_shards(features), config.train.heldout_shards)
    consolidated = caption_run / "export" / "model_fp32.safetensors"
    if not consolidated.is_file():
        raise UserError(f"{STATIC_FOLD} folds {consolidated}, which the caption run did not write (train.export_at_end=false?)")
    figures = {}
    for name, extra in (("exact", []), ("static", ["--static-fold", str(STATIC_FOLD_CALIBRATION)])):
        export_dir, eval_path = out_dir / f"export_{name}", out_dir / f"eval_{name}.json"
        if not eval_path.is_file():
            report = export_main(["--checkpoint", str(consolidated), "--out", str(export_dir),
                                  *extra, *common])
            atomic_write_json(out_dir / f"export_{name}.json", report)
            # The samples and caption length of the caption run's own end-of-training evaluation: the
            # exact fold then scores as that run did, and the static fold beside it.
            evaluate_main(["--model", str(export_dir), "--features", *map(str, heldout), "--no-spice",
                           "--max-samples", str(config.train.eval_max_samples),
                           "--max-new-tokens", str(config.train.eval_max_new_tokens), "--out", str(eval_path)])
        evaluation = json.loads(eval_path.read_text())
        report = json.loads((out_dir / f"export_{name}.json").read_text())
        figures[name] = {**{metric: evaluation["captioning"]["greedy"][metric] for metric in CAPTION_METRICS},
                         **{metric: evaluation["retrieval"][metric] for metric in RETRIEVAL_METRICS},
                         "caption_loss": evaluation["caption_loss"], "fold_relative_error": report["fold_relative_error"],
                         "mapper_params": report["folded_params"]}
    sys.stdout.flush()
    static = dict(figures["static"])
    static["samples_per_s"] = json.loads((caption_run / "eval.json").read_text())["training"]["samples_per_s"]
    static["exact_fold"] = figures["exact"]
    return static


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(name: str, description: str, overrides: list[str], runs: dict[int, dict], run_dirs: dict[int, Path]) -> dict:
    # The figures every seed has (a seed's VQA per answer type exists when its held-out questions had that type).
    metrics = {metric: mean_and_spread([runs[seed][metric] for seed in sorted(runs)])
               for metric, value in next(iter(runs.values())).items()
               if isinstance(value, (int, float)) and all(metric in figures for figures in runs.values())}
    return {
        "variant": name, "description": description, "overrides": overrides, "seeds": sorted(runs),
        "per_seed": {str(seed): runs[seed] for seed in sorted(runs)},
        "mean": {metric: value[0] for metric, value in metrics.items()},
        "sd": {metric: value[1] for metric, value in metrics.items()},
        "configs": {str(seed): str(run_dirs[seed] / "config.yaml") for seed in sorted(runs)},
    }


def verdict(row: dict, baseline: dict | None, metric: str) -> str:
    """↑ / ↓ when the difference from the baseline row exceeds twice the combined spread, else ≈."""
    if baseline is None or row is baseline or metric not in row["mean"] or metric not in baseline["mean"]:
        return ""
    difference = row["mean"][metric] - baseline["mean"][metric]
    noise = 2 * math.hypot(row["sd"][metric], baseline["sd"][metric])
    return "≈" if abs(difference) <= noise else ("↑" if difference > 0 else "↓")


def vqa_columns(rows: list[dict]) -> list[str]:
    """`VQA`, then `VQA <answer type>` in first-seen order, when any row's runs answered questions."""
    names = [name for row in rows for name in row["mean"] if name == VQA or name.startswith(f"{VQA} ")]
    return sorted(dict.fromkeys(names), key=lambda name: name != VQA)


def cell(row: dict, name: str) -> str:
    if name not in row["mean"]:
        return "-"  # e.g. the static fold is scored on captions only
    digits = 0 if name == "samples_per_s" else 1 if name.startswith(VQA) else 3  # VQA accuracy is in percent
    return f"{row['mean'][name]:.{digits}f} ± {row['sd'][name]:.{digits}f}"


def markdown_table(rows: list[dict], title: str, notes: list[str] = ()) -> str:
    baseline = next((row for row in rows if row["variant"] == "caption"), None)
    vqa = vqa_columns(rows)
    columns = [*CAPTION_METRICS, *vqa, *RETRIEVAL_METRICS, "samples_per_s"]
    verdicts = ["CIDEr", *vqa[:1]]
    short = {name: name.replace("image_to_text_", "i→t ").replace("text_to_image_", "t→i ") for name in columns}
    lines = [f"# {title}", "",
             "Mean ± standard deviation over the seeds. ↑/↓: the mean differs from caption-only by more than twice "
             "the combined spread (≈: within the noise)."
             + (" VQA: accuracy (%) on the held-out questions by the VQAv2 rules, overall and per answer type." if vqa else ""),
             *[line for note in notes for line in ("", note)], "",
             "| variant | seeds | " + " | ".join(short[name] for name in columns) + " | "
             + " | ".join(f"{name} vs caption" for name in verdicts) + " | overrides |",
             "|---" * (len(columns) + len(verdicts) + 3) + "|"]
    for row in rows:
        lines.append(f"| {row['variant']} ({row['description']}) | {','.join(map(str, row['seeds']))} | "
                     + " | ".join(cell(row, name) for name in columns) + " | "
                     + " | ".join(verdict(row, baseline, name) for name in verdicts) + f" | `{' '.join(row['overrides']) or '-'}` |")
    return "\n".join(lines) + "\n"


def features_dir_of(config: Config) -> Path:
    return Path(config.train.features_dir) if config.train.features_dir else Path(config.root) / "features"


def processing_overrides(names: list[str]) -> list[str]:
    """The `process.*` overrides of the chosen variants (the paraphrase rows' paraphraser): the data
    every row trains on is processed with them once. Two variants asking for other values are refused."""
    chosen: dict[str, str] = {}
    for name in names:
        for override in VARIANTS.get(name, ("", []))[1]:
            key, value = override.split("=", 1)
            if key.startswith("process.") and chosen.setdefault(key, value) != value:
                raise UserError(f"the chosen variants process the data with {key}={chosen[key]} and {key}={value}: run them apart")
    return [f"{key}={value}" for key, value in chosen.items()]


def prepare_demo_data(config_path: Path, overrides: list[str], processing: list[str] = ()) -> None:
    """The demo's features and LM, if the features folder holds no shards yet; with `processing`
    (e.g. the paraphraser), the features processed with it: shards made otherwise are processed again
    (in place: the processing stage's skip key holds its paraphrase settings)."""
    from data_ingest.process.run import run_process
    from launcher.demo import main as demo_main
    from launcher.demo import stage_demo_lm

    config = load_config(config_path, [*overrides, *processing])
    if not list((Path(config.root) / "features").glob("*.tar")):
        demo_main(["--config", str(config_path), "--stages", "download,process", *overrides, *processing])
    elif processing and unprocessed_shards(Path(config.root) / "features", config):
        run_process(config)
    stage_demo_lm(config)


def unprocessed_shards(features: Path, config: Config) -> list[str]:
    """The shards in `features` not made with `config.process`'s paraphrase settings."""
    from data_ingest.process.run import shard_is_done
    from vlpdist.data.feature_shards import list_feature_shards

    return [shard.name for shard in list_feature_shards(features) if not shard_is_done(features, shard.stem, config.process)]


def check_processed_for(name: str, config: Config) -> None:
    """A paraphrase row on shards without its paraphrases would train the originals and look like caption: refused."""
    features = features_dir_of(config)
    if missing := unprocessed_shards(features, config):
        raise UserError(f"variant {name} trains paraphrases, but {len(missing)} shards in {features} (e.g. {missing[0]}) were not "
                        f"processed with process.paraphraser={config.process.paraphraser} (num_paraphrases "
                        f"{config.process.num_paraphrases}); run without --no-prepare, or process them so")


def write_captions_only_features(config: Config, target: Path) -> Path:
    """`target`: the training shards of `config`'s features without their question-only samples (the
    rest byte for byte, stats counting what is left), the held-out shards unchanged, the label
    vocabulary and provenance beside them. Made once: reused while the source shards' stats and
    sizes are those it was made from."""
    import shutil

    import webdataset as wds

    from vlpdist.data.feature_format import LABEL_VOCABULARY_FILE, decode_feature_sample
    from vlpdist.data.feature_shards import STATS_SUFFIX, list_feature_shards, split_heldout
    from vlpdist.data.provenance import PROVENANCE_FILE

    source = features_dir_of(config)
    shards = list_feature_shards(source)
    training, heldout = split_heldout(shards, config.train.heldout_shards)
    stats_of = {shard.name: shard.with_name(shard.stem + STATS_SUFFIX) for shard in shards}
    made_from = {"source": str(source.resolve()), "heldout": [shard.name for shard in heldout],
                 "shards": {shard.name: [shard.stat().st_size, stats_of[shard.name].read_text() if stats_of[shard.name].is_file() else None]
                            for shard in shards}}
    manifest = target / "captions_only.json"
    if manifest.is_file() and json.loads(manifest.read_text())["made_from"] == made_from:
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    left_out = {}
    for shard in training:
        kept = left_out[shard.name] = 0
        with wds.TarWriter(str(partial / shard.name)) as writer:
            for raw in wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()):
                if not decode_feature_sample(raw).captions:
                    left_out[shard.name] += 1
                    continue
                writer.write({key: value for key, value in raw.items() if key == "__key__" or not key.startswith("__")})
                kept += 1
        if stats_of[shard.name].is_file():  # else training counts the tar, as it would the source's
            stats = json.loads(stats_of[shard.name].read_text())
            atomic_write_json(partial / stats_of[shard.name].name, {**stats, "written": kept, "question_only_left_out": left_out[shard.name]})
    for path in [*heldout, *(stats_of[shard.name] for shard in heldout), source / LABEL_VOCABULARY_FILE, source / PROVENANCE_FILE]:
        if path.is_file():
            shutil.copy2(path, partial / path.name)
    atomic_write_json(partial / "captions_only.json", {"made_from": made_from, "question_only_left_out": left_out})
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    print(f"[ablate] {CAPTIONS_ONLY}: {sum(left_out.values())} question-only training samples left out -> {target}", flush=True)
    return target


def table_notes(rows: list[dict], config_path: Path, overrides: list[str]) -> list[str]:
    """How to read the question rows against caption."""
    if not {CAPTIONS_ONLY, "paraphrase_captions", "paraphrase_questions"} & {row["variant"] for row in rows}:
        return []
    caption = load_config(config_path, [*overrides, *VARIANTS["caption"][1]]).train
    return [f"Questions: caption trains questions + captions (train.question_fraction={caption.question_fraction}), "
            f"{CAPTIONS_ONLY} captions only (question_fraction 0, question-only samples left out of training); the "
            f"paraphrase rows are caption with train.paraphrase_prob on captions or on questions only. Caption metrics "
            f"and VQA are scored on the same held-out samples, never against paraphrases."]


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.ablate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    groups = "; ".join(f"{group} = {','.join(members)}" for group, members in GROUPS.items())
    parser.add_argument("--variants", default="default",
                        help=f"comma-separated variants and groups: {','.join(VARIANTS)},{STATIC_FOLD} ({STATIC_FOLD} needs caption); "
                             f"groups {groups}. "
                             "The question and paraphrase rows: --variants questions (the paraphrase rows process the "
                             "features once with process.paraphraser=synthetic)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds (at least two to see the noise)")
    parser.add_argument("--out", type=Path, default=None, help="default: <root>/ablation")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--no-prepare", action="store_true", help="do not make the demo data when the features folder is empty")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every variant")
    args = parser.parse_args(argv)
    asked = [name.strip() for name in args.variants.split(",") if name.strip()]
    names = list(dict.fromkeys(member for name in asked for member in GROUPS.get(name, [name])))
    unknown = [name for name in names if name not in VARIANTS and name != STATIC_FOLD]
    if unknown:
        raise UserError(f"unknown ablation variants {unknown}; choose from {[*VARIANTS, STATIC_FOLD]} or the groups {list(GROUPS)}")
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    config = load_config(args.config, args.overrides)
    out = args.out or Path(config.root) / "ablation"
    refuse_foreign_output(out, WRITER, "--out")  # before the demo data is made: a refusal costs nothing
    processing = processing_overrides(names)
    if not args.no_prepare:
        prepare_demo_data(args.config, args.overrides, processing)
    # Claimed after the demo claimed its root: the default --out lies inside it.
    claim_output_dir(out, WRITER, "--out")
    rows = []
    if STATIC_FOLD in names and "caption" not in names:
        raise UserError(f"variant {STATIC_FOLD} folds the caption variant's runs: add caption to --variants")
    for name in names:
        if name == STATIC_FOLD:
            runs = {seed: run_static_fold(args.config, [*args.overrides, *VARIANTS["caption"][1], f"train.seed={seed}"],
                                          out / "caption" / f"seed{seed}", out / STATIC_FOLD / f"seed{seed}") for seed in seeds}
            description = f"caption-only MoE, static fold (gates' mean over {STATIC_FOLD_CALIBRATION} training samples)"
            rows.append(summarise(name, description, [f"launcher.export --static-fold {STATIC_FOLD_CALIBRATION}"], runs,
                                  {seed: out / "caption" / f"seed{seed}" for seed in seeds}))
        else:
            description, variant_overrides = VARIANTS[name]
            if name == CAPTIONS_ONLY:
                features = write_captions_only_features(config, out / CAPTIONS_ONLY_FEATURES)
                variant_overrides = [*variant_overrides, f"train.features_dir={features}"]
            variant_config = load_config(args.config, [*args.overrides, *variant_overrides])  # a bad override fails here, before training
            if any(override.startswith("process.") for override in variant_overrides):
                check_processed_for(name, variant_config)
            runs, run_dirs = {}, {}
            for seed in seeds:
                run_dirs[seed] = out / name / f"seed{seed}"
                print(f"[ablate] {name} seed {seed} -> {run_dirs[seed]}", flush=True)
                runs[seed] = run_variant(args.config, [*args.overrides, *variant_overrides, f"train.seed={seed}"], run_dirs[seed], args.ranks)
            rows.append(summarise(name, description, variant_overrides, runs, run_dirs))
        result = {"config": str(args.config), "common_overrides": list(args.overrides), "rows": rows}
        atomic_write_json(out / "ablation.json", result)
        atomic_write_text(out / "ablation.md", markdown_table(rows, f"Ablation on {args.config.name}", table_notes(rows, args.config, args.overrides)))
    print((out / "ablation.md").read_text())
    return result


if __name__ == "__main__":
    main()
