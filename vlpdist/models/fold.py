"""Exact folding of the trained MoE mapper into the dense inference mapper (CondConv + RepVGG).

Each MoE block computes, per sample, `h + gelu(sum_i g_i(x) E_i(x))` with linear experts E_i.
Folding every expert's branches into one linear map (A_i, T_i, b_i) (`fold_expert`) and mixing
those with the sample's gates gives one dense layer per sample:

    W(x) = sum_i g_i(x) W_i,   y = h + gelu(W(x) x + b(x))

The gates reproduce DeepSpeed's eval-mode routing exactly (`deepspeed_eval_top_k`): softmax of
`x @ wg^T` in fp32, top-k; k = 1 keeps the raw probability, k >= 2 renormalises over the chosen k;
nothing is dropped (eval capacity is unbounded, see `MoeBlock.train`).

The exact fold keeps every expert (E channel matrices per block); only k of them touch a sample.
Of the folded layer, the token kernels T_i (K, D) and biases b_i (D,) are cheap, so they are mixed
per sample in every case. The channel part `sum_i g_i x A_i^T` (P*D^2 per expert and sample) is
evaluated along one of three paths, all exact, all device ops only (no host sync, no Python loop
over experts), picked per shape by `plan_folded_evaluation` from their multiply-add and memory
traffic counts:

- "mixed" (CondConv): A(x) = sum_i g_i A_i per sample, then one bmm. (E + P) D^2 multiply-adds per
  sample, but a (D, D) matrix per sample is written and read back. Pays at small batch, k near E.
- "grouped": the B*k (sample, expert) pairs sorted by expert, then one grouped GEMM
  (`torch._grouped_mm`) over the experts' row ranges: k P D^2 multiply-adds per sample and each
  expert's A_i read once. Where torch has it for the operands (CPU).
- "tiled": the sorted pairs laid into tiles of `pairs_per_tile` pairs of one expert each, one
  bmm over the tiles with one gathered A_i per tile: k P D^2 multiply-adds per sample plus the
  padding of each expert's last tile. The tile count is bounded from the shapes alone, so no count
  reaches the host. One pair per tile is "gather each sample's k experts" (batch 1). For CUDA fp32.

`fold_mapper_static` is the approximate alternative: the gates fixed to their mean over a
calibration set, one dense layer per block (one expert's parameters), no router at all.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlpdist.errors import UserError
from vlpdist.models.experts import fold_expert

FOLDED_WEIGHTS_FILE = "mapper.safetensors"
FOLDED_CONFIG_FILE = "mapper_config.json"
FOLDED_PATHS = ("mixed", "grouped", "tiled")

# The cost model's exchange rates: what memory traffic costs in multiply-adds, for fp32. Measured on
# the CPU (MKL, ~30 GMAC/s per core): a float read in one streaming pass costs ~1 ns, one written
# to a fresh buffer (page faults included) or packed by a GEMM that has few rows to amortise the
# packing over ~2.5 ns. An H200 (~33 TMAC/s fp32 over 4.8 TB/s) sits at ~28 MAC per float moved,
# within a factor ~2 of these; the paths' order only flips near break-even shapes, where they cost
# about the same.
MACS_PER_STREAMED_FLOAT = 32
MACS_PER_WRITTEN_OR_PACKED_FLOAT = 64


@dataclass
class FoldedMapperConfig:
    """Shapes of a folded mapper, written next to its weights."""

    clip_dim: int
    prefix_length: int
    width: int
    depth: int
    num_experts: int  # of the MoE that was folded (a static fold keeps one dense layer per block)
    top_k: int
    kernel_size: int
    static: bool = False  # True: gates fixed to a calibration mean (`fold_mapper_static`), approximate


@dataclass(frozen=True)
class FoldedEvaluationPlan:
    """How a folded block evaluates its channel part for one batch shape, and the modelled cost."""

    path: str  # one of FOLDED_PATHS
    pairs_per_tile: int  # "tiled" only: (sample, expert) pairs per bmm tile; 1 = one gathered expert per pair
    cost: float  # modelled multiply-adds, memory traffic included at the exchange rates above, per block


def grouped_gemm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM takes these operands: eagerly on CPU any float type. Its CUDA kernels,
    and the meta kernel that torch.compile traces with, take bf16/fp16 only, so the fp32 exact fold
    runs the tiled bmm there (as on torch before 2.8, which has no grouped GEMM)."""
    if not hasattr(torch, "_grouped_mm") or torch.compiler.is_compiling():
        return False
    return device.type == "cpu" and dtype.is_floating_point


def grouped_tile_count(pairs: int, experts: int, pairs_per_tile: int) -> int:
    """Tiles that always suffice for `pairs` pairs over `experts` experts: sum_i ceil(c_i / T) <= (N + E (T-1)) / T."""
    return (pairs + experts * (pairs_per_tile - 1)) // pairs_per_tile


def mixed_weights_cost(batch: int, experts: int, prefix: int, width: int) -> float:
    """Mix E (D, D) matrices per sample, then one bmm: B (E + P) D^2 MACs; the E D^2 weights streamed,
    B D^2 mixed weights written, then packed by their (P-row) GEMMs."""
    macs = batch * (experts + prefix) * width**2
    return macs + MACS_PER_STREAMED_FLOAT * experts * width**2 + 2 * MACS_PER_WRITTEN_OR_PACKED_FLOAT * batch * width**2


def _activation_copies_cost(rows: int, prefix: int, width: int) -> float:
    """Gathering `rows` (P, D) inputs for a GEMM and bringing its output back: two copies written and read."""
    return 2 * (MACS_PER_WRITTEN_OR_PACKED_FLOAT + MACS_PER_STREAMED_FLOAT) * rows * prefix * width


def grouped_experts_cost(batch: int, experts: int, top_k: int, prefix: int, width: int) -> float:
    """One grouped GEMM over the N = B k sorted pairs: N P D^2 MACs, each used expert's D^2 packed once."""
    pairs = batch * top_k
    macs = pairs * prefix * width**2
    weights = MACS_PER_WRITTEN_OR_PACKED_FLOAT * min(experts, pairs) * width**2
    return macs + weights + _activation_copies_cost(pairs, prefix, width)


def tiled_experts_cost(batch: int, experts: int, top_k: int, prefix: int, width: int, pairs_per_tile: int) -> float:
    """S tiles of T pairs: S T P D^2 MACs (padding included); per tile a (D, D) streamed, written into the
    gathered stack and packed by the bmm."""
    tiles = grouped_tile_count(batch * top_k, experts, pairs_per_tile)
    macs = tiles * pairs_per_tile * prefix * width**2
    weights = (MACS_PER_STREAMED_FLOAT + 2 * MACS_PER_WRITTEN_OR_PACKED_FLOAT) * tiles * width**2
    return macs + weights + _activation_copies_cost(tiles * pairs_per_tile, prefix, width)


def plan_folded_evaluation(
    batch: int, experts: int, top_k: int, prefix: int, width: int, *, grouped_gemm: bool, path: str | None = None
) -> FoldedEvaluationPlan:
    """The cheapest exact evaluation for this shape under the cost model above, among the paths this
    device has (`grouped_gemm`: see `grouped_gemm_available`), or the cheapest form of `path` if given.

    Tiles are tried at every power of two up to the pair count: small tiles pad little but gather a
    (D, D) matrix per few pairs; large tiles the reverse. "grouped" has neither cost, so where it
    exists it wins unless the batch is so small that reading all the used experts costs more than
    mixing them (k P > E + P in multiply-adds): at E=8, P=10, D=768 it is grouped at every batch
    for k <= 2, and mixed up to batch 4 for k = 8. Without it (CUDA fp32), at k = 2: tiles of 1
    pair at batch 1, mixed at batch 2-16, tiles of 16 pairs at batch 64 and of 64 at batch 1024."""
    if path not in (None, *FOLDED_PATHS):
        raise UserError(f"folded evaluation path {path!r}; expected one of {list(FOLDED_PATHS)}")
    if path == "grouped" and not grouped_gemm:
        raise UserError("folded evaluation path 'grouped' needs torch's grouped GEMM on CPU (torch >= 2.8)")
    plans = []
    if path in (None, "mixed"):
        plans.append(FoldedEvaluationPlan("mixed", 0, mixed_weights_cost(batch, experts, prefix, width)))
    if path in (None, "grouped") and grouped_gemm:
        plans.append(FoldedEvaluationPlan("grouped", 0, grouped_experts_cost(batch, experts, top_k, prefix, width)))
    if path in (None, "tiled"):
        pairs, tile = batch * top_k, 1
        while tile <= pairs:
            plans.append(FoldedEvaluationPlan("tiled", tile, tiled_experts_cost(batch, experts, top_k, prefix, width, tile)))
            tile *= 2
    return min(plans, key=lambda plan: plan.cost)


def sort_pairs_by_expert(top_expert_BK: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order (N,): the N = B k pairs (n = b k + j) stably sorted by expert, count (E,): pairs per expert)."""
    expert_N = top_expert_BK.reshape(-1)
    # index_add_ rather than bincount, whose CUDA kernel reads the maximum back to the host.
    count_E = torch.zeros(experts, dtype=torch.long, device=expert_N.device).index_add_(0, expert_N, torch.ones_like(expert_N))
    return expert_N.argsort(stable=True), count_E


def deepspeed_eval_top_k(logits_BE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate values (B, k) fp32, expert ids (B, k)) of the k chosen experts, as DeepSpeed's TopKGate gives them in eval."""
    probs_BE = F.softmax(logits_BE.float(), dim=1)
    top_gate_BK, top_expert_BK = probs_BE.topk(top_k, dim=1)
    if top_k >= 2:
        top_gate_BK = top_gate_BK / top_gate_BK.sum(dim=1, keepdim=True).clamp(min=torch.finfo(top_gate_BK.dtype).eps)
    return top_gate_BK, top_expert_BK


def deepspeed_eval_gates(logits_BE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-sample gate values (B, E), zero outside the top-k, as DeepSpeed's TopKGate gives them in eval."""
    top_gate_BK, top_expert_BK = deepspeed_eval_top_k(logits_BE, top_k)
    return top_gate_BK.new_zeros(logits_BE.shape).scatter(1, top_expert_BK, top_gate_BK)


def add_token_mix_(y_BPD: torch.Tensor, x_BPD: torch.Tensor, kernel_BKD: torch.Tensor) -> torch.Tensor:
    """y[p] += sum_j T[j] * x[p + j - K//2] in place (x zero padded along P): the depthwise mix over the
    prefix axis, kernel per sample (B, K, D) or shared (1, K, D). In place and without a padded copy,
    because fresh (B, P, D) buffers are what the folded block spends its time on besides the GEMMs."""
    prefix, kernel_size = x_BPD.shape[1], kernel_BKD.shape[1]
    for j in range(kernel_size):
        shift = j - kernel_size // 2
        if abs(shift) >= prefix:
            continue
        first, end = max(0, -shift), prefix - max(0, shift)  # outputs whose input p + shift lies in [0, P)
        y_BPD[:, first:end].addcmul_(x_BPD[:, first + shift : end + shift], kernel_BKD[:, j : j + 1])
    return y_BPD


class FoldedBlock(nn.Module):
    """One MoE block folded exactly: the gate and the E folded experts, stacked; W(x) x is evaluated per sample."""

    def __init__(self, cfg: FoldedMapperConfig):
        super().__init__()
        self.prefix_length = cfg.prefix_length
        self.top_k = cfg.top_k
        self.kernel_size = cfg.kernel_size
        experts, width = cfg.num_experts, cfg.width
        self.norm = nn.LayerNorm(width)
        self.gate_weight = nn.Parameter(torch.zeros(experts, cfg.prefix_length * width))  # (E, P*D)
        self.channel = nn.Parameter(torch.zeros(experts, width, width))  # (E, D_out, D_in)
        self.token_kernel = nn.Parameter(torch.zeros(experts, cfg.kernel_size, width))  # (E, K, D)
        self.bias = nn.Parameter(torch.zeros(experts, width))  # (E, D)

    def route(self, x_BPD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate values (B, k), expert ids (B, k)) for the normalised block input x (B, P, D), in x's dtype."""
        logits_BE = F.linear(x_BPD.reshape(x_BPD.shape[0], -1).float(), self.gate_weight.float())
        top_gate_BK, top_expert_BK = deepspeed_eval_top_k(logits_BE, self.top_k)
        return top_gate_BK.to(x_BPD.dtype), top_expert_BK

    def forward(self, h_BPD: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + gelu(W(x) x + b(x)) (B, P, D), samples per expert (E,)); `path` forces one of FOLDED_PATHS."""
        batch, prefix, width = h_BPD.shape
        experts = self.channel.shape[0]
        x_BPD = self.norm(h_BPD)
        top_gate_BK, top_expert_BK = self.route(x_BPD)
        gates_BE = top_gate_BK.new_zeros(batch, experts).scatter(1, top_expert_BK, top_gate_BK)
        grouped_gemm = grouped_gemm_available(x_BPD.device, x_BPD.dtype)
        plan = plan_folded_evaluation(batch, experts, self.top_k, prefix, width, grouped_gemm=grouped_gemm, path=path)
        if plan.path == "mixed":
            y_BPD = self._apply_mixed_channels(x_BPD, gates_BE)
        elif plan.path == "grouped":
            y_BPD = self._apply_grouped_channels(x_BPD, top_gate_BK, top_expert_BK)
        else:
            y_BPD = self._apply_tiled_channels(x_BPD, top_gate_BK, top_expert_BK, plan.pairs_per_tile)
        # Kernels and biases are E*(K+1)*D numbers: mixing them per sample costs next to nothing.
        # y_BPD is each path's own fresh buffer, so the rest accumulates into it in place.
        kernel_BKD = (gates_BE @ self.token_kernel.flatten(1)).view(batch, self.kernel_size, width)
        add_token_mix_(y_BPD.add_((gates_BE @ self.bias).unsqueeze(1)), x_BPD, kernel_BKD)
        return F.gelu(y_BPD).add_(h_BPD), (gates_BE > 0).float().sum(dim=0)

    def _apply_mixed_channels(self, x_BPD: torch.Tensor, gates_BE: torch.Tensor) -> torch.Tensor:
        """CondConv: each sample's channel matrix A(x) = sum_i g_i A_i (B, D, D), then one bmm -> (B, P, D)."""
        batch, _, width = x_BPD.shape
        channel_BDD = (gates_BE @ self.channel.flatten(1)).view(batch, width, width)
        return torch.bmm(x_BPD, channel_BDD.transpose(1, 2))

    def _apply_grouped_channels(self, x_BPD: torch.Tensor, top_gate_BK: torch.Tensor, top_expert_BK: torch.Tensor) -> torch.Tensor:
        """sum_j g_bj x_b A_{e_bj}^T (B, P, D): the pairs' rows sorted by expert, one grouped GEMM over the E experts."""
        batch, prefix, width = x_BPD.shape
        top_k = top_expert_BK.shape[1]
        order_N, count_E = sort_pairs_by_expert(top_expert_BK, self.channel.shape[0])
        # Sorted pair m is sample order_N[m] // k; expert e owns rows [P * sum_{i<e} c_i, P * sum_{i<=e} c_i).
        sorted_sample_N = order_N // top_k
        x_NPD = x_BPD.index_select(0, sorted_sample_N)
        x_NPD.mul_(top_gate_BK.reshape(-1)[order_N].view(-1, 1, 1))  # g x A^T = (g x) A^T: scale the copy
        row_end_E = (count_E.cumsum(0) * prefix).to(torch.int32)
        out_RD = torch._grouped_mm(x_NPD.view(-1, width), self.channel.transpose(1, 2), offs=row_end_E)  # R = N P rows
        # CPU only (see grouped_gemm_available), where index_add_ sums each sample's k rows in order.
        return x_BPD.new_zeros(batch, prefix, width).index_add_(0, sorted_sample_N, out_RD.view(-1, prefix, width))

    def _apply_tiled_channels(
        self, x_BPD: torch.Tensor, top_gate_BK: torch.Tensor, top_expert_BK: torch.Tensor, pairs_per_tile: int
    ) -> torch.Tensor:
        """sum_j g_bj x_b A_{e_bj}^T (B, P, D): pairs sorted by expert into tiles of one expert, one bmm over tiles."""
        batch, prefix, width = x_BPD.shape
        experts, top_k = self.channel.shape[0], top_expert_BK.shape[1]
        pairs, device = batch * top_k, x_BPD.device
        tiles = grouped_tile_count(pairs, experts, pairs_per_tile)  # from shapes: no count leaves the device
        order_N, count_E = sort_pairs_by_expert(top_expert_BK, experts)
        tiles_E = (count_E + pairs_per_tile - 1) // pairs_per_tile
        tile_end_E = tiles_E.cumsum(0)
        sorted_expert_N = top_expert_BK.reshape(pairs)[order_N]
        # Slot of the r-th pair of expert e: its first tile's first slot + r, r = sorted position - run start.
        rank_N = torch.arange(pairs, device=device) - (count_E.cumsum(0) - count_E)[sorted_expert_N]
        sorted_slot_N = (tile_end_E - tiles_E)[sorted_expert_N] * pairs_per_tile + rank_N
        slot_N = torch.empty_like(sorted_slot_N).scatter_(0, order_N, sorted_slot_N)  # pair n's slot
        # Padding slots read sample 0 with gate 0 and are never read back; tiles past the last expert's
        # reuse expert E-1.
        slots = tiles * pairs_per_tile
        sample_N = torch.arange(pairs, device=device) // top_k
        slot_sample_S = torch.zeros(slots, dtype=torch.long, device=device).scatter_(0, slot_N, sample_N)
        slot_gate_S = top_gate_BK.new_zeros(slots).scatter_(0, slot_N, top_gate_BK.reshape(pairs))
        tile_expert_G = torch.searchsorted(tile_end_E, torch.arange(tiles, device=device), right=True).clamp_(max=experts - 1)
        x_SPD = x_BPD.index_select(0, slot_sample_S).mul_(slot_gate_S.view(slots, 1, 1))  # g x A^T = (g x) A^T
        channel_GDD = self.channel.index_select(0, tile_expert_G)  # one expert's (D_out, D_in) per tile
        out_GRD = torch.bmm(x_SPD.view(tiles, pairs_per_tile * prefix, width), channel_GDD.transpose(1, 2))
        # A gather and a sum over k rather than index_add_, whose CUDA atomics would add in any order.
        return out_GRD.view(slots, prefix, width).index_select(0, slot_N).view(batch, top_k, prefix, width).sum(dim=1)


class StaticFoldedBlock(nn.Module):
    """One block folded with fixed gates: `h + gelu(A x + b + T * x)`, a single dense layer and no router."""

    def __init__(self, cfg: FoldedMapperConfig):
        super().__init__()
        width = cfg.width
        self.norm = nn.LayerNorm(width)
        self.channel = nn.Parameter(torch.zeros(width, width))  # (D_out, D_in)
        self.token_kernel = nn.Parameter(torch.zeros(cfg.kernel_size, width))  # (K, D)
        self.bias = nn.Parameter(torch.zeros(width))  # (D,)

    def forward(self, h_BPD: torch.Tensor) -> torch.Tensor:
        x_BPD = self.norm(h_BPD)
        y_BPD = add_token_mix_(F.linear(x_BPD, self.channel, self.bias), x_BPD, self.token_kernel.unsqueeze(0))
        return F.gelu(y_BPD).add_(h_BPD)


class DenseFoldedMapper(nn.Module):
    """The inference mapper: the MoE mapper's eval outputs (exactly, or approximately when `config.static`)."""

    def __init__(self, cfg: FoldedMapperConfig):
        super().__init__()
        self.config = cfg
        self.prefix_length = cfg.prefix_length
        self.width = cfg.width
        self.num_experts = cfg.num_experts
        self.input_proj = nn.Linear(cfg.clip_dim, cfg.prefix_length * cfg.width)
        block_type = StaticFoldedBlock if cfg.static else FoldedBlock
        self.blocks = nn.ModuleList(block_type(cfg) for _ in range(cfg.depth))

    def forward(self, clip_BC: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prefix (B, P, D), zero aux loss, expert load (E,), empty when static); `path` forces an exact path."""
        batch = clip_BC.shape[0]
        h_BPD = self.input_proj(clip_BC).view(batch, self.prefix_length, self.width)
        no_aux = h_BPD.new_zeros((), dtype=torch.float32)
        if self.config.static:
            for block in self.blocks:
                h_BPD = block(h_BPD)
            return h_BPD, no_aux, h_BPD.new_zeros(0)
        load_E = torch.zeros(self.num_experts, device=h_BPD.device)
        for block in self.blocks:
            h_BPD, counts_E = block(h_BPD, path)
            load_E = load_E + counts_E / batch
        return h_BPD, no_aux, load_E / len(self.blocks)


def count_folded_parameters(folded: DenseFoldedMapper) -> dict[str, int]:
    """{"stored": every parameter, "per_sample": those one sample's forward reads (k of the E experts)}."""
    stored = sum(param.numel() for param in folded.parameters())
    if folded.config.static:
        return {"stored": stored, "per_sample": stored}
    cfg = folded.config
    expert_params = cfg.width * cfg.width + cfg.kernel_size * cfg.width + cfg.width
    unused = cfg.depth * (cfg.num_experts - cfg.top_k) * expert_params
    return {"stored": stored, "per_sample": stored - unused}


@torch.no_grad()
def fold_mapper(mapper: nn.Module) -> DenseFoldedMapper:
    """Fold a `MoeMapper` holding all its experts (ep_size 1) into a `DenseFoldedMapper` (fp32, eval mode)."""
    if mapper.ep_size != 1:
        raise UserError(
            f"fold_mapper needs every expert in one process; this mapper holds 1/{mapper.ep_size} of them: "
            "load the consolidated state at ep_size=1 first"
        )
    kernel_size = max(mapper.kernel_sizes)
    cfg = FoldedMapperConfig(
        clip_dim=mapper.input_proj.in_features,
        prefix_length=mapper.prefix_length,
        width=mapper.width,
        depth=len(mapper.blocks),
        num_experts=mapper.num_experts,
        top_k=mapper.top_k,
        kernel_size=kernel_size,
    )
    folded = DenseFoldedMapper(cfg).to(mapper.input_proj.weight.device)
    folded.input_proj.load_state_dict(mapper.input_proj.state_dict())
    for moe_block, folded_block in zip(mapper.blocks, folded.blocks):
        folded_block.norm.load_state_dict(moe_block.norm.state_dict())
        folded_block.gate_weight.copy_(moe_block.moe.deepspeed_moe.gate.wg.weight)
        experts = [fold_expert(expert, kernel_size) for expert in moe_block.moe.deepspeed_moe.experts.deepspeed_experts]
        folded_block.channel.copy_(torch.stack([e.channel_DD for e in experts]))
        folded_block.token_kernel.copy_(torch.stack([e.token_kernel_KD for e in experts]))
        folded_block.bias.copy_(torch.stack([e.bias_D for e in experts]))
    return folded.eval()


@torch.no_grad()
def calibration_mean_gates(exact: DenseFoldedMapper, calibration_clip_NC: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """(depth, E): each block's gates (zero outside the top-k) averaged over the calibration embeddings,
    with every block fed what the exact mapper feeds it."""
    cfg = exact.config
    gate_sum_LE = torch.zeros(cfg.depth, cfg.num_experts, device=calibration_clip_NC.device)
    for clip_BC in calibration_clip_NC.split(batch_size):
        batch = clip_BC.shape[0]
        h_BPD = exact.input_proj(clip_BC).view(batch, cfg.prefix_length, cfg.width)
        for layer, block in enumerate(exact.blocks):
            top_gate_BK, top_expert_BK = block.route(block.norm(h_BPD))
            gate_sum_LE[layer].index_add_(0, top_expert_BK.reshape(-1), top_gate_BK.reshape(-1).float())
            h_BPD = block(h_BPD)[0]
    return gate_sum_LE / calibration_clip_NC.shape[0]


@torch.no_grad()
def fold_mapper_static(mapper: nn.Module, calibration_clip_NC: torch.Tensor) -> DenseFoldedMapper:
    """A static fold (approximate): per block, the one dense layer `sum_i gbar_i W_i` with gbar the block's
    gates averaged over `calibration_clip_NC` (N, C). `mapper`: an `MoeMapper` or its exact fold.
    Exact when every sample routes alike; `measure_static_fold_error` says how far it is otherwise."""
    exact = mapper if isinstance(mapper, DenseFoldedMapper) else fold_mapper(mapper)
    if exact.config.static:
        raise UserError("fold_mapper_static needs the MoE mapper or its exact fold, not a static fold")
    if calibration_clip_NC.ndim != 2 or calibration_clip_NC.shape[0] == 0:
        raise UserError(f"calibration CLIP embeddings must be a non-empty (N, C) tensor, got {tuple(calibration_clip_NC.shape)}")
    exact = exact.eval()
    mean_gates_LE = calibration_mean_gates(exact, calibration_clip_NC.to(exact.input_proj.weight))
    static = DenseFoldedMapper(replace(exact.config, static=True)).to(exact.input_proj.weight.device)
    static.input_proj.load_state_dict(exact.input_proj.state_dict())
    for exact_block, static_block, gates_E in zip(exact.blocks, static.blocks, mean_gates_LE):
        static_block.norm.load_state_dict(exact_block.norm.state_dict())
        static_block.channel.copy_(torch.einsum("e,eoi->oi", gates_E, exact_block.channel))
        static_block.token_kernel.copy_(torch.einsum("e,ekd->kd", gates_E, exact_block.token_kernel))
        static_block.bias.copy_(gates_E @ exact_block.bias)
    return static.eval()


@torch.no_grad()
def measure_static_fold_error(exact: DenseFoldedMapper, static: DenseFoldedMapper, heldout_clip_NC: torch.Tensor) -> float:
    """||static(x) - exact(x)|| / ||exact(x)|| over held-out CLIP embeddings (N, C): what fixing the gates costs."""
    expected_NPD = exact.eval()(heldout_clip_NC)[0]
    return float((static.eval()(heldout_clip_NC)[0] - expected_NPD).norm() / expected_NPD.norm())


def save_folded_mapper(folded: DenseFoldedMapper, out_dir: str | Path, extra_config: dict | None = None) -> Path:
    """Write `mapper.safetensors` + `mapper_config.json` into `out_dir` (each atomically)."""
    from safetensors.torch import save

    from vlpdist.atomic import atomic_write_bytes, atomic_write_json

    out_dir = Path(out_dir)
    tensors = {name: value.detach().contiguous().cpu() for name, value in folded.state_dict().items()}
    atomic_write_bytes(out_dir / FOLDED_WEIGHTS_FILE, save(tensors))
    atomic_write_json(out_dir / FOLDED_CONFIG_FILE, {"folded_mapper": asdict(folded.config), **(extra_config or {})})
    return out_dir


def load_folded_mapper(export_dir: str | Path) -> DenseFoldedMapper:
    """Read back what `save_folded_mapper` wrote, exact or static (safetensors only: no unpickling)."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    weights, config = export_dir / FOLDED_WEIGHTS_FILE, export_dir / FOLDED_CONFIG_FILE
    for path in (weights, config):
        if not path.is_file():
            raise UserError(f"{path} does not exist: not a folded-mapper export folder")
    folded = DenseFoldedMapper(FoldedMapperConfig(**json.loads(config.read_text())["folded_mapper"]))
    folded.load_state_dict(load_file(str(weights)))
    return folded.eval()
