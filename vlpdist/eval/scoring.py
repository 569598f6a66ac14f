"""Scoring one evaluation, shared by the end of training (`vlpdist.train.evaluate.score_captions`)
and `python -m launcher.evaluate`, so both report the same numbers from the same code
(`score_heldout`): caption metrics of every captioner (greedy, beam, the most-frequent training
caption) against the held-out references, which are the web (or COCO) captions and never BLIP's
synthetic ones; those, when the filter kept some, are scored apart ("vs synthetic captions"),
since they come from a generator of part of the model's own training text. Retrieval R@K
(`vlpdist.eval.retrieval`'s protocol), and the tables: the published ClipCap row only where it is
comparable at all, a COCO-format run over the whole Karpathy test split.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch

from vlpdist.eval.captioning import caption_metrics, optional_metric_problems
from vlpdist.eval.retrieval import retrieval_protocol, retrieval_recall

CAPTION_COLUMNS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
RETRIEVAL_KS = (1, 5, 10)
BASELINE_SYSTEM = "most-frequent caption"
# Mokady et al. 2021 (ClipCap, transformer mapper, frozen GPT-2), COCO Karpathy test, x100 as published.
PUBLISHED_CLIPCAP_COCO = {"BLEU-4": 33.53, "CIDEr": 113.08}
PUBLISHED_CLIPCAP_LABEL = "ClipCap (published)"
PUBLISHED_CLIPCAP_DIFFERS = ("ClipCap (published) differs in model (its transformer mapper, GPT-2) and data (trained "
                             "on COCO Karpathy train): a reference point, not a run of this model")
KARPATHY_TEST_IMAGES = 5000


def published_clipcap_applies(coco_format: bool, images: int) -> bool:
    """The published row is set beside a run only when it scored the same test: COCO-format
    references over the full Karpathy test split's size."""
    return coco_format and images == KARPATHY_TEST_IMAGES


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
    of the same ids, all against `references`. METEOR runs in the process's one scorer
    (`start_meteor`): each start costs about 10 s of Java loading tables."""
    run_meteor, run_spice, skipped = resolve_optional_metrics(meteor, spice)
    scores = {name: caption_metrics(dict(references), dict(predictions), meteor=run_meteor, spice=run_spice)
              for name, predictions in systems.items()}
    return {"captioning": scores, "skipped_metrics": skipped}


def score_retrieval(embeddings: Mapping[Hashable, tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, float], str]:
    """(R@1/5/10 both directions, the protocol in words) over {id: (visual_E, text_RE)}, each image
    with the embeddings of all its R references."""
    pairs = [(visual, text.reshape(-1, visual.shape[-1])) for visual, text in embeddings.values()]
    owner_M = torch.cat([torch.full((len(text),), index) for index, (_, text) in enumerate(pairs)])
    text_ME = torch.cat([text for _, text in pairs])
    recall = retrieval_recall(torch.stack([visual for visual, _ in pairs]), text_ME, RETRIEVAL_KS, owner_M)
    return recall, retrieval_protocol(len(pairs), len(text_ME))


def captioning_systems(heldout: Mapping, ids, baseline_caption: str | None) -> dict[str, dict]:
    """The captions of `ids` to score, by the row name the tables show: greedy, beam, the baseline."""
    systems = {"greedy": {key: heldout["predictions"][key] for key in ids}}
    if heldout.get("beam_predictions"):
        systems[f"beam {heldout['num_beams']}"] = {key: heldout["beam_predictions"][key] for key in ids}
    if baseline_caption is not None:
        systems[BASELINE_SYSTEM] = {key: baseline_caption for key in ids}
    return systems


def score_heldout(heldout: Mapping, baseline_caption: str | None, *, meteor: bool | None = None,
                  spice: bool | None = None) -> dict:
    """Everything both evaluations report: `captioning` {system: scores} against the references
    (the ids with at least one, `reference_samples` of them), `synthetic_captioning` against BLIP's
    synthetic captions (None when there are none; `synthetic_samples`), `skipped_metrics`, `retrieval`
    and `retrieval_protocol` (`heldout_retrieval`). `baseline_caption` (the most frequent training
    caption) scores as its own row; None leaves the row out. Held-out samples whose filter kept only
    synthetic captions have no reference: `captioning` is then {} rather than a score against BLIP."""
    references = {key: refs for key, refs in heldout["references"].items() if refs}
    synthetic = {key: refs for key, refs in heldout.get("synthetic_references", {}).items() if refs}
    against: dict[str, dict] = {}
    _, _, skipped = resolve_optional_metrics(meteor, spice)
    for name, refs in (("references", references), ("synthetic", synthetic)):
        if refs:
            scored = score_caption_systems(refs, captioning_systems(heldout, refs, baseline_caption), meteor=meteor, spice=spice)
            against[name], skipped = scored["captioning"], scored["skipped_metrics"]
    return {
        "captioning": against.get("references", {}),
        "reference_samples": len(references),
        "synthetic_captioning": against.get("synthetic"),
        "synthetic_samples": len(synthetic),
        "skipped_metrics": skipped,
        **heldout_retrieval(heldout),
    }


def heldout_retrieval(heldout: Mapping) -> dict:
    """{"retrieval": R@K, "retrieval_protocol": in words} (`score_retrieval`) over the held-out ids
    with at least one reference; both None without any."""
    with_references = [key for key, refs in heldout["references"].items() if refs]
    if not with_references:
        return {"retrieval": None, "retrieval_protocol": None}
    recall, protocol = score_retrieval({key: heldout["embeddings"][key] for key in with_references})
    return {"retrieval": recall, "retrieval_protocol": protocol}


def format_caption_table(captioning: Mapping[str, Mapping[str, float]], samples: int, skipped: Mapping[str, str],
                         published: bool = False, against: str = "the references") -> str:
    """Caption metrics x100 (the scale of the published COCO tables), one row per system; with
    `published` (see `published_clipcap_applies`) the published ClipCap row and what differs in it."""
    columns = [c for c in CAPTION_COLUMNS if any(c in scores for scores in captioning.values())]
    name_width = max([len(name) for name in captioning] + [len(PUBLISHED_CLIPCAP_LABEL)])
    lines = [f"captioning vs {against}: {samples} images, scores x100 as in the published tables",
             f"{'':{name_width}} " + " ".join(f"{c:>7}" for c in columns)]
    for name, scores in captioning.items():
        lines.append(f"{name:{name_width}} " + " ".join(f"{100 * scores[c]:7.2f}" if c in scores else f"{'-':>7}" for c in columns))
    if published:
        lines.append(f"{PUBLISHED_CLIPCAP_LABEL:{name_width}} "
                     + " ".join(f"{PUBLISHED_CLIPCAP_COCO[c]:7.2f}" if c in PUBLISHED_CLIPCAP_COCO else f"{'-':>7}" for c in columns))
        lines.append(PUBLISHED_CLIPCAP_DIFFERS)
    lines.extend(f"{metric} skipped: {why}" for metric, why in skipped.items())
    return "\n".join(lines)


def format_retrieval_table(retrieval: Mapping[str, float], protocol: str, source: str) -> str:
    """R@K in percent, image->text and text->image, under the protocol `score_retrieval` states."""
    lines = [f"retrieval: {protocol}; {source}",
             f"{'':14} " + " ".join(f"{f'R@{k}':>6}" for k in RETRIEVAL_KS)]
    for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        lines.append(f"{label:14} " + " ".join(f"{100 * retrieval[f'{direction}_R@{k}']:6.1f}" for k in RETRIEVAL_KS))
    return "\n".join(lines)
