"""The folded dense mapper reproduces DeepSpeed's MoE mapper exactly (fp32, eval mode)."""

from __future__ import annotations

import pytest
import torch

from vlpdist.config import ModelConfig
from vlpdist.errors import UserError
from vlpdist.models import build_mapper, fold_mapper
from vlpdist.models.fold import deepspeed_eval_gates

CLIP_DIM, WIDTH, EXPERTS = 24, 32, 4


def trained_like_mapper(top_k: int, seed: int, **overrides):
    """A MoE mapper whose weights are far from their identity-like init, as after training."""
    torch.manual_seed(seed)
    cfg = ModelConfig(prefix_length=5, mapper_depth=2, num_experts=EXPERTS, top_k=top_k, kernel_sizes=[1, 3, 5], **overrides)
    mapper = build_mapper(cfg, CLIP_DIM, WIDTH)
    with torch.no_grad():
        for param in mapper.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return mapper


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("top_k", [1, 2, EXPERTS])
def test_fold_matches_moe_for_several_batch_sizes(top_k):
    mapper = trained_like_mapper(top_k, seed=top_k).eval()
    folded = fold_mapper(mapper)
    for batch in (1, 3, 16, 33):
        clip_BC = torch.randn(batch, CLIP_DIM)
        with torch.no_grad():
            expected_BPD, _, expected_load = mapper(clip_BC)
            actual_BPD, _, actual_load = folded(clip_BC)
        assert actual_BPD.shape == (batch, 5, WIDTH)
        assert relative_error(actual_BPD, expected_BPD) < 1e-5
        # Same routing decisions: the per-expert sample fractions agree.
        assert torch.equal(actual_load, expected_load)


def test_routing_is_per_sample_and_not_trivial():
    """Different samples pick different experts, so the fold test above exercises real routing."""
    mapper = trained_like_mapper(1, seed=0).eval()
    with torch.no_grad():
        _, _, load_E = mapper(torch.randn(64, CLIP_DIM))
    assert (load_E > 0).sum() >= 2
    assert torch.isclose(load_E.sum(), torch.tensor(1.0))


def test_gates_follow_deepspeed_semantics():
    logits_BE = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits_BE, dim=1)
    top1 = deepspeed_eval_gates(logits_BE, 1)
    # k = 1: the raw softmax probability, not renormalised.
    assert torch.allclose(top1, torch.tensor([[probs[0, 0], 0, 0, 0]]))
    top2 = deepspeed_eval_gates(logits_BE, 2)
    assert torch.allclose(top2[0, :2], probs[0, :2] / probs[0, :2].sum())
    assert top2[0, 2:].abs().sum() == 0


def test_eval_never_drops_even_when_training_capacity_would():
    """Train-time capacity drops samples (their block output is skipped); eval keeps every sample, as the fold does."""
    mapper = trained_like_mapper(1, seed=3, capacity_factor=0.25)
    clip_BC = torch.randn(32, CLIP_DIM)
    folded = fold_mapper(mapper)
    with torch.no_grad():
        train_out = mapper.train()(clip_BC)[0]
        eval_out = mapper.eval()(clip_BC)[0]
        folded_out = folded(clip_BC)[0]
    assert relative_error(folded_out, eval_out) < 1e-5
    assert relative_error(train_out, eval_out) > 1e-3


def test_fold_refuses_a_mapper_holding_part_of_the_experts():
    cfg = ModelConfig(prefix_length=2, mapper_depth=1, num_experts=EXPERTS, kernel_sizes=[3])
    with pytest.raises(UserError, match="ep_size=1"):
        fold_mapper(build_mapper(cfg, CLIP_DIM, WIDTH, ep_size=2))


def test_both_evaluations_of_the_folded_layer_agree():
    """Mixed per-sample weights (CondConv) and expert-by-expert application compute the same W(x) x."""
    folded = fold_mapper(trained_like_mapper(2, seed=5).eval())
    block = folded.blocks[0]
    x_BPD = torch.randn(9, 5, WIDTH)
    gates_BE = deepspeed_eval_gates(torch.randn(9, EXPERTS), 2)
    with torch.no_grad():
        mixed = block._apply_mixed_weights(x_BPD, gates_BE)
        chosen = block._apply_chosen_experts(x_BPD, gates_BE)
    assert relative_error(chosen, mixed) < 1e-5
