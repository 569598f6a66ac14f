"""Scoring one evaluation, shared by the end of training (`vlpdist.train.evaluate.score_captions`)
and `python -m launcher.evaluate`, so both report the same numbers from the same code: caption
metrics of every captioner (greedy, beam, the trivial baselines) against one set of references,
retrieval R@K, and the tables a user sets beside published numbers.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch

from vlpdist.eval.captioning import caption_metrics, optional_metric_problems
from vlpdist.eval.retrieval import retrieval_recall

CAPTION_COLUMNS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
RETRIEVAL_KS = (1, 5, 10)
# Mokady et al. 2021 (ClipCap, transformer mapper, frozen GPT-2), COCO Karpathy test, x100 as published.
PUBLISHED_CLIPCAP_COCO = {"BLEU-4": 33.53, "CIDEr": 113.08}


def resolve_optional_metrics(meteor: bool | None, spice: bool | None) -> tuple[bool, bool, dict[str, str]]:
    """(run METEOR, run SPICE, {metric: why skipped}); None means "when it can run here"."""
    problems = optional_metric_problems()
    wanted = {"METEOR": meteor, "SPICE": spice}
    skipped = {}
    for metric, want in wanted.items():
        if want is False:
            skipped[metric] = "not requested"
        elif problems[metric] is not None:
            skipped[metric] = problems[metric]
    return "METEOR" not in skipped, "SPICE" not in skipped, skipped


def score_caption_systems(
    references: Mapping[Hashable, list[str]], systems: Mapping[str, Mapping[Hashable, str]], *,
    meteor: bool | None = None, spice: bool | None = None,
) -> dict:
    """{"captioning": {system: scores}, "skipped_metrics": {metric: why}} for each system's captions
    of the same ids, all against `references`."""
    run_meteor, run_spice, skipped = resolve_optional_metrics(meteor, spice)
    scores = {name: caption_metrics(dict(references), dict(predictions), meteor=run_meteor, spice=run_spice)
              for name, predictions in systems.items()}
    return {"captioning": scores, "skipped_metrics": skipped}


def score_retrieval(embeddings: Mapping[Hashable, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """R@1/5/10 both directions over the (visual_E, text_E) pairs, sample i's image with sample i's caption."""
    pairs = list(embeddings.values())
    return retrieval_recall(torch.stack([visual for visual, _ in pairs]), torch.stack([text for _, text in pairs]), RETRIEVAL_KS)


def format_caption_table(captioning: Mapping[str, Mapping[str, float]], samples: int, skipped: Mapping[str, str],
                         published: bool = True) -> str:
    """Caption metrics x100 (the scale of the published COCO tables), one row per system."""
    columns = [c for c in CAPTION_COLUMNS if any(c in scores for scores in captioning.values())]
    name_width = max([len(name) for name in captioning] + [len("ClipCap, COCO Karpathy test (published)")])
    lines = [f"captioning: {samples} images, scores x100 as in the published tables",
             f"{'':{name_width}} " + " ".join(f"{c:>7}" for c in columns)]
    for name, scores in captioning.items():
        lines.append(f"{name:{name_width}} " + " ".join(f"{100 * scores[c]:7.2f}" if c in scores else f"{'-':>7}" for c in columns))
    if published:
        lines.append(f"{'ClipCap, COCO Karpathy test (published)':{name_width}} "
                     + " ".join(f"{PUBLISHED_CLIPCAP_COCO[c]:7.2f}" if c in PUBLISHED_CLIPCAP_COCO else f"{'-':>7}" for c in columns))
    lines.extend(f"{metric} skipped: {why}" for metric, why in skipped.items())
    return "\n".join(lines)


def format_retrieval_table(retrieval: Mapping[str, float], samples: int, source: str) -> str:
    """R@K in percent, image->text and text->image."""
    lines = [f"retrieval: {samples} image-caption pairs, {source}",
             f"{'':14} " + " ".join(f"{f'R@{k}':>6}" for k in RETRIEVAL_KS)]
    for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        lines.append(f"{label:14} " + " ".join(f"{100 * retrieval[f'{direction}_R@{k}']:6.1f}" for k in RETRIEVAL_KS))
    return "\n".join(lines)
