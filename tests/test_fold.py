"""The folded dense mapper reproduces DeepSpeed's MoE mapper exactly (fp32, eval mode)."""

from __future__ import annotations

import pytest
import torch

from vlpdist.config import ModelConfig
from vlpdist.errors import UserError
from vlpdist.models import build_mapper, fold_mapper, load_folded_mapper, save_folded_mapper
from vlpdist.models.fold import (
    FOLDED_PATHS,
    count_folded_parameters,
    deepspeed_eval_gates,
    deepspeed_eval_top_k,
    fold_mapper_static,
    grouped_tile_count,
    measure_static_fold_error,
    plan_folded_evaluation,
)

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
    for batch in (1, 3, 16, 33, 1024):
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


@pytest.mark.parametrize("path", FOLDED_PATHS)
@pytest.mark.parametrize("top_k", [1, 2, EXPERTS])
def test_every_exact_path_matches_the_moe(path, top_k):
    """Each path forced, at batch sizes where the tiled one picks 1, several and many pairs per tile."""
    mapper = trained_like_mapper(top_k, seed=10 + top_k).eval()
    folded = fold_mapper(mapper)
    for batch in (1, 2, 7, 64, 300):
        clip_BC = torch.randn(batch, CLIP_DIM)
        with torch.no_grad():
            expected_BPD, _, expected_load = mapper(clip_BC)
            actual_BPD, _, actual_load = folded(clip_BC, path=path)
        assert relative_error(actual_BPD, expected_BPD) < 1e-5, (path, batch)
        assert torch.equal(actual_load, expected_load)


@pytest.mark.parametrize("skewed", [False, True])
def test_the_three_evaluations_of_the_folded_layer_agree(skewed):
    """Mixed weights, the grouped GEMM and the tiled bmm at tile sizes below, at and above the pairs an
    expert gets compute the same W(x) x; skewed routing sends every sample to the same two experts,
    so two experts are empty and two have all the pairs (the tile-count bound's worst case)."""
    block = fold_mapper(trained_like_mapper(2, seed=5).eval()).blocks[0]
    batch = 37
    x_BPD = torch.randn(batch, 5, WIDTH)
    logits_BE = torch.randn(batch, EXPERTS) + (torch.tensor([0.0, 9.0, 0.0, 9.0]) if skewed else 0.0)
    top_gate_BK, top_expert_BK = deepspeed_eval_top_k(logits_BE, 2)
    gates_BE = deepspeed_eval_gates(logits_BE, 2)
    with torch.no_grad():
        mixed = block._apply_mixed_channels(x_BPD, gates_BE)
        grouped = block._apply_grouped_channels(x_BPD, top_gate_BK, top_expert_BK)
        tiled = {tile: block._apply_tiled_channels(x_BPD, top_gate_BK, top_expert_BK, tile) for tile in (1, 3, 8, 40, 74)}
    assert relative_error(grouped, mixed) < 1e-5
    for tile, out in tiled.items():
        assert relative_error(out, mixed) < 1e-5, tile


def test_tile_count_bound_holds_for_any_routing():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        experts = int(torch.randint(1, 9, (), generator=generator))
        pairs = int(torch.randint(1, 300, (), generator=generator))
        tile = int(torch.randint(1, 70, (), generator=generator))
        counts = torch.bincount(torch.randint(0, experts, (pairs,), generator=generator), minlength=experts)
        assert int(((counts + tile - 1) // tile).sum()) <= grouped_tile_count(pairs, experts, tile)


def test_path_selection_at_gpt2_shapes():
    """E=8, k=2, P=10, D=768: the rule's picks at batch 1 and 1024 with and without torch's grouped GEMM."""
    shape = dict(experts=8, top_k=2, prefix=10, width=768)
    assert plan_folded_evaluation(1, **shape, grouped_gemm=True).path == "grouped"
    assert plan_folded_evaluation(1024, **shape, grouped_gemm=True).path == "grouped"
    # Without it (CUDA fp32): each sample's two experts gathered at batch 1, big tiles at batch 1024.
    small = plan_folded_evaluation(1, **shape, grouped_gemm=False)
    assert small.path == "tiled" and small.pairs_per_tile == 1
    large = plan_folded_evaluation(1024, **shape, grouped_gemm=False)
    assert large.path == "tiled" and large.pairs_per_tile >= 16
    # Every expert active on one sample: mixing the 8 matrices once beats applying 8 of them.
    assert plan_folded_evaluation(1, 8, 8, 10, 768, grouped_gemm=True).path == "mixed"
    with pytest.raises(UserError, match="grouped GEMM"):
        plan_folded_evaluation(1, **shape, grouped_gemm=False, path="grouped")
    with pytest.raises(UserError, match="expected one of"):
        plan_folded_evaluation(1, **shape, grouped_gemm=True, path="loop")


@pytest.mark.parametrize("path", ["mixed", "tiled"])
def test_device_paths_have_no_host_sync(path):
    """The paths a GPU runs trace into one graph in which no value depends on tensor contents (a
    `nonzero` or `.item()` would make one: an unbacked symbol, i.e. a read back to the host)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    data_dependent = []

    def record_data_dependent_nodes(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if free_unbacked_symbols(node.meta.get("example_value")):
                data_dependent.append(str(node.target))
        return graph_module.forward

    block = fold_mapper(trained_like_mapper(2, seed=6).eval()).blocks[0]
    h_BPD = torch.randn(9, 5, WIDTH)
    torch._dynamo.reset()
    traced = torch.compile(block, fullgraph=True, backend=record_data_dependent_nodes)
    with torch.no_grad():
        assert relative_error(traced(h_BPD, path)[0], block(h_BPD, path)[0]) < 1e-6
    assert data_dependent == []


def with_identical_gate_rows(mapper):
    """Every expert's gate row equal: every sample gets the same gates, so its layer W(x) is one W."""
    with torch.no_grad():
        for block in mapper.blocks:
            weight = block.moe.deepspeed_moe.gate.wg.weight
            weight.copy_(weight[:1].expand_as(weight).clone())
    return mapper


@pytest.mark.parametrize("top_k", [1, 2])
def test_static_fold_is_exact_when_every_sample_routes_alike(top_k):
    mapper = with_identical_gate_rows(trained_like_mapper(top_k, seed=7)).eval()
    exact = fold_mapper(mapper)
    static = fold_mapper_static(mapper, torch.randn(50, CLIP_DIM))
    assert static.config.static
    assert measure_static_fold_error(exact, static, torch.randn(40, CLIP_DIM)) < 1e-5


def test_static_fold_is_approximate_when_routing_varies():
    mapper = trained_like_mapper(2, seed=8).eval()
    exact = fold_mapper(mapper)
    static = fold_mapper_static(exact, torch.randn(200, CLIP_DIM))
    assert 1e-3 < measure_static_fold_error(exact, static, torch.randn(100, CLIP_DIM)) < 1.0


def test_parameter_counts_of_the_exact_and_static_folds():
    """Exact: every expert stored, k of them read per sample. Static: one expert per block, no gate."""
    mapper = trained_like_mapper(2, seed=9).eval()
    exact, static = fold_mapper(mapper), fold_mapper_static(mapper, torch.randn(20, CLIP_DIM))
    prefix, kernel, depth = 5, 5, 2
    input_proj = CLIP_DIM * prefix * WIDTH + prefix * WIDTH
    norm = 2 * WIDTH
    expert = WIDTH * WIDTH + kernel * WIDTH + WIDTH  # folded channel matrix, token kernel, bias
    gate = EXPERTS * prefix * WIDTH
    one_expert_per_block = input_proj + depth * (norm + expert)
    assert count_folded_parameters(static) == {"stored": one_expert_per_block, "per_sample": one_expert_per_block}
    assert count_folded_parameters(exact) == {
        "stored": input_proj + depth * (norm + gate + EXPERTS * expert),
        "per_sample": input_proj + depth * (norm + gate + 2 * expert),
    }


def test_static_fold_exports_in_the_same_format(tmp_path):
    static = fold_mapper_static(trained_like_mapper(2, seed=4).eval(), torch.randn(30, CLIP_DIM))
    loaded = load_folded_mapper(save_folded_mapper(static, tmp_path / "export"))
    assert loaded.config.static
    clip_BC = torch.randn(6, CLIP_DIM)
    with torch.no_grad():
        expected_BPD, _, expected_load = static(clip_BC)
        actual_BPD, _, actual_load = loaded(clip_BC)
    assert torch.equal(actual_BPD, expected_BPD)
    assert actual_load.numel() == 0 == expected_load.numel()


@pytest.mark.parametrize("kernel_sizes", [[3], [3, 5], [1, 5, 3]])
def test_expert_forward_is_its_branches_summed(kernel_sizes):
    """The expert applies its depthwise kernels summed, as shifted multiply-adds; that must equal the
    branches as defined (identity + channel linear + each Conv1d over the prefix axis), values and
    gradients, so that training, the fold and the design's formula are one model."""
    from vlpdist.models.experts import MultiBranchLinearExpert

    torch.manual_seed(0)
    expert = MultiBranchLinearExpert(prefix_length=6, width=8, kernel_sizes=kernel_sizes)
    for mixer in expert.token_mixers:
        torch.nn.init.normal_(mixer.weight)  # well away from zero, so a misplaced tap shows
    x_NF = torch.randn(5, 6 * 8, requires_grad=True)
    h_NPD = x_NF.view(5, 6, 8)
    branches = h_NPD + expert.channel(h_NPD)
    for mixer in expert.token_mixers:
        branches = branches + mixer(h_NPD.transpose(1, 2)).transpose(1, 2)
    upstream = torch.randn(5, 6 * 8)
    params = [x_NF, *expert.parameters()]
    expected = torch.autograd.grad(branches.reshape(5, -1), params, upstream)
    out = expert(x_NF)
    torch.testing.assert_close(out, branches.reshape(5, -1), rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(out, params, upstream), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
