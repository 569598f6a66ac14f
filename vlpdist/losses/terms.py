"""Weighting the named loss terms: the model and the alignment losses return terms by name, the
training loop sums those that have a weight and logs every one."""

from __future__ import annotations

from typing import Mapping

import torch

from vlpdist.config import Config


def loss_weights(config: Config) -> dict[str, float]:
    """The weight of each trained term; a term not named here (or weighted 0) is logged only."""
    weights = {
        "cap": config.align.cap_weight,
        "ans": config.align.cap_weight,  # the answer tokens of question samples: the same LM loss, on answers
        "moe_aux": config.model.moe_aux_weight,
        "itc": config.align.itc_weight,
        "supcon": config.align.supcon_weight,
    }
    return {name: weight for name, weight in weights.items() if weight > 0}


def weighted_total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """sum over weighted terms of weight x term (0-dim); a weighted term missing from `terms` is a bug, not a zero."""
    missing = [name for name in weights if name not in terms]
    if missing:
        raise KeyError(f"loss terms {missing} are weighted but were not computed (computed: {sorted(terms)})")
    return sum(weight * terms[name] for name, weight in weights.items())
