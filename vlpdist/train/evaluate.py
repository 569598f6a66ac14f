"""Held-out evaluation after training: caption loss vs the LM without the image, and caption metrics.

Every rank evaluates the same held-out samples (the expert-parallel all-to-all needs all ranks in
every forward), so the numbers do not depend on the world size or `ep_size`; rank 0 writes them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlpdist.data.feature_shards import iterate_heldout


@torch.no_grad()
def evaluate_heldout(
    captioner, heldout_shards: list[Path], batch_size: int, max_samples: int, max_new_tokens: int, device: torch.device,
    baseline_lm: torch.nn.Module | None = None,
) -> dict:
    """Collective (every rank, same samples): token-weighted caption loss with the image, greedy
    captions with their references keyed by sample key, and, where `baseline_lm` is given, the
    caption loss of that LM alone without the image (None elsewhere: it has no collectives, so
    only the rank that reports it computes it)."""
    was_training = captioner.training
    captioner.eval()
    loss_sum = text_only_sum = 0.0
    tokens = 0
    references: dict[str, list[str]] = {}
    predictions: dict[str, str] = {}
    for batch in iterate_heldout(heldout_shards, batch_size, max_samples):
        clip_BC = batch["clip"].to(device)
        ids_BT, mask_BT = (t.to(device) for t in captioner.tokenize(batch["caption"]))
        # The LM averages over the caption tokens it predicts (all of them, EOS included).
        count = int(mask_BT.sum())
        loss_sum += float(captioner(clip_BC, ids_BT, mask_BT)["cap"]) * count
        if baseline_lm is not None:
            text_only_sum += float(captioner.text_only_caption_loss(ids_BT, mask_BT, baseline_lm)) * count
        tokens += count
        predictions.update(zip(batch["keys"], captioner.generate_captions(clip_BC, max_new_tokens)))
        references.update(zip(batch["keys"], batch["captions"]))
    captioner.train(was_training)
    return {
        "samples": len(predictions),
        "caption_loss": loss_sum / tokens,
        "lm_without_image_loss": text_only_sum / tokens if baseline_lm is not None else None,
        "references": references,
        "predictions": predictions,
    }


def score_captions(heldout: dict, train_captions: list[str]) -> dict:
    """BLEU/ROUGE-L/CIDEr of the greedy captions and of the most-frequent-training-caption baseline
    (pycocoevalcap's PTB tokenizer runs Java: call on one rank)."""
    from vlpdist.eval.captioning import caption_metrics, most_frequent_caption_baseline

    references, predictions = heldout["references"], heldout["predictions"]
    baseline = most_frequent_caption_baseline(train_captions, references)
    keys = list(references)[:8]
    return {
        "samples": heldout["samples"],
        "caption_loss": heldout["caption_loss"],
        "lm_without_image_loss": heldout["lm_without_image_loss"],
        "metrics": caption_metrics(references, predictions),
        "most_frequent_caption": next(iter(baseline.values())),
        "most_frequent_caption_metrics": caption_metrics(references, baseline),
        "examples": [{"key": key, "references": references[key], "generated": predictions[key]} for key in keys],
    }
