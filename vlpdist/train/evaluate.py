"""Held-out evaluation after training: caption loss vs the LM without the image, caption metrics
against the web captions the filter kept (BLIP's synthetic ones apart, `vlpdist.eval.scoring`),
and retrieval R@K between the visual prefix and every reference (the alignment heads' embeddings
when the model has them, else the mean-pooled prefix against the LM's mean-pooled caption states).

The held-out samples are shared over the ranks (sample i to rank i % world_size); every rank runs
the same number of batches, a rank with a shorter share repeating a batch whose results it drops,
because the expert-parallel all-to-all needs every rank in every mapper forward. Rank 0 gathers
the shares and scores them, so the numbers do not depend on the world size or `ep_size`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from vlpdist.data.feature_shards import iterate_heldout

# Training samples the most-frequent-caption baseline counts captions over (the first ones in file
# order): a fixed number, so the end of training and `launcher.evaluate` pick the same caption.
BASELINE_TRAINING_SAMPLES = 10_000


@torch.no_grad()
def evaluate_heldout(
    captioner, heldout_shards: list[Path], batch_size: int, num_samples: int, max_new_tokens: int, device: torch.device,
    baseline_lm: torch.nn.Module | None = None, rank: int = 0, world_size: int = 1, num_beams: int = 1,
) -> dict:
    """Collective (every rank, `num_samples` held-out samples in all): this rank's share of the
    token-weighted caption loss sums with the image and, where `baseline_lm` is given, of that LM
    alone without the image; greedy captions (and beam-search ones for `num_beams` > 1) with their
    references (web captions) and synthetic captions keyed by sample key, and the retrieval
    embeddings (visual_E, text_RE of the R references)."""
    was_training = captioner.training
    captioner.eval()
    loss_sum = text_only_sum = 0.0
    tokens = 0
    references: dict[str, list[str]] = {}
    synthetic_references: dict[str, list[str]] = {}
    predictions: dict[str, str] = {}
    beam_predictions: dict[str, str] = {}
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    batches = list(iterate_heldout(heldout_shards, batch_size, num_samples, rank, world_size))
    # The longest share (rank 0's) decides how many forwards every rank runs.
    rounds = math.ceil(math.ceil(num_samples / world_size) / batch_size)
    # A question-only first sample is skipped by iterate_heldout: the filler is the first captioned one.
    filler = batches[0] if batches else next(iterate_heldout(heldout_shards, batch_size, num_samples))
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
        visual_BE = retrieval_visual_embeddings(captioner, out)
        text_only = float(captioner.text_only_caption_loss(ids_BT, mask_BT, baseline_lm)) * count if baseline_lm is not None else 0.0
        generated = captioner.generate_captions(clip_BC, max_new_tokens)
        beamed = captioner.generate_captions(clip_BC, max_new_tokens, num_beams) if num_beams > 1 else []
        if not real:
            continue
        loss_sum, text_only_sum, tokens = loss_sum + loss, text_only_sum + text_only, tokens + count
        predictions.update(zip(batch["keys"], generated))
        beam_predictions.update(zip(batch["keys"], beamed))
        references.update(zip(batch["keys"], batch["references"]))
        synthetic_references.update(zip(batch["keys"], batch["synthetic_references"]))
        texts = reference_text_embeddings(captioner, batch["references"], batch["reference_clip_texts"], device)
        embeddings.update(zip(batch["keys"], zip(visual_BE.float().cpu(), texts)))
    captioner.train(was_training)
    return {
        "loss_sum": loss_sum,
        "text_only_sum": text_only_sum if baseline_lm is not None else None,
        "tokens": tokens,
        "references": references,
        "synthetic_references": synthetic_references,
        "predictions": predictions,
        "beam_predictions": beam_predictions,
        "num_beams": num_beams,
        "embeddings": embeddings,
    }


def retrieval_visual_embeddings(captioner, out: dict) -> torch.Tensor:
    """(B, E) image side of retrieval from a forward's output: the visual head's embedding, or
    without heads the mean-pooled prefix."""
    if "visual_embed" in out:
        return out["visual_embed"]
    return out["prefix"].float().mean(dim=1)


def reference_text_embeddings(captioner, references: list[list[str]], clip_texts: list, device) -> list[torch.Tensor]:
    """Per sample, (R, E) float32 CPU text embeddings of its R references for retrieval, the text side
    of what the forward compares: the text head over the captions' CLIP text embeddings (`clip_texts`,
    (R, Dt) each, used for `text_target` clip) or LM features, or without heads the LM's mean-pooled
    caption states."""
    flat = [caption for refs in references for caption in refs]
    if not flat:
        return [torch.zeros(0) for _ in references]
    ids_MT, mask_MT = (t.to(device) for t in captioner.tokenize(flat))
    heads = getattr(captioner, "heads", None)
    if heads is not None and captioner.text_target == "clip":
        features_MD = torch.from_numpy(np.concatenate([np.asarray(rows, dtype=np.float32) for rows in clip_texts])).to(device)
    else:
        features_MD = captioner.lm_text_features(ids_MT, mask_MT)
    text_ME = (heads.text_embed(features_MD) if heads is not None else features_MD).float().cpu()
    return list(text_ME.split([len(refs) for refs in references]))


def retrieval_source(captioner) -> str:
    """In words, which embeddings `retrieval_visual_embeddings` and `reference_text_embeddings` compare."""
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
    synthetic_references = {key: value for part in shares for key, value in part.get("synthetic_references", {}).items()}
    return {
        "samples": len(predictions),
        "caption_loss": sum(part["loss_sum"] for part in shares) / tokens,
        "lm_without_image_loss": sum(part["text_only_sum"] for part in shares) / tokens if with_baseline else None,
        # In held-out order (sample i came from rank i % world_size), so examples do not depend on the world size.
        "references": dict(sorted(references.items())),
        "synthetic_references": dict(sorted(synthetic_references.items())),
        "predictions": dict(sorted(predictions.items())),
        "beam_predictions": dict(sorted(beam_predictions.items())),
        "num_beams": shares[0]["num_beams"],
        "embeddings": dict(sorted(embeddings.items())),
    }


def most_frequent_training_caption(train_shards: list[Path], max_samples: int = BASELINE_TRAINING_SAMPLES) -> str:
    """The trivial captioner's one caption: the most frequent kept caption of the first
    `max_samples` training samples (`most_frequent_caption`). The end of training and
    `launcher.evaluate --train-features` both call this, so their baseline rows are the same."""
    from vlpdist.eval.captioning import most_frequent_caption

    return most_frequent_caption(caption for batch in iterate_heldout(train_shards, 256, max_samples)
                                 for captions in batch["captions"] for caption in captions)


def caption_metrics_problem() -> str | None:
    """Why no caption metric can be computed here (None when they can): all of them need
    pycocoevalcap, and its PTB tokenizer runs Java."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("pycocoevalcap") is None:
        return "pycocoevalcap is not installed"
    if shutil.which("java") is None:
        return "no Java (pycocoevalcap's PTB tokenizer runs it)"
    return None


def score_captions(heldout: dict, baseline_caption: str, *, meteor: bool | None = None, spice: bool | None = False) -> dict:
    """Caption metrics (`vlpdist.eval.scoring.score_heldout`, the code `launcher.evaluate` scores
    with) of the greedy (and beam) captions and of `baseline_caption` (`most_frequent_training_caption`)
    against the web references, apart against the synthetic captions, retrieval R@K.
    METEOR runs when Java is there; SPICE (minutes, gigabytes of Java heap) only when asked for.
    pycocoevalcap's PTB tokenizer runs Java: call on one rank."""
    from vlpdist.eval.scoring import BASELINE_SYSTEM, heldout_retrieval, score_heldout

    problem = caption_metrics_problem()
    if problem is None:
        scored = score_heldout(heldout, baseline_caption, meteor=meteor, spice=spice)
    else:  # a GPU machine carries neither pycocoevalcap (about 100 MB) nor Java; the losses still count
        print(f"caption metrics skipped: {problem}", flush=True)
        scored = {"captioning": {}, "caption_metrics_skipped": problem, **heldout_retrieval(heldout)}
    keys = list(heldout["references"])[:8]
    from vlpdist.report.retrieval import retrieval_examples

    return {
        "samples": heldout["samples"],
        "caption_loss": heldout["caption_loss"],
        "lm_without_image_loss": heldout["lm_without_image_loss"],
        "metrics": scored["captioning"].get("greedy", {}),
        "most_frequent_caption": baseline_caption,
        "most_frequent_caption_metrics": scored["captioning"].get(BASELINE_SYSTEM, {}),
        **scored,
        "examples": [{"key": key, "references": heldout["references"][key],
                      "synthetic": heldout["synthetic_references"].get(key, []),
                      "generated": heldout["predictions"][key]} for key in keys],
        # A few images' top-5 references for the run report (`launcher.report`).
        "retrieval_examples": retrieval_examples(heldout["embeddings"], heldout["references"]),
    }


def most_common_training_answers(train_shards: list[Path], max_samples: int = BASELINE_TRAINING_SAMPLES) -> dict | None:
    """The prior baseline's table (`vlpdist.eval.vqa.most_common_answers`): per question type the most
    common normalised human answer of the first `max_samples` training questions; None when the
    training shards hold no question. The end of training and `launcher.evaluate --vqa
    --train-features` both call this, so their baseline rows are the same (the questions'
    analogue of `most_frequent_training_caption`)."""
    from vlpdist.data.feature_shards import iterate_heldout_questions
    from vlpdist.eval.vqa import most_common_answers

    question_types: list[str] = []
    answers: list[list[str]] = []
    for batch in iterate_heldout_questions(train_shards, 256, max_samples):
        question_types += batch["question_type"]
        answers += batch["answers"]
    return most_common_answers(question_types, answers) if question_types else None


@torch.no_grad()
def answer_questions(captioner, batches: list[dict], rounds: int, clip_dim: int, device: torch.device) -> dict:
    """This rank's share of the held-out questions (`iterate_heldout_questions` batches) answered
    greedily with the image and by the LM without it (the prompt after BOS alone), with their human
    answers and types. Runs `rounds` mapper forwards (>= len(batches)): a rank out of batches still
    runs the mapper on a row of zeros, because the expert all-to-all needs every rank in every forward."""
    share: dict[str, list] = {"questions": [], "predictions": [], "blind": [], "answers": [], "answer_types": [],
                              "question_types": []}
    for index in range(rounds):
        batch = batches[index] if index < len(batches) else None
        clip_BC = batch["clip"].to(device) if batch is not None else torch.zeros(1, clip_dim, device=device)
        questions = batch["question"] if batch is not None else ["?"]
        answered = captioner.generate_answers(clip_BC, questions, captioner.max_answer_tokens)
        if batch is None:
            continue
        share["questions"] += questions
        share["predictions"] += answered
        share["blind"] += captioner.generate_answers(None, questions, captioner.max_answer_tokens)
        share["answers"] += batch["answers"]
        share["answer_types"] += batch["answer_type"]
        share["question_types"] += batch["question_type"]
    return share


def merge_question_shares(shares: list[dict]) -> dict:
    """`answer_questions` shares of ranks 0..W-1 merged back into held-out order (question i came
    from rank i % W), so the examples do not depend on the world size."""
    world_size = len(shares)
    total = sum(len(part["predictions"]) for part in shares)
    return {key: [shares[index % world_size][key][index // world_size] for index in range(total)] for key in shares[0]}


def score_questions(answered: dict, baseline_table: dict | None, question_template: str) -> dict:
    """VQA accuracy (`vlpdist.eval.vqa.score_vqa`, x100, overall and per answer type) of the merged
    answers (`merge_question_shares`), beside the LM without the image and, given the training
    answers' table (`most_common_training_answers`), the most common answer per question type."""
    from vlpdist.eval.vqa import answer_accuracy, baseline_answers, score_vqa

    answers, answer_types = answered["answers"], answered["answer_types"]
    prior = baseline_answers(baseline_table, answered["question_types"]) if baseline_table is not None else None
    return {
        "questions": len(answered["predictions"]),
        "accuracy": score_vqa(answered["predictions"], answers, answer_types),
        "lm_without_image": score_vqa(answered["blind"], answers, answer_types),
        "most_common_answer": score_vqa(prior, answers, answer_types) if prior is not None else None,
        "most_common_answer_table": baseline_table,
        "question_template": question_template,
        "examples": [{"question": question, "prediction": prediction, "without_image": blind, "answers": human,
                      "accuracy": answer_accuracy(prediction, human)}
                     for question, prediction, blind, human in list(zip(answered["questions"], answered["predictions"],
                                                                         answered["blind"], answers))[:8]],
    }
