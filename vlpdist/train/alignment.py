"""The alignment objective: ITC and SupCon over the gathered batch and a memory bank kept by a
momentum copy of the mapper, with optional geodesic (k-NN graph) negatives.

Per micro-batch (every rank, in step): the momentum model (or the online model's detached
outputs) gives this batch's keys; ONE gather of them serves ITC, SupCon and the bank
(`build_keys`); the losses read keys = [every rank's batch keys | the bank's N slots]; then the
gathered rows enter the bank. Per applied optimizer step: the momentum model moves towards the
online one, and every `geodesic_refresh_every` steps the k-NN graph over the bank is rebuilt.

The bank is identical on every rank (same gathered rows in the same order), so the graph built
from it is too, and masks derived from it agree across ranks without a collective.

Shape letters: b this rank's batch, M = world * b gathered rows, N bank slots, K = M + N keys,
E alignment width, V label vocabulary.
"""

from __future__ import annotations

import time

import torch

from vlpdist.config import Config
from vlpdist.errors import UserError
from vlpdist.losses.contrastive import ContrastiveKeys, build_keys, itc_loss, supcon_loss
from vlpdist.losses.distributed import DataParallelContext
from vlpdist.losses.memory_bank import MemoryBank, check_bank_geometry
from vlpdist.train.momentum import MomentumEncoder
from vlpdist.train.text_cache import TextFeatureCache


def multi_hot(label_ids_BL: torch.Tensor, num_labels: int, device: torch.device) -> torch.Tensor:
    """(B, L) label ids padded with -1 (a host tensor) -> (B, V) float multi-hot on `device`;
    (B, 0) when the run uses no labels (SupCon off), whatever the samples carry.

    Ids outside the vocabulary are dropped like padding rather than raised on: this runs per
    rank, and an error on one rank would leave the others waiting in the next gather. The
    processing stage writes ids of the vocabulary it records, so they only come from a foreign shard."""
    if num_labels == 0:
        return torch.zeros(label_ids_BL.shape[0], 0, device=device)
    ids_BL = label_ids_BL.to(device, non_blocking=True)
    hot_BV = torch.zeros(ids_BL.shape[0], num_labels + 1, device=device)
    outside_BL = (ids_BL < 0) | (ids_BL >= num_labels)
    hot_BV.scatter_(1, torch.where(outside_BL, num_labels, ids_BL), 1.0)  # padding lands in a spare column, dropped
    return hot_BV[:, :num_labels]


def check_geodesic_settings(align, rows_per_step: int) -> None:
    """UserError for geodesic settings that cannot work as configured (checked on every rank alike)."""
    turnover = align.bank_size / rows_per_step
    if align.geodesic_refresh_every > turnover:
        raise UserError(
            f"config key 'align.geodesic_refresh_every' is {align.geodesic_refresh_every}, but the bank of "
            f"{align.bank_size} turns over every {turnover:g} steps ({rows_per_step} rows per step): the graph would "
            f"describe entries the bank no longer holds; refresh at most every {max(int(turnover), 1)} steps or grow the bank"
        )
    if align.geodesic_backend == "faiss_hnsw":
        # Every rank builds the graph from the same bank; a multi-threaded HNSW build differs from
        # run to run, so ranks (and a resumed run) would pick other negatives.
        raise UserError("config key 'align.geodesic_backend' faiss_hnsw builds differently on every rank; "
                        "use torch, faiss_flat or faiss_ivf for training (faiss_hnsw is in the benchmark)")


class AlignmentObjective:
    """Holds the bank, the momentum model, the text-feature cache and the geodesic snapshot; returns named terms."""

    def __init__(self, config: Config, captioner, ctx: DataParallelContext, num_labels: int):
        align = config.align
        self.align = align
        self.ctx = ctx
        self.num_labels = num_labels
        self.weights_itc, self.weights_supcon = align.itc_weight > 0, align.supcon_weight > 0
        check_bank_geometry(align.bank_size, ctx.world_size, config.train.micro_batch_size)
        if align.uses_geodesic:
            check_geodesic_settings(align, ctx.world_size * config.train.micro_batch_size * config.train.gradient_accumulation_steps)
        self.bank = MemoryBank(align.bank_size, align.embed_dim, num_labels, ctx.device, unique_ids=align.bank_unique_ids)
        self.momentum = MomentumEncoder(captioner, align.momentum) if align.momentum > 0 else None
        self.false_negatives_removed = torch.zeros((), dtype=torch.int64, device=ctx.device)  # this rank's anchors
        self.ep_size = config.train.ep_size
        width = captioner.lm.get_input_embeddings().embedding_dim
        self.text_cache = TextFeatureCache(align.text_cache_entries, width, ctx.device) if align.text_target == "lm_cached" else None
        if self.text_cache is not None and not captioner.freeze_lm:
            raise UserError("config key 'align.text_target' is lm_cached, but a tuned LM's text features change: use lm or clip")
        self.snapshot = None  # the geodesic graph over the bank as it was at the last refresh
        self.snapshot_slots_n = None  # (n,) bank slot of each graph node
        self.snapshot_step = -1
        self.refreshes = self.untrusted_refreshes = 0  # this launch's graph builds, and those `geodesic.trust` flagged
        self.last_untrusted_stats: dict = {}
        self.pending_rows = None  # the gathered rows of the current micro-batch, enqueued after its losses

    # -- per micro-batch -------------------------------------------------------------------------

    def text_feature(self, captioner, batch: dict, device: torch.device) -> torch.Tensor | None:
        """The text feature the model should use instead of its own LM text forward, or None (text_target lm)."""
        if self.align.text_target == "clip":
            return batch["clip_text"].to(device, non_blocking=True)
        if self.text_cache is None:
            return None
        rows = self.text_cache.rows(batch["sample_ids"], batch["caption_index"])
        if rows is not None:
            return self.text_cache.lookup(rows)
        with torch.no_grad():
            features_BD = captioner.lm_text_features(batch["input_ids"].to(device, non_blocking=True),
                                                     batch["attention_mask"].to(device, non_blocking=True))
        self.text_cache.store(batch["sample_ids"], batch["caption_index"], features_BD)
        return features_BD

    def terms(self, out: dict, batch: dict, clip_BC: torch.Tensor) -> dict[str, torch.Tensor]:
        """ITC / SupCon terms (0-dim) for this micro-batch; remembers the gathered rows for `enqueue`."""
        device = self.ctx.device
        visual_q_bE, text_q_bE = out["visual_embed"], out["text_embed"]
        if self.momentum is not None:
            visual_m_bE, text_m_bE = self.momentum.keys(clip_BC, out["text_feature"])
        else:
            visual_m_bE, text_m_bE = visual_q_bE.detach(), text_q_bE.detach()
        sample_ids_b = batch["sample_ids"].to(device, non_blocking=True)
        labels_bV = multi_hot(batch["label_ids"], self.num_labels, device)
        view = self.bank.view()
        bank_keys = ContrastiveKeys(view["visual"], view["text"], view["sample_ids"], view["labels"], view["valid"])
        keys, own_index_b = build_keys(visual_m_bE, text_m_bE, sample_ids_b, labels_bV, self.ctx, bank_keys)
        gathered = keys.sample_ids_K.shape[0] - self.bank.size
        self.pending_rows = (keys.visual_KD[:gathered], keys.text_KD[:gathered], keys.labels_KV[:gathered], keys.sample_ids_K[:gathered])
        keep_bK, similarity_bK = self.geodesic_masks(visual_q_bE, keys, gathered, own_index_b)
        terms: dict[str, torch.Tensor] = {}
        if self.weights_itc:
            terms.update(itc_loss(
                visual_q_bE, text_q_bE, keys, own_index_b, out["itc_temperature"],
                v2t_keep_bK=keep_bK, t2v_keep_bK=keep_bK,
                distill_alpha=self.align.distill_alpha, visual_m_bD=visual_m_bE, text_m_bD=text_m_bE,
            ))
        if self.weights_supcon:
            terms.update(supcon_loss(
                visual_q_bE, keys, own_index_b, labels_bV, self.align.supcon_temperature,
                positives=self.align.supcon_positives, keep_bK=keep_bK, similarity_bK=similarity_bK, ctx=self.ctx,
            ))
        return terms

    def enqueue(self, step: int) -> None:
        """Put the current micro-batch's gathered rows into the bank; rows with a non-finite value enter invalid."""
        if self.pending_rows is None:
            return
        visual_ME, text_ME, labels_MV, sample_ids_M = self.pending_rows
        finite_M = torch.isfinite(visual_ME).all(dim=1) & torch.isfinite(text_ME).all(dim=1)
        # A NaN key would poison every later loss; such rows keep no id (-1: they enter invalid) and zeros.
        self.bank.enqueue_gathered(
            torch.where(finite_M[:, None], visual_ME, 0.0), torch.where(finite_M[:, None], text_ME, 0.0),
            labels_MV, torch.where(finite_M, sample_ids_M, -1), step,
        )
        self.pending_rows = None

    # -- per optimizer step ----------------------------------------------------------------------

    def after_applied_step(self, captioner, step: int) -> None:
        captioner.heads.clamp_temperature_()
        if self.momentum is not None:
            self.momentum.update(captioner)
        if self.align.uses_geodesic and step % self.align.geodesic_refresh_every == 0:
            self.refresh_geodesics(step)

    def refresh_geodesics(self, step: int) -> None:
        """Rebuild the k-NN graph over the bank's valid entries (the same on every rank: the bank is)."""
        slots_n = torch.nonzero(self.bank.valid_N).flatten()  # host sync: once per refresh
        if slots_n.numel() <= self.align.geodesic_k:
            return  # too few entries for a k-NN graph yet; the masks stay off until the next refresh
        self.build_snapshot(self.bank.visual_ND.index_select(0, slots_n), self.bank.sample_ids_N.index_select(0, slots_n), slots_n, step)

    def build_snapshot(self, nodes_nE: torch.Tensor, node_ids_n: torch.Tensor, slots_n: torch.Tensor, step: int) -> None:
        from vlpdist.geodesic import GeodesicSnapshot

        self.snapshot = GeodesicSnapshot.build(
            nodes_nE, node_ids_n, k=self.align.geodesic_k, backend=self.align.geodesic_backend,
            method=self.align.geodesic_method, num_landmarks=self.align.geodesic_landmarks,
            limit=self.align.geodesic_limit, local_nodes=self.align.geodesic_local_nodes, seed=step,
        )
        self.snapshot_slots_n, self.snapshot_step = slots_n, step
        self.refreshes += 1
        if self.snapshot.stats.get("trusted", 1.0) == 0.0:
            # One line per refresh (rank 0; every rank built the same graph) and a count for the run summary.
            from vlpdist.geodesic.trust import warning_line

            self.untrusted_refreshes += 1
            self.last_untrusted_stats = dict(self.snapshot.stats)
            if self.ctx.rank == 0:
                print(warning_line(self.snapshot.stats, step), flush=True)

    def trust_summary(self) -> dict | None:
        """This launch's graph refreshes and how many `geodesic.trust` flagged, with the last graph's trust
        statistics (for eval.json and the run report); None before any refresh."""
        if not self.refreshes:
            return None
        last = self.snapshot.stats
        return {"refreshes": self.refreshes, "untrusted_refreshes": self.untrusted_refreshes,
                **{f"last_{name}": float(last[name]) for name in ("intrinsic_dimension", "short_range_stretch", "rank_agreement")
                   if name in last}}

    def summary_lines(self) -> list[str]:
        """The end-of-run summary's line on the geodesic graph: how many refreshes built one that cannot follow the bank."""
        summary = self.trust_summary()
        if summary is None:
            return []
        if not self.untrusted_refreshes:
            return [f"geodesics: all {self.refreshes} graph refreshes followed the bank (last: short-range stretch "
                    f"{summary.get('last_short_range_stretch', float('nan')):.2f}, intrinsic dimension "
                    f"{summary.get('last_intrinsic_dimension', float('nan')):.1f})"]
        stats = self.last_untrusted_stats
        return [f"geodesics: {self.untrusted_refreshes} of {self.refreshes} graph refreshes could not follow the bank "
                f"(last: short-range stretch {stats['short_range_stretch']:.2f}, intrinsic dimension "
                f"{stats['intrinsic_dimension']:.1f}); geodesic negatives there were no better than cosine ones"]

    def geodesic_masks(self, visual_q_bE: torch.Tensor, keys: ContrastiveKeys, gathered: int, own_index_b: torch.Tensor):
        """(keep_bK or None, similarity_bK or None) from the geodesic snapshot, per align.negatives /
        false_negatives / metric. In-batch keys (not graph nodes) are always kept and compared by cosine.
        Bank slots the graph does not describe (rewritten since the refresh, invalid) are unknown: never
        removed as false negatives, never picked as hard (hard mode keeps only its picks among bank
        slots), compared by cosine. The keep mask drops negatives only: SupCon keeps its positives."""
        align = self.align
        if not align.uses_geodesic or self.snapshot is None:
            return None, None
        b, device = visual_q_bE.shape[0], visual_q_bE.device
        # Distances need a gradient only when they are logits (through the anchor's first hop).
        with torch.set_grad_enabled(torch.is_grad_enabled() and align.metric == "geodesic"):
            geodesic_bn, reachable_bn = self.snapshot.distances(visual_q_bE.float())
        slots_n = self.snapshot_slots_n
        bank_valid_N = keys.valid_K[gathered:]
        # A node still stands for its slot only while the slot holds the (valid) entry the graph was built from.
        current_n = (self.bank.sample_ids_N.index_select(0, slots_n) == self.snapshot.node_ids_N) & bank_valid_N.index_select(0, slots_n)
        distance_bN = torch.zeros(b, self.bank.size, device=device, dtype=geodesic_bn.dtype).index_copy(1, slots_n, geodesic_bn)
        known_bN = torch.zeros(b, self.bank.size, dtype=torch.bool, device=device)
        known_bN[:, slots_n] = current_n[None, :].expand(b, -1)
        reachable_bN = torch.zeros_like(known_bN)
        reachable_bN[:, slots_n] = reachable_bn & current_n[None, :]
        cosine_bN = visual_q_bE.float() @ keys.visual_KD[gathered:].T  # anchors vs the bank's visual keys
        own_ids_b = keys.sample_ids_K[:gathered][own_index_b]
        usable_bN = bank_valid_N[None, :] & (keys.sample_ids_K[gathered:][None, :] != own_ids_b[:, None])
        keep_bN = torch.ones_like(known_bN)
        if align.false_negatives == "geodesic":
            false_negative_bN = reachable_bN & (distance_bN < align.false_negative_radius)
            keep_bN &= ~false_negative_bN
            # (anchor, bank entry) pairs dropped since the start: a device sum, read at log time, that says whether
            # the radius acts at all.
            self.false_negatives_removed = self.false_negatives_removed + false_negative_bN.sum()
        if align.negatives == "geodesic_hard":
            pool = min(align.hard_negative_pool, self.bank.size)
            # Hard picks come from what false-negative removal left, among slots the graph describes.
            eligible_bN = known_bN & usable_bN & keep_bN
            pool_bP = cosine_bN.masked_fill(~usable_bN, float("-inf")).topk(pool, dim=1).indices
            # Stretch: how much longer the path along the manifold is than the straight chord |a - x|
            # (the graph's own unit), >= 1 up to the anchor's first hop; large = near in space, far on the manifold.
            chord_bP = (2.0 * (1.0 - cosine_bN.gather(1, pool_bP))).clamp(min=1e-12).sqrt()
            stretch_bP = distance_bN.gather(1, pool_bP).float() / chord_bP
            stretch_bP = stretch_bP.masked_fill(~eligible_bN.gather(1, pool_bP), float("-inf"))
            chosen_bH = pool_bP.gather(1, stretch_bP.topk(min(align.hard_negatives, pool), dim=1).indices)
            keep_bN = torch.zeros_like(keep_bN).scatter(1, chosen_bH, True) & eligible_bN
        keep_bK = torch.cat([torch.ones(b, gathered, dtype=torch.bool, device=device), keep_bN], dim=1)
        similarity_bK = None
        if align.metric == "geodesic":
            # Visual-visual similarities: they replace SupCon's logits (ITC stays image-text cosine).
            # One scale for both: a path of chord length d scores 1 - d^2 / 2, which is the cosine itself
            # for a one-hop path (|a - x|^2 = 2 - 2 cos), so graph-known and unknown keys stay comparable.
            batch_cosine_bM = visual_q_bE.float() @ keys.visual_KD[:gathered].T
            bank_similarity_bN = torch.where(known_bN, 1.0 - distance_bN.float().square() / 2.0, cosine_bN)
            similarity_bK = torch.cat([batch_cosine_bM, bank_similarity_bN], dim=1)
        self.known_fraction = known_bN.float().mean()  # logged at log time (a device value until then)
        return keep_bK, similarity_bK

    # -- logging and checkpoints -----------------------------------------------------------------

    def scalars(self) -> dict[str, float]:
        """For TensorBoard at log time (syncs)."""
        scalars = {"align/bank_fill": float(self.bank.fill)}
        if self.text_cache is not None:
            scalars["align/text_cache_rows"] = float(len(self.text_cache.row_of))
        if self.snapshot is not None:
            scalars.update({f"geodesic/{name}": float(value) for name, value in self.snapshot.stats.items()})
            if hasattr(self, "known_fraction"):
                scalars["geodesic/known_fraction"] = float(self.known_fraction)
            if self.align.false_negatives == "geodesic":
                scalars["geodesic/false_negatives_removed"] = float(self.false_negatives_removed)
            scalars["geodesic/snapshot_step"] = float(self.snapshot_step)
        return scalars

    def checkpoint_extras(self) -> list:
        extras = [BankExtra(self)]
        if self.momentum is not None:
            extras.append(MomentumExtra(self.momentum, self.ep_size))
        return extras


class BankExtra:
    """The bank and the geodesic snapshot: identical on every rank, so rank 0 writes them and every rank reads that file."""

    name = "alignment_bank"

    def __init__(self, objective: AlignmentObjective):
        self.objective = objective

    def source_rank(self, rank: int) -> int:
        return 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        objective = self.objective
        state = {f"bank.{key}": value for key, value in objective.bank.state_tensors().items()}
        state["num_labels"] = torch.tensor(objective.num_labels)
        if objective.snapshot is not None:
            # The bank moves on after a refresh, so the graph's nodes cannot be re-read from it.
            state["snapshot.nodes"] = objective.snapshot.nodes_ND.cpu().contiguous()
            state["snapshot.node_ids"] = objective.snapshot.node_ids_N.cpu().contiguous()
            state["snapshot.slots"] = objective.snapshot_slots_n.cpu().contiguous()
            state["snapshot.step"] = torch.tensor(objective.snapshot_step)
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        objective = self.objective
        if int(tensors["num_labels"]) != objective.num_labels:
            raise UserError(f"checkpoint's memory bank has {int(tensors['num_labels'])} labels; the features' vocabulary has {objective.num_labels}")
        objective.bank.load_state_tensors({key[5:]: value for key, value in tensors.items() if key.startswith("bank.")})
        if "snapshot.step" in tensors:
            # The graph is rebuilt from its saved nodes (the same inputs give the same graph).
            device = objective.ctx.device
            objective.build_snapshot(tensors["snapshot.nodes"].to(device), tensors["snapshot.node_ids"].to(device),
                                     tensors["snapshot.slots"].to(device), int(tensors["snapshot.step"]))


class MomentumExtra:
    """The momentum model: its experts differ across an expert-parallel group, its dense part does not,
    so ranks 0..ep_size-1 write and rank r reads rank r % ep_size's file."""

    name = "momentum_model"

    def __init__(self, momentum: MomentumEncoder, ep_size: int):
        self.momentum = momentum
        self.ep_size = ep_size

    def source_rank(self, rank: int) -> int:
        return rank % self.ep_size

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.momentum.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.momentum.load_state_tensors(tensors)
