"""Held-out evaluation after training: caption loss vs the LM without the image, caption metrics,
and retrieval R@K between the visual prefix and the caption (the alignment heads' embeddings when
the model has them, else the mean-pooled prefix against the LM's mean-pooled caption states).

The held-out samples are shared over the ranks (sample i to rank i % world_size); every rank runs
the same number of batches, a rank with a shorter share repeating a batch whose results it drops,
because the expert-parallel all-to-all needs every rank in every mapper forward. Rank 0 gathers
the shares and scores them, so the numbers do not depend on the world size or `ep_size`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vlpdist.data.feature_shards import iterate_heldout


@torch.no_grad()
def evaluate_heldout(
    captioner, heldout_shards: list[Path], batch_size: int, num_samples: int, max_new_tokens: int, device: torch.device,
    baseline_lm: torch.nn.Module | None = None, rank: int = 0, world_size: int = 1, num_beams: int = 1,
) -> dict:
    """Collective (every rank, `num_samples` held-out samples in all): this rank's share of the
    token-weighted caption loss sums with the image and, where `baseline_lm` is given, of that LM
    alone without the image; greedy captions (and beam-search ones for `num_beams` > 1) with their
    references keyed by sample key."""
    was_training = captioner.training
    captioner.eval()
    loss_sum = text_only_sum = 0.0
    tokens = 0
    references: dict[str, list[str]] = {}
    predictions: dict[str, str] = {}
    beam_predictions: dict[str, str] = {}
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    batches = list(iterate_heldout(heldout_shards, batch_size, num_samples, rank, world_size))
    # The longest share (rank 0's) decides how many forwards every rank runs.
    rounds = math.ceil(math.ceil(num_samples / world_size) / batch_size)
    filler = batches[0] if batches else next(iterate_heldout(heldout_shards, batch_size, 1))
    for index in range(rounds):
        real = index < len(batches)
        batch = batches[index] if real else filler
        clip_BC = batch["clip"].to(device)
        ids_BT, mask_BT = (t.to(device) for t in captioner.tokenize(batch["caption"]))
        # The LM averages over the caption tokens it predicts (all of them, EOS included).
        count = int(mask_BT.sum())
        text_feature = batch["clip_text"].to(device) if getattr(captioner, "text_target", "") == "clip" else None
        out = captioner(clip_BC, ids_BT, mask_BT, text_feature)
        loss = float(out["cap"]) * count
        visual_BE, text_BE = retrieval_embeddings(captioner, out, ids_BT, mask_BT)
        text_only = float(captioner.text_only_caption_loss(ids_BT, mask_BT, baseline_lm)) * count if baseline_lm is not None else 0.0
        generated = captioner.generate_captions(clip_BC, max_new_tokens)
        beamed = captioner.generate_captions(clip_BC, max_new_tokens, num_beams) if num_beams > 1 else []
        if not real:
            continue
        loss_sum, text_only_sum, tokens = loss_sum + loss, text_only_sum + text_only, tokens + count
        predictions.update(zip(batch["keys"], generated))
        beam_predictions.update(zip(batch["keys"], beamed))
        references.update(zip(batch["keys"], batch["captions"]))
        embeddings.update(zip(batch["keys"], zip(visual_BE.float().cpu(), text_BE.float().cpu())))
    captioner.train(was_training)
    return {
        "loss_sum": loss_sum,
        "text_only_sum": text_only_sum if baseline_lm is not None else None,
        "tokens": tokens,
        "references": references,
        "predictions": predictions,
        "beam_predictions": beam_predictions,
        "num_beams": num_beams,
        "embeddings": embeddings,
    }


def retrieval_embeddings(captioner, out: dict, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor):
    """(visual_BE, text_BE) of a held-out batch for retrieval: the alignment heads' outputs, or
    without heads the mean-pooled prefix and the LM's mean-pooled caption states (same width D)."""
    if "visual_embed" in out:
        return out["visual_embed"], out["text_embed"]
    return out["prefix"].float().mean(dim=1), captioner.lm_text_features(input_ids_BT, attention_mask_BT).float()


def retrieval_source(captioner) -> str:
    """In words, which embeddings `retrieval_embeddings` compares for this captioner."""
    if getattr(captioner, "heads", None) is not None:
        return f"alignment heads ({captioner.text_target} text features)"
    return "mean-pooled prefix vs the LM's mean-pooled caption states"


def merge_heldout(share: dict) -> dict | None:
    """Collective: every rank's `evaluate_heldout` share, merged on rank 0 (`merge_shares`); None on other ranks."""
    from vlpdist.parallel.engine import gather_to_main

    shares = gather_to_main(share)
    return None if shares is None else merge_shares(shares)


def merge_shares(shares: list[dict]) -> dict:
    """`evaluate_heldout` shares merged into the held-out losses (token-weighted over all shares),
    references, predictions and embeddings."""
    tokens = sum(part["tokens"] for part in shares)
    references = {key: value for part in shares for key, value in part["references"].items()}
    predictions = {key: value for part in shares for key, value in part["predictions"].items()}
    beam_predictions = {key: value for part in shares for key, value in part["beam_predictions"].items()}
    embeddings = {key: value for part in shares for key, value in part["embeddings"].items()}
    with_baseline = all(part["text_only_sum"] is not None for part in shares)
    return {
        "samples": len(predictions),
        "caption_loss": sum(part["loss_sum"] for part in shares) / tokens,
        "lm_without_image_loss": sum(part["text_only_sum"] for part in shares) / tokens if with_baseline else None,
        # In held-out order (sample i came from rank i % world_size), so examples do not depend on the world size.
        "references": dict(sorted(references.items())),
        "predictions": dict(sorted(predictions.items())),
        "beam_predictions": dict(sorted(beam_predictions.items())),
        "num_beams": shares[0]["num_beams"],
        "embeddings": dict(sorted(embeddings.items())),
    }


def captioning_systems(heldout: dict, baseline: dict | None) -> dict[str, dict]:
    """The captions to score, by the row name the tables show: greedy, beam, the baseline."""
    systems = {"greedy": heldout["predictions"]}
    if heldout.get("beam_predictions"):
        systems[f"beam {heldout['num_beams']}"] = heldout["beam_predictions"]
    if baseline is not None:
        systems["most-frequent caption"] = baseline
    return systems


def score_captions(heldout: dict, train_captions: list[str], *, meteor: bool | None = None, spice: bool | None = False) -> dict:
    """Caption metrics (`vlpdist.eval.scoring`, the code `launcher.evaluate` scores with) of the
    greedy (and beam) captions and of the most-frequent-training-caption baseline, retrieval R@K.
    METEOR runs when Java is there; SPICE (minutes, gigabytes of Java heap) only when asked for.
    pycocoevalcap's PTB tokenizer runs Java: call on one rank."""
    from vlpdist.eval.captioning import most_frequent_caption_baseline
    from vlpdist.eval.scoring import score_caption_systems, score_retrieval

    references = heldout["references"]
    baseline = most_frequent_caption_baseline(train_captions, references)
    systems = captioning_systems(heldout, baseline)
    scored = score_caption_systems(references, systems, meteor=meteor, spice=spice)
    keys = list(references)[:8]
    return {
        "samples": heldout["samples"],
        "caption_loss": heldout["caption_loss"],
        "lm_without_image_loss": heldout["lm_without_image_loss"],
        "metrics": scored["captioning"]["greedy"],
        "most_frequent_caption": next(iter(baseline.values())),
        "most_frequent_caption_metrics": scored["captioning"]["most-frequent caption"],
        "captioning": scored["captioning"],
        "skipped_metrics": scored["skipped_metrics"],
        "retrieval": score_retrieval(heldout["embeddings"]),
        "examples": [{"key": key, "references": references[key], "generated": heldout["predictions"][key]} for key in keys],
    }
