"""Image-text contrastive (ITC) and supervised contrastive (SupCon) losses over shared keys.

The caller gathers every rank's batch keys once per micro-batch (`build_keys`) and appends the
memory bank's entries; ITC, SupCon and the bank then all read the same `ContrastiveKeys`. Keys
are detached (momentum model or the online model's detached outputs), so gradients flow only
through this rank's queries; each rank's loss is a mean over its own anchors, and averaging the
per-rank gradients (as DeepSpeed does) gives the gradient of the loss over the global batch.

Shape letters: b = this rank's batch, K = keys (world_size * b gathered, then the bank's slots),
D = embedding width, V = label vocabulary.

Both losses compute in float32 whatever the input dtype, and take every softmax normaliser with
`torch.logsumexp` (which subtracts the row maximum), so a small temperature cannot overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vlpdist.losses.distributed import DataParallelContext, all_gather_no_grad


@dataclass
class ContrastiveKeys:
    """K keys shared by every rank: this step's batch keys of all ranks (gathered, rank order) then the memory bank's entries."""

    visual_KD: torch.Tensor
    """(K, D) unit-norm, detached."""
    text_KD: torch.Tensor
    """(K, D) unit-norm, detached."""
    sample_ids_K: torch.Tensor
    """(K,) int64; -1 for an empty slot."""
    labels_KV: torch.Tensor
    """(K, V) multi-hot float {0,1} over the recorded label vocabulary."""
    valid_K: torch.Tensor
    """(K,) bool; False for empty/invalidated bank slots (never used as a key)."""


def build_keys(
    batch_visual_bD: torch.Tensor,
    batch_text_bD: torch.Tensor,
    batch_ids_b: torch.Tensor,
    batch_labels_bV: torch.Tensor,
    ctx: DataParallelContext,
    bank: ContrastiveKeys | None = None,
) -> tuple[ContrastiveKeys, torch.Tensor]:
    """Gather this rank's batch keys from all ranks and append the bank's; return (keys, own_index_b).

    Every rank must pass the same b, D and V. Two collectives in all: the float fields packed into
    one (b, 2D + V) float32 tensor, the sample ids in one int64 tensor. own_index_b = rank * b +
    arange(b) are this rank's samples' positions among the keys. The keys come back in float32.
    """
    bank_tensors = [] if bank is None else [bank.visual_KD, bank.text_KD, bank.sample_ids_K, bank.labels_KV, bank.valid_K]
    # Checked at every world size: a single-process run on the wrong device would otherwise only fail on N ranks.
    for tensor in (batch_visual_bD, batch_text_bD, batch_ids_b, batch_labels_bV, *bank_tensors):
        ctx.check_device(tensor)
    b, width = batch_visual_bD.shape
    vocab = batch_labels_bV.shape[1]
    if batch_text_bD.shape != (b, width) or batch_ids_b.shape != (b,) or batch_labels_bV.shape[0] != b:
        raise ValueError(
            f"batch keys disagree: visual {tuple(batch_visual_bD.shape)}, text {tuple(batch_text_bD.shape)}, "
            f"ids {tuple(batch_ids_b.shape)}, labels {tuple(batch_labels_bV.shape)}"
        )
    if bank is not None and (bank.visual_KD.shape[1] != width or bank.labels_KV.shape[1] != vocab):
        raise ValueError(f"bank keys are (D={bank.visual_KD.shape[1]}, V={bank.labels_KV.shape[1]}); "
                         f"batch keys are (D={width}, V={vocab})")

    # Multi-hot labels are exact in float32, so they travel with the embeddings: one float collective.
    packed_bF = torch.cat([batch_visual_bD.float(), batch_text_bD.float(), batch_labels_bV.float()], dim=1)  # (b, 2D + V)
    gathered_BF = all_gather_no_grad(packed_bF, ctx)  # (world_size * b, 2D + V)
    gathered_ids_B = all_gather_no_grad(batch_ids_b.long(), ctx)  # (world_size * b,)
    visual_BD, text_BD, labels_BV = gathered_BF.split([width, width, vocab], dim=1)
    gathered = ContrastiveKeys(
        visual_KD=visual_BD.contiguous(),
        text_KD=text_BD.contiguous(),
        sample_ids_K=gathered_ids_B,
        labels_KV=labels_BV.contiguous(),
        valid_K=torch.ones(gathered_ids_B.shape[0], dtype=torch.bool, device=gathered_ids_B.device),
    )
    keys = gathered if bank is None else ContrastiveKeys(
        visual_KD=torch.cat([gathered.visual_KD, bank.visual_KD.detach().float()]),
        text_KD=torch.cat([gathered.text_KD, bank.text_KD.detach().float()]),
        sample_ids_K=torch.cat([gathered.sample_ids_K, bank.sample_ids_K.long()]),
        labels_KV=torch.cat([gathered.labels_KV, bank.labels_KV.float()]),
        valid_K=torch.cat([gathered.valid_K, bank.valid_K.bool()]),
    )
    own_index_b = ctx.rank * b + torch.arange(b, device=batch_ids_b.device)
    return keys, own_index_b


def build_excluded_keys(keys: ContrastiveKeys, own_index_b: torch.Tensor, keep_bK: torch.Tensor | None) -> torch.Tensor:
    """(b, K) bool: keys no anchor may use as a negative. Invalid slots, other copies of the anchor's own
    sample (another rank's duplicate, the bank's older copy: false negatives), and keep_bK False.
    The anchor's own index is included here; each loss decides what to do with it."""
    anchor_ids_b = keys.sample_ids_K[own_index_b]
    # An id of -1 means "unknown", not "the same sample as every other unknown".
    same_sample_bK = (keys.sample_ids_K[None, :] == anchor_ids_b[:, None]) & (anchor_ids_b[:, None] >= 0)
    excluded_bK = same_sample_bK | ~keys.valid_K[None, :]
    if keep_bK is not None:
        excluded_bK = excluded_bK | ~keep_bK
    return excluded_bK


def soft_target_cross_entropy(logits_bK: torch.Tensor, excluded_bK: torch.Tensor, target_bK: torch.Tensor) -> torch.Tensor:
    """(b,) -sum_k t_ik log softmax(x_i over the non-excluded keys)_k, for targets that sum to 1 over each
    row and are 0 on its excluded keys; every row must keep at least one key.

    Written as logsumexp(kept x_i) - sum_k t_ik x_ik so that the excluded logits never meet a
    0 * -inf: they enter only the normaliser, as -inf, whose exp (and gradient) is 0.
    """
    log_normaliser_b = torch.logsumexp(logits_bK.masked_fill(excluded_bK, float("-inf")), dim=1)
    return log_normaliser_b - (target_bK * logits_bK).sum(dim=1)


def itc_direction_loss(
    query_bD: torch.Tensor,
    keys_KD: torch.Tensor,
    excluded_bK: torch.Tensor,
    own_index_b: torch.Tensor,
    temperature: torch.Tensor,
    similarity_bK: torch.Tensor | None,
    distill_alpha: float,
    momentum_query_bD: torch.Tensor | None,
) -> torch.Tensor:
    """(b,) InfoNCE of one direction; the positive is the anchor's own index, kept whatever the masks say."""
    rows_b = torch.arange(own_index_b.shape[0], device=own_index_b.device)
    excluded_bK = excluded_bK.clone()
    excluded_bK[rows_b, own_index_b] = False
    similarity_bK = query_bD.float() @ keys_KD.float().T if similarity_bK is None else similarity_bK.float()
    logits_bK = similarity_bK / temperature.float()
    target_bK = torch.zeros_like(logits_bK)
    target_bK[rows_b, own_index_b] = 1.0
    if distill_alpha > 0:
        # ALBEF: the momentum model's softmax, at the same (but constant) temperature and masks, softens the one-hot.
        with torch.no_grad():
            momentum_logits_bK = momentum_query_bD.float() @ keys_KD.float().T / temperature.detach().float()
            momentum_probs_bK = torch.softmax(momentum_logits_bK.masked_fill(excluded_bK, float("-inf")), dim=1)
            target_bK = distill_alpha * momentum_probs_bK + (1.0 - distill_alpha) * target_bK
    return soft_target_cross_entropy(logits_bK, excluded_bK, target_bK)


def itc_loss(
    visual_q_bD: torch.Tensor,
    text_q_bD: torch.Tensor,
    keys: ContrastiveKeys,
    own_index_b: torch.Tensor,
    temperature: torch.Tensor,
    *,
    v2t_keep_bK: torch.Tensor | None = None,
    t2v_keep_bK: torch.Tensor | None = None,
    v2t_similarity_bK: torch.Tensor | None = None,
    distill_alpha: float = 0.0,
    visual_m_bD: torch.Tensor | None = None,
    text_m_bD: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """ALBEF/MoCo InfoNCE, visual->text and text->visual averaged; {"itc": 0-dim}.

    visual_q_bD, text_q_bD: (b, D) this rank's unit-norm online queries (carry grad).
    temperature: 0-dim tensor, may be learnable.
    v2t_keep_bK / t2v_keep_bK: (b, K) bool, False drops a key from that direction's denominator
    (hard-negative selection, false-negative removal); the positive is never dropped.
    v2t_similarity_bK: (b, K) a similarity to use for visual->text instead of visual_q @ text_K.T
    (e.g. negated geodesic distances); it is divided by the temperature like the dot product.
    distill_alpha > 0: targets = alpha * softmax(momentum logits) + (1 - alpha) * one-hot, the
    momentum logits from visual_m_bD / text_m_bD (b, D) against the same keys.
    """
    if distill_alpha > 0 and (visual_m_bD is None or text_m_bD is None):
        raise ValueError("distill_alpha > 0 needs the momentum queries visual_m_bD and text_m_bD")
    excluded_bK = build_excluded_keys(keys, own_index_b, keep_bK=None)
    v2t_excluded_bK = excluded_bK if v2t_keep_bK is None else excluded_bK | ~v2t_keep_bK
    t2v_excluded_bK = excluded_bK if t2v_keep_bK is None else excluded_bK | ~t2v_keep_bK
    v2t_b = itc_direction_loss(visual_q_bD, keys.text_KD, v2t_excluded_bK, own_index_b, temperature,
                               v2t_similarity_bK, distill_alpha, visual_m_bD)
    t2v_b = itc_direction_loss(text_q_bD, keys.visual_KD, t2v_excluded_bK, own_index_b, temperature,
                               None, distill_alpha, text_m_bD)
    return {"itc": (v2t_b.mean() + t2v_b.mean()) / 2}


def supcon_loss(
    visual_q_bD: torch.Tensor,
    keys: ContrastiveKeys,
    own_index_b: torch.Tensor,
    anchor_labels_bV: torch.Tensor,
    temperature: float,
    *,
    positives: Literal["any_shared", "jaccard"] = "any_shared",
    keep_bK: torch.Tensor | None = None,
    similarity_bK: torch.Tensor | None = None,
    ctx: DataParallelContext | None = None,
) -> dict[str, torch.Tensor]:
    """SupCon among visual embeddings (Khosla et al. 2020, L_out, eq. 2); {"supcon", "supcon_anchors"}.

    Candidates A(i): valid keys that are no copy of anchor i's own sample (its own momentum key
    included), of which keep_bK (b, K) drops negatives only. Positives P(i): candidates sharing a label with i,
    weighted 1 each ("any_shared") or by label Jaccard ("jaccard"), weights normalised to sum 1.
    loss_i = -sum_p w_ip log(exp(s_ip / T) / sum_{a in A(i)} exp(s_ia / T)), s = visual_q @ visual_K.T
    or similarity_bK (b, K) when given.

    "supcon" is the mean over this rank's anchors with a positive (exactly 0, with a zero gradient
    path, when none has one). With `ctx` on N ranks the count of such anchors is summed over ranks
    (one all-reduce of a scalar) and the loss is N x (this rank's sum) / (global count), so the mean
    of per-rank losses, as DeepSpeed averages gradients, is the global mean over all anchors with a
    positive however they are spread. "supcon_anchors" is this rank's fraction of anchors with a positive (no grad).
    """
    excluded_bK = build_excluded_keys(keys, own_index_b, keep_bK=None)
    anchor_labels_bV = anchor_labels_bV.float()
    shared_labels_bK = anchor_labels_bV @ keys.labels_KV.float().T  # (b, K) |Li ∩ Lk|
    if positives == "any_shared":
        overlap_bK = (shared_labels_bK > 0).float()
    elif positives == "jaccard":
        union_bK = anchor_labels_bV.sum(1, keepdim=True) + keys.labels_KV.float().sum(1)[None, :] - shared_labels_bK
        overlap_bK = shared_labels_bK / union_bK.clamp(min=1.0)  # union is 0 only where the intersection is
    else:
        raise ValueError(f"positives must be 'any_shared' or 'jaccard', not {positives!r}")
    overlap_bK = overlap_bK.masked_fill(excluded_bK, 0.0)
    if keep_bK is not None:
        # keep_bK selects negatives (geodesic hard negatives, false-negative removal): a key that
        # shares a label with the anchor stays a positive whatever it says.
        excluded_bK = excluded_bK | (~keep_bK & (overlap_bK == 0))
    overlap_sum_b = overlap_bK.sum(dim=1)
    has_positive_b = overlap_sum_b > 0
    weight_bK = overlap_bK / overlap_sum_b.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    # An anchor without a positive is dropped below; keeping all its keys keeps its row's
    # logsumexp finite, so the dropped row's (zero) gradient cannot turn into NaN.
    excluded_bK = excluded_bK & has_positive_b[:, None]

    similarity_bK = visual_q_bD.float() @ keys.visual_KD.float().T if similarity_bK is None else similarity_bK.float()
    logits_bK = similarity_bK / temperature
    loss_b = soft_target_cross_entropy(logits_bK, excluded_bK, weight_bK)
    anchors_with_positive = has_positive_b.sum()
    denominator = anchors_with_positive.float()
    if ctx is not None and ctx.world_size > 1:
        import torch.distributed as dist

        ctx.check_device(denominator)
        denominator = denominator.clone()
        dist.all_reduce(denominator, group=ctx.group)
        denominator = denominator.clamp(min=1) / ctx.world_size
    loss = (loss_b * has_positive_b.float()).sum() / denominator.clamp(min=1 / max(ctx.world_size if ctx else 1, 1))
    return {"supcon": loss, "supcon_anchors": (anchors_with_positive.float() / max(has_positive_b.numel(), 1)).detach()}
