"""ITC and SupCon over gathered batch keys and the memory bank.

The values are checked against the formulas written out again here with plain loops and `math`
(double precision), on a small case that has every kind of key a loss must treat apart: invalid
and empty bank slots, a bank copy of an anchor's own sample, an anchor with no label. Two gloo
ranks with batch b must give what one process gives with batch 2b.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from common_fixtures import free_port

from vlpdist.losses.contrastive import ContrastiveKeys, build_keys, itc_loss, supcon_loss
from vlpdist.losses.distributed import DataParallelContext, all_gather_no_grad

WIDTH = 5

# Anchor 3 has no label, so it never has a SupCon positive.
BATCH_IDS = [10, 11, 12, 13]
BATCH_LABELS = [[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
# Bank slot 0 is an older copy of anchor 0 (same id, same labels: a false negative and a false positive
# if it were used); slot 3 was invalidated but still holds labels anchors 1 and 2 share; slot 4 is empty.
BANK_IDS = [10, 20, 21, 22, -1, 23]
BANK_VALID = [True, True, True, False, False, True]
BANK_LABELS = [[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]]


def unit_rows(rows: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, WIDTH, generator=generator, dtype=torch.float64), dim=1).float()


def small_case(seed: int = 0) -> dict:
    """Online queries (b, D), keys (b + 6, D) from a momentum copy near them, and the bank."""
    generator = torch.Generator().manual_seed(seed)
    visual_q_bD, text_q_bD = unit_rows(4, generator), unit_rows(4, generator)
    # The momentum model's outputs: near the online ones, not equal to them.
    visual_m_bD = F.normalize(visual_q_bD + 0.3 * unit_rows(4, generator), dim=1)
    text_m_bD = F.normalize(text_q_bD + 0.3 * unit_rows(4, generator), dim=1)
    bank = ContrastiveKeys(
        visual_KD=unit_rows(6, generator),
        text_KD=unit_rows(6, generator),
        sample_ids_K=torch.tensor(BANK_IDS),
        labels_KV=torch.tensor(BANK_LABELS, dtype=torch.float32),
        valid_K=torch.tensor(BANK_VALID),
    )
    labels_bV = torch.tensor(BATCH_LABELS, dtype=torch.float32)
    keys, own_index_b = build_keys(visual_m_bD, text_m_bD, torch.tensor(BATCH_IDS), labels_bV, DataParallelContext(), bank)
    return dict(visual_q_bD=visual_q_bD, text_q_bD=text_q_bD, visual_m_bD=visual_m_bD, text_m_bD=text_m_bD,
                labels_bV=labels_bV, keys=keys, own_index_b=own_index_b, generator=generator)


def random_keep(generator: torch.Generator) -> torch.Tensor:
    """(4, 10) bool with about a third dropped; anchor 0 also drops its own positive, which ITC must keep."""
    keep_bK = torch.rand(4, 10, generator=generator) > 0.35
    keep_bK[0, 0] = False
    return keep_bK


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def reference_itc_direction(queries, key_vectors, ids, valid, own, temperature, keep=None, similarity=None,
                            alpha=0.0, momentum_queries=None) -> float:
    total = 0.0
    for i, query in enumerate(queries):
        anchor_id = ids[own[i]]
        allowed = [k for k in range(len(key_vectors))
                   if k == own[i] or (valid[k] and ids[k] != anchor_id and (keep is None or keep[i][k]))]
        logit = {k: (similarity[i][k] if similarity else dot(query, key_vectors[k])) / temperature for k in allowed}
        log_normaliser = math.log(sum(math.exp(logit[k]) for k in allowed))
        target = {k: float(k == own[i]) for k in allowed}
        if alpha > 0:
            momentum = {k: math.exp(dot(momentum_queries[i], key_vectors[k]) / temperature) for k in allowed}
            momentum_sum = sum(momentum.values())
            target = {k: alpha * momentum[k] / momentum_sum + (1 - alpha) * target[k] for k in allowed}
        total += -sum(target[k] * (logit[k] - log_normaliser) for k in allowed)
    return total / len(queries)


def reference_itc(case: dict, temperature: float, v2t_keep=None, t2v_keep=None, v2t_similarity=None, alpha=0.0) -> float:
    keys = case["keys"]
    common = dict(ids=keys.sample_ids_K.tolist(), valid=keys.valid_K.tolist(), own=case["own_index_b"].tolist(),
                  temperature=temperature, alpha=alpha)
    v2t = reference_itc_direction(case["visual_q_bD"].tolist(), keys.text_KD.tolist(), keep=v2t_keep,
                                  similarity=v2t_similarity, momentum_queries=case["visual_m_bD"].tolist(), **common)
    t2v = reference_itc_direction(case["text_q_bD"].tolist(), keys.visual_KD.tolist(), keep=t2v_keep,
                                  momentum_queries=case["text_m_bD"].tolist(), **common)
    return (v2t + t2v) / 2


def reference_supcon(case: dict, temperature: float, positives: str, keep=None, similarity=None) -> tuple[float, float]:
    """(loss, fraction of anchors with a positive)."""
    keys = case["keys"]
    ids, valid, key_labels = keys.sample_ids_K.tolist(), keys.valid_K.tolist(), keys.labels_KV.tolist()
    own = case["own_index_b"].tolist()
    losses = []
    for i, query in enumerate(case["visual_q_bD"].tolist()):
        anchor_labels = {v for v, on in enumerate(case["labels_bV"][i].tolist()) if on}
        weight = {}
        for k in range(len(ids)):
            if not valid[k] or ids[k] == ids[own[i]]:
                continue
            key_label_set = {v for v, on in enumerate(key_labels[k]) if on}
            shared = len(anchor_labels & key_label_set)
            if shared:
                weight[k] = 1.0 if positives == "any_shared" else shared / len(anchor_labels | key_label_set)
        # The keep mask drops negatives only: a positive stays a positive whatever it says.
        candidates = [k for k in range(len(ids)) if valid[k] and ids[k] != ids[own[i]] and (keep is None or keep[i][k] or k in weight)]
        if not weight:
            continue
        weight_sum = sum(weight.values())
        logit = {k: (similarity[i][k] if similarity else dot(query, keys.visual_KD[k].tolist())) / temperature
                 for k in candidates}
        log_normaliser = math.log(sum(math.exp(logit[a]) for a in candidates))
        losses.append(-sum(w / weight_sum * (logit[p] - log_normaliser) for p, w in weight.items()))
    return sum(losses) / len(losses), len(losses) / len(own)


def negated_geodesic(queries_bD: torch.Tensor, keys_KD: torch.Tensor) -> torch.Tensor:
    """(b, K) -arccos(q . k): a similarity that is not the dot product."""
    return -torch.arccos((queries_bD @ keys_KD.T).clamp(-1 + 1e-6, 1 - 1e-6))


def test_build_keys_puts_the_batch_before_the_bank():
    case = small_case()
    keys = case["keys"]
    assert keys.visual_KD.shape == (10, WIDTH) and keys.labels_KV.shape == (10, 4)
    assert keys.sample_ids_K.tolist() == BATCH_IDS + BANK_IDS
    assert keys.valid_K.tolist() == [True] * 4 + BANK_VALID
    assert torch.equal(keys.visual_KD[:4], case["visual_m_bD"]) and torch.equal(keys.text_KD[:4], case["text_m_bD"])
    assert case["own_index_b"].tolist() == [0, 1, 2, 3]
    assert keys.visual_KD.dtype == torch.float32 and not keys.visual_KD.requires_grad


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("geodesic", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_matches_reference(keep, geodesic, alpha):
    case = small_case(seed=1)
    keys = case["keys"]
    temperature = 0.07
    v2t_keep_bK = random_keep(case["generator"]) if keep else None
    t2v_keep_bK = random_keep(case["generator"]) if keep else None
    v2t_similarity_bK = negated_geodesic(case["visual_q_bD"], keys.text_KD) if geodesic else None
    got = itc_loss(case["visual_q_bD"], case["text_q_bD"], keys, case["own_index_b"], torch.tensor(temperature),
                   v2t_keep_bK=v2t_keep_bK, t2v_keep_bK=t2v_keep_bK, v2t_similarity_bK=v2t_similarity_bK,
                   distill_alpha=alpha, visual_m_bD=case["visual_m_bD"], text_m_bD=case["text_m_bD"])
    expected = reference_itc(case, temperature,
                             v2t_keep=None if v2t_keep_bK is None else v2t_keep_bK.tolist(),
                             t2v_keep=None if t2v_keep_bK is None else t2v_keep_bK.tolist(),
                             v2t_similarity=None if v2t_similarity_bK is None else v2t_similarity_bK.tolist(),
                             alpha=alpha)
    assert set(got) == {"itc"} and got["itc"].dim() == 0
    assert float(got["itc"]) == pytest.approx(expected, abs=1e-5)


def test_itc_without_the_masks_differs():
    """The reference test would pass trivially if the bank's copy of anchor 0 and the invalid slots
    changed nothing: the same keys all marked valid with fresh ids must give another value."""
    case = small_case(seed=1)
    keys = case["keys"]
    unmasked = ContrastiveKeys(keys.visual_KD, keys.text_KD, torch.arange(100, 110), keys.labels_KV,
                               torch.ones(10, dtype=torch.bool))
    masked = itc_loss(case["visual_q_bD"], case["text_q_bD"], keys, case["own_index_b"], torch.tensor(0.07))["itc"]
    plain = itc_loss(case["visual_q_bD"], case["text_q_bD"], unmasked, case["own_index_b"], torch.tensor(0.07))["itc"]
    assert abs(float(masked) - float(plain)) > 1e-3


@pytest.mark.parametrize("positives", ["any_shared", "jaccard"])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("geodesic", [False, True])
def test_supcon_matches_reference(positives, keep, geodesic):
    case = small_case(seed=2)
    keys = case["keys"]
    temperature = 0.1
    keep_bK = random_keep(case["generator"]) if keep else None
    similarity_bK = negated_geodesic(case["visual_q_bD"], keys.visual_KD) if geodesic else None
    got = supcon_loss(case["visual_q_bD"], keys, case["own_index_b"], case["labels_bV"], temperature,
                      positives=positives, keep_bK=keep_bK, similarity_bK=similarity_bK)
    expected, expected_fraction = reference_supcon(case, temperature, positives,
                                                   keep=None if keep_bK is None else keep_bK.tolist(),
                                                   similarity=None if similarity_bK is None else similarity_bK.tolist())
    assert set(got) == {"supcon", "supcon_anchors"} and got["supcon"].dim() == 0 and got["supcon_anchors"].dim() == 0
    assert float(got["supcon"]) == pytest.approx(expected, abs=1e-5)
    assert float(got["supcon_anchors"]) == pytest.approx(expected_fraction)
    if not keep:
        assert float(got["supcon_anchors"]) == 0.75  # anchor 3 has no label


def test_supcon_jaccard_weights_differ_from_uniform():
    case = small_case(seed=2)
    args = (case["visual_q_bD"], case["keys"], case["own_index_b"], case["labels_bV"], 0.1)
    assert abs(float(supcon_loss(*args, positives="jaccard")["supcon"]) - float(supcon_loss(*args)["supcon"])) > 1e-4


def test_supcon_gradients_finite_and_none_for_an_anchor_without_positive():
    case = small_case(seed=3)
    visual_q_bD = case["visual_q_bD"].clone().requires_grad_(True)
    loss = supcon_loss(visual_q_bD, case["keys"], case["own_index_b"], case["labels_bV"], 0.1)["supcon"]
    loss.backward()
    assert torch.isfinite(visual_q_bD.grad).all()
    assert torch.count_nonzero(visual_q_bD.grad[3]) == 0  # anchor 3 has no label: it contributes nothing
    assert torch.count_nonzero(visual_q_bD.grad[:3].norm(dim=1)) == 3


def test_supcon_without_any_positive_is_exactly_zero_with_finite_gradients():
    case = small_case(seed=4)
    visual_q_bD = case["visual_q_bD"].clone().requires_grad_(True)
    labels_bV = torch.zeros(4, 4)
    terms = supcon_loss(visual_q_bD, case["keys"], case["own_index_b"], labels_bV, 0.1, positives="jaccard")
    assert terms["supcon"].item() == 0.0 and terms["supcon_anchors"].item() == 0.0
    assert terms["supcon"].requires_grad and not terms["supcon_anchors"].requires_grad
    terms["supcon"].backward()
    assert visual_q_bD.grad is not None and torch.count_nonzero(visual_q_bD.grad) == 0


def test_supcon_keep_mask_drops_negatives_never_positives():
    """Geodesic negative selection may drop every negative; the positives stay, so the loss is that of
    the positives among themselves (finite, non-zero for anchors with several positives)."""
    case = small_case(seed=4)
    drop_all_bK = torch.zeros(4, 10, dtype=torch.bool)
    kept = supcon_loss(case["visual_q_bD"], case["keys"], case["own_index_b"], case["labels_bV"], 0.1, keep_bK=drop_all_bK)
    full = supcon_loss(case["visual_q_bD"], case["keys"], case["own_index_b"], case["labels_bV"], 0.1)
    assert kept["supcon_anchors"] == full["supcon_anchors"] > 0  # no anchor lost its positives
    assert torch.isfinite(kept["supcon"]) and kept["supcon"] < full["supcon"]  # fewer negatives, lower loss
    reference, _ = reference_supcon(case, 0.1, "any_shared", keep=drop_all_bK.tolist())
    assert kept["supcon"].item() == pytest.approx(reference, abs=1e-5)


def test_itc_gradients_finite_with_everything_but_the_positive_dropped_and_a_tiny_temperature():
    case = small_case(seed=5)
    visual_q_bD = case["visual_q_bD"].clone().requires_grad_(True)
    text_q_bD = case["text_q_bD"].clone().requires_grad_(True)
    temperature = torch.tensor(1e-3, requires_grad=True)  # logits up to 1000: exp() alone would overflow float32
    drop_all_bK = torch.zeros(4, 10, dtype=torch.bool)
    only_positive = itc_loss(visual_q_bD, text_q_bD, case["keys"], case["own_index_b"], temperature,
                             v2t_keep_bK=drop_all_bK, t2v_keep_bK=drop_all_bK)["itc"]
    assert only_positive.item() == 0.0  # the positive alone: log 1
    full = itc_loss(visual_q_bD, text_q_bD, case["keys"], case["own_index_b"], temperature,
                    distill_alpha=0.4, visual_m_bD=case["visual_m_bD"], text_m_bD=case["text_m_bD"])["itc"]
    assert torch.isfinite(full) and full.item() > 0
    (only_positive + full).backward()
    for grad in (visual_q_bD.grad, text_q_bD.grad, temperature.grad):
        assert torch.isfinite(grad).all()
    assert torch.count_nonzero(visual_q_bD.grad) > 0 and temperature.grad.item() != 0.0


def test_bf16_inputs_are_computed_in_float32():
    case = small_case(seed=6)
    keys = case["keys"]
    visual_bf16_bD, text_bf16_bD = case["visual_q_bD"].bfloat16(), case["text_q_bD"].bfloat16()
    bf16_keys = ContrastiveKeys(keys.visual_KD.bfloat16(), keys.text_KD.bfloat16(), keys.sample_ids_K,
                                keys.labels_KV.bfloat16(), keys.valid_K)
    # The same bf16 values, widened: a float32 computation must agree to float32 rounding, a bf16 one would not.
    widened_keys = ContrastiveKeys(bf16_keys.visual_KD.float(), bf16_keys.text_KD.float(), keys.sample_ids_K,
                                   keys.labels_KV, keys.valid_K)
    temperature = torch.tensor(0.05)
    itc_bf16 = itc_loss(visual_bf16_bD, text_bf16_bD, bf16_keys, case["own_index_b"], temperature)["itc"]
    itc_wide = itc_loss(visual_bf16_bD.float(), text_bf16_bD.float(), widened_keys, case["own_index_b"], temperature)["itc"]
    supcon_bf16 = supcon_loss(visual_bf16_bD, bf16_keys, case["own_index_b"], case["labels_bV"].bfloat16(), 0.05)["supcon"]
    supcon_wide = supcon_loss(visual_bf16_bD.float(), widened_keys, case["own_index_b"], case["labels_bV"], 0.05)["supcon"]
    assert itc_bf16.dtype == torch.float32 and supcon_bf16.dtype == torch.float32
    assert abs(itc_bf16.item() - itc_wide.item()) < 1e-6 and abs(supcon_bf16.item() - supcon_wide.item()) < 1e-6
    # Keys gathered from bf16 batch keys come back widened, not rounded to bf16 again by the packing.
    built, _ = build_keys(visual_bf16_bD, text_bf16_bD, torch.tensor(BATCH_IDS), case["labels_bV"].bfloat16(),
                          DataParallelContext())
    assert built.visual_KD.dtype == torch.float32 and torch.equal(built.visual_KD, visual_bf16_bD.float())


# Two ranks of batch 3 against one process of batch 6: the projections are the parameters.
RANKS, RANK_BATCH, INPUT_WIDTH, VOCAB = 2, 3, 6, 3
# Rank 0 has two anchors with a positive, rank 1 one: SupCon's count is summed over ranks (its ctx),
# so the mean of per-rank losses is still the global mean.
GLOBAL_LABELS = [[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]
GLOBAL_IDS = [100, 101, 102, 103, 104, 105]


def distributed_case() -> dict:
    generator = torch.Generator().manual_seed(7)
    bank = ContrastiveKeys(
        visual_KD=unit_rows(4, generator),
        text_KD=unit_rows(4, generator),
        sample_ids_K=torch.tensor([104, 200, 201, -1]),  # slot 0: an old copy of rank 1's second sample
        labels_KV=torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float32),
        valid_K=torch.tensor([True, True, True, False]),
    )
    return dict(
        visual_in_BC=torch.randn(RANKS * RANK_BATCH, INPUT_WIDTH, generator=generator),
        text_in_BC=torch.randn(RANKS * RANK_BATCH, INPUT_WIDTH, generator=generator),
        visual_projection_CD=torch.randn(INPUT_WIDTH, WIDTH, generator=generator),
        text_projection_CD=torch.randn(INPUT_WIDTH, WIDTH, generator=generator),
        ids_B=torch.tensor(GLOBAL_IDS),
        labels_BV=torch.tensor(GLOBAL_LABELS, dtype=torch.float32),
        keep_BK=torch.rand(RANKS * RANK_BATCH, RANKS * RANK_BATCH + 4, generator=generator) > 0.3,
        bank=bank,
    )


def run_losses(case: dict, rows: slice, ctx: DataParallelContext) -> dict:
    """This rank's losses on `rows` of the global batch and the gradients of its projections."""
    visual_projection_CD = case["visual_projection_CD"].clone().requires_grad_(True)
    text_projection_CD = case["text_projection_CD"].clone().requires_grad_(True)
    temperature = torch.tensor(0.1, requires_grad=True)
    visual_q_bD = F.normalize(case["visual_in_BC"][rows] @ visual_projection_CD, dim=1)
    text_q_bD = F.normalize(case["text_in_BC"][rows] @ text_projection_CD, dim=1)
    # Keys from the online model's detached outputs, as without a momentum model.
    keys, own_index_b = build_keys(visual_q_bD.detach(), text_q_bD.detach(), case["ids_B"][rows], case["labels_BV"][rows], ctx,
                                   case["bank"])
    itc = itc_loss(visual_q_bD, text_q_bD, keys, own_index_b, temperature, v2t_keep_bK=case["keep_BK"][rows],
                   distill_alpha=0.4, visual_m_bD=visual_q_bD.detach(), text_m_bD=text_q_bD.detach())["itc"]
    supcon = supcon_loss(visual_q_bD, keys, own_index_b, case["labels_BV"][rows], 0.1, positives="jaccard", ctx=ctx)["supcon"]
    (itc + supcon).backward()
    return dict(itc=itc.detach(), supcon=supcon.detach(), keys=keys, own_index_b=own_index_b,
                visual_grad=visual_projection_CD.grad, text_grad=text_projection_CD.grad, temperature_grad=temperature.grad)


def run_rank(rank: int, port: int, case: dict, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS,
                            timeout=timedelta(seconds=60))
    try:
        ctx = DataParallelContext.from_default_group(torch.device("cpu"))
        result = run_losses(case, slice(rank * RANK_BATCH, (rank + 1) * RANK_BATCH), ctx)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def gather_with_and_without_all_gather_single(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS,
                            timeout=timedelta(seconds=60))
    try:
        ctx = DataParallelContext.from_default_group(torch.device("cpu"))
        rows_bD = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 100 * rank
        newer = all_gather_no_grad(rows_bD, ctx)
        del dist.all_gather_single  # as in torch 2.11, the lent GPU machine's (this rank process only)
        older = all_gather_no_grad(rows_bD, ctx)
        torch.save({"newer": newer, "older": older}, os.path.join(out_dir, f"gather{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_the_gather_falls_back_where_torch_has_no_all_gather_single(tmp_path: Path):
    mp.spawn(gather_with_and_without_all_gather_single, args=(free_port(), str(tmp_path)), nprocs=RANKS, join=True)
    expected_BD = torch.cat([torch.arange(6, dtype=torch.float32).reshape(3, 2) + 100 * rank for rank in range(RANKS)])
    for rank in range(RANKS):
        result = torch.load(tmp_path / f"gather{rank}.pt")
        assert torch.equal(result["newer"], expected_BD) and torch.equal(result["older"], expected_BD)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_gloo_ranks_match_one_process_with_the_whole_batch(tmp_path: Path):
    case = distributed_case()
    mp.spawn(run_rank, args=(free_port(), case, str(tmp_path)), nprocs=RANKS, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(RANKS)]
    whole = run_losses(case, slice(None), DataParallelContext())
    assert float(whole["supcon"]) > 0  # the bank and the labels give positives, so the comparison means something

    for rank, result in enumerate(ranks):
        assert result["own_index_b"].tolist() == list(range(rank * RANK_BATCH, (rank + 1) * RANK_BATCH))
        for field in ("visual_KD", "text_KD", "sample_ids_K", "labels_KV", "valid_K"):
            # Gathered batch keys in rank order then the bank: what one process builds from the whole batch.
            gathered, single = getattr(result["keys"], field), getattr(whole["keys"], field)
            assert torch.allclose(gathered.float(), single.float(), atol=1e-6), field
    for term in ("itc", "supcon"):
        assert sum(float(r[term]) for r in ranks) / RANKS == pytest.approx(float(whole[term]), abs=1e-6)
    for grad in ("visual_grad", "text_grad", "temperature_grad"):
        averaged = sum(r[grad] for r in ranks) / RANKS  # DeepSpeed's data-parallel gradient average
        assert torch.allclose(averaged, whole[grad], atol=1e-6), grad
        assert whole[grad].abs().max() > 1e-4


def test_tensors_on_another_device_type_are_refused():
    case = small_case()
    batch = (case["visual_m_bD"], case["text_m_bD"], torch.tensor(BATCH_IDS), case["labels_bV"])
    with pytest.raises(RuntimeError, match="collective on a cpu tensor; this data-parallel group works on meta"):
        build_keys(*batch, DataParallelContext(device=torch.device("meta")))
    meta_bank = ContrastiveKeys(*(torch.empty_like(getattr(case["keys"], f), device="meta")
                                  for f in ("visual_KD", "text_KD", "sample_ids_K", "labels_KV", "valid_K")))
    with pytest.raises(RuntimeError, match="collective on a meta tensor"):
        build_keys(*batch, DataParallelContext(), bank=meta_bank)
    # Two ranks but no process group: the refusal comes before any collective is attempted.
    with pytest.raises(RuntimeError, match="collective on a cpu tensor"):
        all_gather_no_grad(case["visual_m_bD"], DataParallelContext(rank=0, world_size=2, device=torch.device("meta")))
    build_keys(*batch, DataParallelContext())  # the same tensors on the context's device pass
