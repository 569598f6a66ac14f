"""Evaluate a trained model: `python -m launcher.evaluate --model <export or checkpoint> (--features <dir or shards> | --references <coco json> --images <dir>) [--beams N] [--max-samples M] [--vqa] [--out eval.json]`.

`--model` is an export folder (`python -m launcher.export`), the consolidated fp32 folder training
writes (`<run>/export`), or a DeepSpeed checkpoint folder (`<run>/checkpoints`, its newest usable
step, or `<run>/checkpoints/step_N`); a checkpoint is consolidated and its mapper folded in this
process, without ranks or a GPU.

The samples are either feature shards (CLIP features computed at ingestion; a folder means every
`NNNNN.tar` in it, so give a held-out folder or the held-out shards themselves) or images with
references in the COCO caption format, `{"images": [{"id", "file_name"}], "annotations":
[{"image_id", "caption"}]}` (Karpathy-split files are of this form); the images then go through
the CLIP the model's features came from. `--vqa` also answers the questions feature shards carry
(greedy, with and without the image) and scores VQA accuracy by the official VQAv2 rules, overall and
per answer type, beside the most common training answer per question type (with `--train-features`):
the code and numbers of the end of training (`vlpdist.train.evaluate.score_questions`).
Caption scores (the code the end of training scores with,
`vlpdist.eval.scoring`): BLEU-1..4, ROUGE-L, CIDEr with pycocoevalcap, METEOR when Java is
present, SPICE when pycocoevalcap's Stanford jars are (otherwise it says why not), for the greedy
captions, the beam-search ones (`--beams` > 1) and, with `--train-features` (the model's training
shards), the most frequent training caption, the same baseline the end of training scores. The
references of feature shards are the web captions the filter kept; BLIP's synthetic captions, when
the filter kept some, are scored in a table of their own. The caption loss (with an image's first
kept caption as the target); retrieval R@1/5/10 both ways over all references of every image
(`vlpdist.eval.retrieval`: the COCO 5-caption protocol, ties ranked pessimistically), in the
model's aligned embeddings. The tables print x100, the scale of the published COCO numbers; the
published ClipCap row only for COCO-format references over the full Karpathy test size (5,000
images). `--out` gets everything as JSON, atomically. `--report <file>.html` also writes the run
report's held-out and retrieval sections for this evaluation (`vlpdist.report.page`): greedy and
beam captions beside the references and the images, the scores against the baselines, R@K and a few
images' top-5 retrieved captions; the images come from the `--images` files, or for feature shards
from the raw shards ingestion left beside them (`<root>/raw` of `<root>/features`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from vlpdist.errors import UserError, exit_on_user_error

DEFAULT_BATCH = 32
WRITER = "launcher.evaluate"  # names --out's file as this command's own, which a rerun may replace


def load_model_for_evaluation(path: Path, clip_dir: Path):
    """(captioner with a folded mapper, CLIP identity, the folder the identity's paths are relative to,
    the LM to score "without the image" with, in words what was loaded)."""
    from vlpdist.models.export_bundle import EXPORT_FORMAT, MANIFEST_FILE

    if not path.exists():
        raise UserError(f"--model {path} does not exist")
    manifest_path = path / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("format") == EXPORT_FORMAT:
        from vlpdist.models.captioner import load_exported_captioner, load_language_model

        captioner = load_exported_captioner(path)
        lm = manifest["lm"]
        # A tuned LM has learnt to expect a prefix: the fair "without the image" LM is the one it started from.
        baseline_lm = captioner.lm if not lm["tuned"] else load_language_model(lm["trained_from"]["name"], revision=lm["trained_from"].get("revision")).eval()
        return captioner, manifest["clip"], path, baseline_lm, f"export {path}"
    return load_trained_state(path, clip_dir)


def model_provenance(path: Path) -> dict | None:
    """The features provenance of the model at `path`: an export's own, else the run folder's (`vlpdist.data.provenance`)."""
    from vlpdist.data.provenance import find_run_provenance
    from vlpdist.models.export_bundle import EXPORT_FORMAT, MANIFEST_FILE

    manifest_path = path / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("format") == EXPORT_FORMAT:
        return manifest.get("features_provenance")
    return find_run_provenance(path)


def load_trained_state(path: Path, clip_dir: Path):
    """`load_model_for_evaluation` for a consolidated fp32 folder or a DeepSpeed checkpoint folder."""
    from data_ingest.process.clip_model import SHIPPED_CLIP_CONFIG_DIR
    from launcher.export import find_run_config, mapper_state, read_consolidated_state
    from vlpdist.config import load_run_config
    from vlpdist.models.captioner import build_captioner, load_language_model
    from vlpdist.models.clip_identity import record_clip_identity
    from vlpdist.models.fold import fold_mapper
    from vlpdist.parallel.consolidate import EXPORT_WEIGHTS

    if (path / EXPORT_WEIGHTS).is_file():
        state = read_consolidated_state(path / EXPORT_WEIGHTS)
        config = load_run_config(path / "config.yaml" if (path / "config.yaml").is_file() else find_run_config(path / EXPORT_WEIGHTS))
        described = f"consolidated weights {path / EXPORT_WEIGHTS}"
    elif path.is_dir():
        from vlpdist.parallel.consolidate import MODULE_STATES, consolidate_checkpoint

        consolidated = consolidate_checkpoint(path)
        state, config = consolidated.state, load_run_config(find_run_config(consolidated.folder / MODULE_STATES))
        described = f"checkpoint {consolidated.folder} (step {consolidated.step}), consolidated in this process"
    else:
        raise UserError(f"--model {path} is neither an export, a consolidated fp32 folder nor a DeepSpeed checkpoint folder")
    if config.model.mapper != "moe":
        raise UserError(f"model.mapper is {config.model.mapper!r}: launcher.evaluate folds the MoE mapper")
    clip_dim = mapper_state(state)["input_proj.weight"].shape[1]
    captioner = build_captioner(config.model, clip_dim, consolidated_state=state, align=config.align).eval()
    # What the export would run: the dense fold of the MoE mapper, exact to float tolerance.
    captioner.mapper = fold_mapper(captioner.mapper.float().eval())
    baseline_lm = captioner.lm if config.model.freeze_lm else load_language_model(config.model.lm_name).eval()
    identity = record_clip_identity(config.process.clip_model, config.process.clip_pretrained, clip_dir,
                                    config_dirs=[SHIPPED_CLIP_CONFIG_DIR])
    return captioner, identity, clip_dir, baseline_lm, f"{described}, mapper folded in memory"


def feature_shards(arguments: list[str], flag: str = "--features") -> list[Path]:
    """Shards from folders (their NNNNN.tar) and .tar files, in the order given."""
    from vlpdist.data.feature_shards import list_feature_shards

    shards: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            shards.extend(list_feature_shards(path))
        elif path.is_file() and path.suffix == ".tar":
            shards.append(path)
        else:
            raise UserError(f"{flag} {argument}: not a feature folder or a .tar shard")
    return shards


def evaluate_features(captioner, baseline_lm, shards: list[Path], max_samples: int | None, beams: int,
                      batch_size: int, max_new_tokens: int, device: str) -> dict | None:
    """The held-out evaluation training runs (one process), on these shards; None when they hold no caption."""
    import torch

    from vlpdist.data.feature_shards import iterate_heldout, shard_sample_counts
    from vlpdist.train.evaluate import evaluate_heldout, merge_shares

    counts, _ = shard_sample_counts(shards)
    num_samples = min(sum(counts), max_samples or sum(counts))
    if num_samples == 0:
        raise UserError("the feature shards hold no samples")
    if next(iterate_heldout(shards, 1, num_samples), None) is None:
        return None  # every sample is a question without a caption (VQAv2): `evaluate_feature_questions` has them
    share = evaluate_heldout(captioner, shards, batch_size, num_samples, max_new_tokens, torch.device(device),
                             baseline_lm, num_beams=beams)
    return merge_shares([share])


def evaluate_feature_questions(captioner, shards: list[Path], max_samples: int | None, batch_size: int, device: str,
                               train_shards: list[Path] | None) -> dict | None:
    """`--vqa`: the held-out question evaluation the end of training runs (`vlpdist.train.evaluate`:
    greedy answers with and without the image, VQA accuracy by the official rules, the most common
    training answer per question type when `train_shards` are given), in one process, on the first
    `max_samples` questions of these shards; None when they hold no question."""
    import torch

    from vlpdist.data.feature_shards import iterate_heldout_questions
    from vlpdist.train.evaluate import answer_questions, merge_question_shares, most_common_training_answers, score_questions

    batches = list(iterate_heldout_questions(shards, batch_size, max_samples or sys.maxsize))
    if not batches:
        return None
    share = answer_questions(captioner, batches, len(batches), captioner.mapper.input_proj.in_features, torch.device(device))
    baseline = most_common_training_answers(train_shards) if train_shards else None
    return score_questions(merge_question_shares([share]), baseline, captioner.question_template)


def print_vqa_table(vqa: dict) -> None:
    """`--vqa`'s rows: VQA accuracy x100 overall and per answer type, beside the baselines."""
    from vlpdist.eval.vqa import format_vqa_rows

    print(f"\nVQA accuracy (official VQAv2 rules, x100) of {vqa['questions']} questions, template {vqa['question_template']!r}")
    for measure, ours, against in format_vqa_rows(vqa):
        print(f"  {measure}: {ours}   vs {against}")
    if vqa["most_common_answer"] is None:
        print("  most common answer per question type: not scored; --train-features (the model's training shards) gives it")


def read_coco_references(path: Path) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """([(image id, file name)] of the images with at least one caption, in file order, {image id: captions});
    a one-line `UserError` for a file not in the COCO caption format."""
    if not path.is_file():
        raise UserError(f"--references {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--references {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise UserError(f"--references {path} is not a COCO caption file: it needs the lists 'images' and 'annotations'")
    files: dict[str, str] = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise UserError(f"--references {path}: images[{index}] needs an 'id' and a 'file_name'")
        files[str(image["id"])] = image["file_name"]
    references: dict[str, list[str]] = {}
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or "image_id" not in annotation or not isinstance(annotation.get("caption"), str):
            raise UserError(f"--references {path}: annotations[{index}] needs an 'image_id' and a 'caption'")
        image_id = str(annotation["image_id"])
        if image_id not in files:
            raise UserError(f"--references {path}: annotations[{index}] names image_id {annotation['image_id']!r}, which is not in 'images'")
        references.setdefault(image_id, []).append(annotation["caption"])
    images = [(image_id, name) for image_id, name in files.items() if image_id in references]
    if not images:
        raise UserError(f"--references {path} has no image with a caption")
    return images, references


def evaluate_images(captioner, baseline_lm, clip_model, prepare, clip_tokenizer, images: list[tuple[str, Path]],
                    references: dict[str, list[str]], beams: int, batch_size: int, max_new_tokens: int, device: str) -> dict:
    """Caption, score the loss of and embed every readable image (its first reference as the target);
    the same result shape as `evaluate_features`, plus the images left out and why. `clip_tokenizer`
    (for alignment heads on CLIP text features) is None when the model needs no CLIP text embedding."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from data_ingest.process.clip_model import encode_images, encode_texts
    from launcher.caption import FetchLimits, load_in_batches
    from vlpdist.train.evaluate import merge_shares, reference_text_embeddings, retrieval_visual_embeddings

    clip_dim = captioner.mapper.input_proj.in_features
    source_to_id = {str(file): image_id for image_id, file in images}
    share = {"loss_sum": 0.0, "text_only_sum": 0.0, "tokens": 0, "references": {}, "predictions": {},
             "beam_predictions": {}, "num_beams": beams, "embeddings": {}}
    skipped: dict[str, str] = {}
    with torch.no_grad(), tqdm(total=len(images), desc="evaluate", unit="image") as progress:
        files = [("file", str(file)) for _, file in images]
        for batch in load_in_batches(files, batch_size, 8, FetchLimits(read_timeout_s=10.0, deadline_s=60.0), prepare):
            progress.update(len(batch))
            skipped.update({item.source: f"{item.status}: {item.error}" for item in batch if item.status != "ok"})
            good = [item for item in batch if item.status == "ok"]
            if not good:
                continue
            keys = [source_to_id[item.source] for item in good]
            images_B3HW = torch.stack([item.pixels for item in good])
            clip_BC = torch.from_numpy(encode_images(clip_model, images_B3HW, device)).to(device)
            if clip_BC.shape[1] != clip_dim:
                raise UserError(f"the model's CLIP embeds into {clip_BC.shape[1]} dims but its mapper reads {clip_dim}: "
                                "it names the wrong CLIP (the process.clip_* that made the features)")
            targets = [references[key][0] for key in keys]
            ids_BT, mask_BT = (t.to(device) for t in captioner.tokenize(targets))
            text_feature = None
            if clip_tokenizer is not None:
                text_feature = torch.from_numpy(encode_texts(clip_model, clip_tokenizer, targets, device)).to(device)
            out = captioner(clip_BC, ids_BT, mask_BT, text_feature)
            count = int(mask_BT.sum())
            share["loss_sum"] += float(out["cap"]) * count
            share["text_only_sum"] += float(captioner.text_only_caption_loss(ids_BT, mask_BT, baseline_lm)) * count
            share["tokens"] += count
            all_references = [references[key] for key in keys]
            reference_clip_texts = None
            if clip_tokenizer is not None:  # one CLIP text pass over the batch's references, split back per image
                flat = encode_texts(clip_model, clip_tokenizer, [c for refs in all_references for c in refs], device)
                reference_clip_texts = np.split(flat, np.cumsum([len(refs) for refs in all_references])[:-1])
            texts = reference_text_embeddings(captioner, all_references, reference_clip_texts, device)
            share["embeddings"].update(zip(keys, zip(retrieval_visual_embeddings(captioner, out).float().cpu(), texts)))
            share["predictions"].update(zip(keys, captioner.generate_captions(clip_BC, max_new_tokens)))
            if beams > 1:
                share["beam_predictions"].update(zip(keys, captioner.generate_captions(clip_BC, max_new_tokens, beams)))
            share["references"].update((key, references[key]) for key in keys)
    if not share["predictions"]:
        raise UserError(f"none of the {len(images)} images could be read (e.g. {next(iter(skipped.items()))})")
    return {**merge_shares([share]), "skipped_images": skipped}


def report_thumbnails(keys: list[str], shards: list[Path] | None = None,
                      image_files: dict[str, Path] | None = None) -> dict[str, str]:
    """{key: inline thumbnail} for the report: from the image files the references name, or for feature
    shards from the raw shards of the same data root (feature keys are img2dataset's keys); a key whose
    image is not found has none (the page says so in its place)."""
    from data_ingest.download import RAW_DIRNAME
    from vlpdist.report.samples import thumbnail_uri, thumbnails_for_keys

    found: dict[str, str] = {}
    if image_files is not None:
        for key in keys:
            path = image_files.get(key)
            uri = thumbnail_uri(path.read_bytes()) if path is not None and path.is_file() else None
            if uri is not None:
                found[key] = uri
        return found
    for raw in dict.fromkeys(shard.resolve().parent.parent / RAW_DIRNAME for shard in shards or []):
        wanted = [key for key in keys if key not in found]
        if not wanted:
            break
        found.update(thumbnails_for_keys(raw, wanted))
    return found


def print_tables(result: dict, published: bool) -> None:
    from vlpdist.eval.scoring import format_caption_table, format_retrieval_table

    print(f"\nmodel: {result['model']}")
    loss = f"caption loss {result['caption_loss']:.4f}"
    if result["lm_without_image_loss"] is not None:
        loss += f" vs the LM without the image {result['lm_without_image_loss']:.4f}"
    print(f"{loss} (first kept caption as the target)\n")
    if result["captioning"]:
        print(format_caption_table(result["captioning"], result["reference_samples"], result["skipped_metrics"], published))
    else:
        print(f"captioning: none of the {result['samples']} samples has a web caption the filter kept, nothing to score against")
    if result["synthetic_captioning"]:
        print()
        print(format_caption_table(result["synthetic_captioning"], result["synthetic_samples"], {},
                                   against="synthetic captions (BLIP, kept by the filter; not references)"))
    if result["most_frequent_caption"] is None:
        print("most-frequent caption: not scored; --train-features (the model's training shards) gives it")
    if result["retrieval"] is not None:
        print()
        print(format_retrieval_table(result["retrieval"], result["retrieval_protocol"], result["retrieval_embeddings"]))
    if result.get("skipped_images"):
        reasons = Counter(why.split(":", 1)[0] for why in result["skipped_images"].values())
        print(f"\n{len(result['skipped_images'])} images left out ({dict(reasons)}); they are listed in the output file")


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="export folder, consolidated fp32 folder, or DeepSpeed checkpoint folder")
    parser.add_argument("--features", nargs="+", default=None, help="feature folders or .tar shards")
    parser.add_argument("--references", default=None, help="COCO-format captions JSON (with --images)")
    parser.add_argument("--images", default=None, help="folder the references' file_name entries are relative to")
    parser.add_argument("--train-features", nargs="+", default=None,
                        help="the model's training feature folders or shards, for the most-frequent-caption baseline")
    parser.add_argument("--beams", type=int, default=1, help="also score beam search of this width (> 1)")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many images")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's max_caption_tokens")
    parser.add_argument("--no-spice", action="store_true", help="skip SPICE even when its jars are present (it takes minutes)")
    parser.add_argument("--out", default="eval.json", help="JSON file for every number, the captions and the references")
    parser.add_argument("--vqa", action="store_true",
                        help="also answer the feature shards' questions and score VQA accuracy (official VQAv2 rules)")
    parser.add_argument("--report", default=None, help="also write the report's held-out and retrieval sections to this HTML file")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    if (args.features is None) == (args.references is None):
        raise UserError("give either --features or --references with --images")
    if args.references is not None and args.images is None:
        raise UserError("--references needs --images, the folder its file names are in")
    if args.vqa and args.features is None:
        raise UserError("--vqa scores the questions feature shards carry: give --features")
    if args.report is not None:
        from vlpdist.report.page import refuse_foreign_report

        refuse_foreign_report(Path(args.report), "--report")  # before the evaluation: a refusal costs nothing
    for flag, value in (("--beams", args.beams), ("--batch-size", args.batch_size), ("--max-samples", args.max_samples)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, not {value}")
    from vlpdist.atomic import refuse_foreign_output_file

    refuse_foreign_output_file(Path(args.out), WRITER, "--out")  # before the work; checked again when written
    if args.references is not None:
        images, references = read_coco_references(Path(args.references))
        if not Path(args.images).is_dir():
            raise UserError(f"--images {args.images} is not a folder")
        images = images[: args.max_samples]
    else:
        shards = feature_shards(args.features)
    train_shards = feature_shards(args.train_features, "--train-features") if args.train_features else None

    import torch

    from vlpdist.atomic import write_output_json
    from vlpdist.eval.scoring import published_clipcap_applies, score_heldout
    from vlpdist.report.retrieval import retrieval_examples
    from vlpdist.train.evaluate import most_frequent_training_caption, retrieval_source

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="vlpdist-evaluate-") as scratch:
        captioner, clip_identity, clip_base, baseline_lm, described = load_model_for_evaluation(Path(args.model), Path(scratch))
        captioner.to(device)
        baseline_lm.to(device)
        if captioner.bottleneck_only and args.beams != 1:
            raise UserError("this model decodes through bottleneck tokens, which is greedy only: use --beams 1")
        max_new_tokens = args.max_new_tokens or captioner.max_caption_tokens
        if args.features is not None:
            heldout = evaluate_features(captioner, baseline_lm, shards, args.max_samples, args.beams, args.batch_size,
                                        max_new_tokens, device)
            vqa = evaluate_feature_questions(captioner, shards, args.max_samples, args.batch_size, device,
                                             train_shards) if args.vqa else None
            if args.vqa and vqa is None:
                raise UserError("--vqa: the feature shards hold no question")
            if heldout is None and vqa is None:
                raise UserError("the feature shards hold questions only, no caption: --vqa scores them")
        else:
            from vlpdist.data.image_preparation import inference_preparation
            from vlpdist.models.clip_identity import build_clip_image_encoder

            clip_model, clip_transform = build_clip_image_encoder(clip_identity, clip_base, device)
            prepare = inference_preparation(model_provenance(Path(args.model)), clip_identity, clip_transform, f"--model {args.model}")
            print(prepare.describe(), flush=True)
            clip_tokenizer = None
            if captioner.text_target == "clip":
                import open_clip

                # build_clip_image_encoder registered the identity's model config, so custom names resolve too.
                clip_tokenizer = open_clip.get_tokenizer(clip_identity["model_name"])
            heldout = evaluate_images(captioner, baseline_lm, clip_model, prepare, clip_tokenizer,
                                      [(image_id, Path(args.images) / name) for image_id, name in images], references,
                                      args.beams, args.batch_size, max_new_tokens, device)
            vqa = None
    if heldout is None:  # --vqa on shards of questions only (VQAv2): nothing to caption, the questions scored
        result = {"model": described, "vqa": vqa}
        write_output_json(Path(args.out), result, WRITER, "--out")
        print(f"\nmodel: {described}\ncaptioning: the feature shards hold questions only, no caption to score")
        print_vqa_table(vqa)
        print(f"\nwritten to {args.out}", flush=True)
        if args.report is not None:
            print(f"report not written to {args.report}: its sections show captions, and these shards hold none", flush=True)
        return result
    # The trivial captioner: one constant caption, the most frequent of the training captions (as at the end of training).
    baseline_caption = most_frequent_training_caption(train_shards) if train_shards else None
    scored = score_heldout(heldout, baseline_caption, spice=False if args.no_spice else None)
    result = {
        "model": described,
        "samples": heldout["samples"],
        "caption_loss": heldout["caption_loss"],
        "lm_without_image_loss": heldout["lm_without_image_loss"],
        **scored,
        "most_frequent_caption": baseline_caption,
        "retrieval_embeddings": retrieval_source(captioner),
        "skipped_images": heldout.get("skipped_images", {}),
        "captions": [{"id": key, "references": refs, "synthetic": heldout["synthetic_references"].get(key, []),
                      "greedy": heldout["predictions"][key],
                      **({"beam": heldout["beam_predictions"][key]} if heldout["beam_predictions"] else {})}
                     for key, refs in heldout["references"].items()],
        # A few images' top-5 retrieved references, for the report's retrieval section (as training's eval.json).
        "retrieval_examples": retrieval_examples(heldout["embeddings"], heldout["references"]),
        **({"vqa": vqa} if vqa is not None else {}),
    }
    write_output_json(Path(args.out), result, WRITER, "--out")
    print_tables(result, published_clipcap_applies(args.references is not None, scored["reference_samples"]))
    if vqa is not None:
        print_vqa_table(vqa)
    print(f"\nwritten to {args.out}", flush=True)
    if args.report is not None:
        from vlpdist.report.page import build_evaluation_report, evaluation_image_keys, write_report

        keys = evaluation_image_keys(result)
        images_for_keys = (report_thumbnails(keys, image_files={key: Path(args.images) / name for key, name in images})
                           if args.references is not None else report_thumbnails(keys, shards=shards))
        write_report(build_evaluation_report(result, images_for_keys, f"vlpdist evaluation report: {described}"),
                     Path(args.report), "--report")
        print(f"report written to {args.report}", flush=True)
    return result


if __name__ == "__main__":
    main()
