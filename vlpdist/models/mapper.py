"""Mappers: CLIP embedding (B, C) -> P prefix tokens of the LM width (B, P, D).

Every mapper returns `(prefix_BPD, moe_aux, expert_load_E)` so the captioner treats them alike:

- `MoeMapper`: input projection, then `mapper_depth` pre-norm residual blocks
  `h <- h + gelu(MoE(LN(h)))` whose MoE is DeepSpeed's layer routing *per sample*: the routed
  token is the sample's whole prefix flattened to P*D, and the experts are multi-branch linear
  blocks (`experts.py`), so each block folds exactly into one dense layer (`fold.py`).
- `ClipCapMlpMapper`, `ClipCapTransformerMapper`: ClipCap's two mappers, kept as baselines.

Model code receives `ep_size` and nothing else about distribution: DeepSpeed's engine sets the
expert-parallel groups (`MoE.set_deepspeed_parallelism`) when it wraps the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpdist.config import ModelConfig
from vlpdist.errors import UserError
from vlpdist.models.experts import MultiBranchLinearExpert

MAPPERS = ("moe", "mlp", "transformer")


def check_model_config(cfg: ModelConfig, ep_size: int = 1) -> None:
    """Value checks on the model section that the type system cannot express (UserError)."""
    if cfg.mapper not in MAPPERS:
        raise UserError(f"config key 'model.mapper' is {cfg.mapper!r}; expected one of {list(MAPPERS)}")
    for key in ("prefix_length", "mapper_depth", "num_experts", "max_caption_tokens"):
        if getattr(cfg, key) < 1:
            raise UserError(f"config key 'model.{key}' must be >= 1")
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise UserError(f"config key 'model.top_k' is {cfg.top_k}; expected 1..{cfg.num_experts} (model.num_experts)")
    if not cfg.kernel_sizes or any(size < 1 or size % 2 == 0 for size in cfg.kernel_sizes):
        raise UserError(f"config key 'model.kernel_sizes' is {list(cfg.kernel_sizes)}; expected odd sizes >= 1")
    if cfg.mapper == "moe" and cfg.num_experts % ep_size != 0:
        raise UserError(f"model.num_experts={cfg.num_experts} is not divisible by the expert-parallel size {ep_size}")
    if cfg.eval_drop_tokens and ep_size > 1:
        # Dropping sizes expert capacity from each rank's own batch, and held-out shares differ in
        # size across ranks, so the expert-parallel all-to-all would get tensors of other sizes.
        raise UserError("config key 'model.eval_drop_tokens' must be false when train.ep_size > 1")
    if cfg.min_capacity < 0 or cfg.capacity_factor <= 0 or cfg.eval_capacity_factor <= 0:
        raise UserError("config keys 'model.capacity_factor', 'model.eval_capacity_factor' must be > 0 and 'model.min_capacity' >= 0")


class MoeBlock(nn.Module):
    """`h <- h + gelu(sum_i g_i(x) E_i(x))`, x = LN(h) flattened to one routed token per sample."""

    def __init__(self, cfg: ModelConfig, width: int, ep_size: int):
        # Imported here, not at module top: only training builds an MoE block, and the inference path
        # (the folded mapper, the captioner, the caption command) must import without DeepSpeed installed.
        from deepspeed.moe.layer import MoE

        super().__init__()
        self.prefix_length = cfg.prefix_length
        self.width = width
        self.eval_drop_tokens = cfg.eval_drop_tokens
        self.norm = nn.LayerNorm(width)
        self.moe = MoE(
            hidden_size=cfg.prefix_length * width,
            expert=MultiBranchLinearExpert(cfg.prefix_length, width, list(cfg.kernel_sizes)),
            num_experts=cfg.num_experts,
            ep_size=ep_size,
            k=cfg.top_k,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.eval_capacity_factor,
            min_capacity=cfg.min_capacity,
            drop_tokens=True,
        )
        self.train(True)

    def train(self, mode: bool = True) -> "MoeBlock":
        super().train(mode)
        gate = self.moe.deepspeed_moe.gate
        # Train: capacity-bounded dispatch and DeepSpeed's sampled second expert (k=2).
        # Eval: no dropping and a deterministic top-k, which is exactly what `fold_mapper` computes.
        gate.drop_tokens = mode or self.eval_drop_tokens
        gate.top2_2nd_expert_sampling = mode
        return self

    def forward(self, h_BPD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = h_BPD.shape[0]
        routed_BF, moe_aux, expert_counts_E = self.moe(self.norm(h_BPD).reshape(batch, -1))
        return h_BPD + F.gelu(routed_BF.view_as(h_BPD)), moe_aux, expert_counts_E


class MoeMapper(nn.Module):
    """CLIP (B, C) -> input projection (B, P, D) -> `mapper_depth` routed `MoeBlock`s."""

    def __init__(self, cfg: ModelConfig, clip_dim: int, width: int, ep_size: int = 1):
        super().__init__()
        self.prefix_length = cfg.prefix_length
        self.width = width
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.kernel_sizes = list(cfg.kernel_sizes)
        self.ep_size = ep_size
        self.input_proj = nn.Linear(clip_dim, cfg.prefix_length * width)
        self.blocks = nn.ModuleList(MoeBlock(cfg, width, ep_size) for _ in range(cfg.mapper_depth))

    def forward(self, clip_BC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = clip_BC.shape[0]
        h_BPD = self.input_proj(clip_BC).view(batch, self.prefix_length, self.width)
        moe_aux = h_BPD.new_zeros((), dtype=torch.float32)
        load_E = torch.zeros(self.num_experts, device=h_BPD.device)
        for block in self.blocks:
            h_BPD, block_aux, counts_E = block(h_BPD)
            moe_aux = moe_aux + block_aux
            load_E = load_E + counts_E.to(load_E.device, torch.float32) / batch
        # Fraction of samples sent to each expert, averaged over blocks (sums to top_k).
        return h_BPD, moe_aux, load_E / len(self.blocks)


class ClipCapMlpMapper(nn.Module):
    """ClipCap's MLP mapper: C -> P*D/2 -> tanh -> P*D."""

    def __init__(self, cfg: ModelConfig, clip_dim: int, width: int):
        super().__init__()
        self.prefix_length = cfg.prefix_length
        self.width = width
        hidden = cfg.prefix_length * width // 2
        self.mlp = nn.Sequential(
            nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, cfg.prefix_length * width)
        )

    def forward(self, clip_BC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prefix_BPD = self.mlp(clip_BC).view(clip_BC.shape[0], self.prefix_length, self.width)
        return prefix_BPD, _no_moe_aux(prefix_BPD), prefix_BPD.new_zeros(0)


class ClipCapTransformerMapper(nn.Module):
    """ClipCap's transformer mapper: P projected CLIP tokens + P learned constants -> encoder -> the constants' outputs."""

    def __init__(self, cfg: ModelConfig, clip_dim: int, width: int):
        super().__init__()
        if width % cfg.transformer_heads != 0:
            raise UserError(f"model.transformer_heads={cfg.transformer_heads} does not divide the LM width {width}")
        self.prefix_length = cfg.prefix_length
        self.width = width
        self.input_proj = nn.Linear(clip_dim, cfg.prefix_length * width)
        self.prefix_const = nn.Parameter(torch.randn(cfg.prefix_length, width))
        layer = nn.TransformerEncoderLayer(
            width, cfg.transformer_heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.mapper_depth, enable_nested_tensor=False)

    def forward(self, clip_BC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = clip_BC.shape[0]
        clip_BPD = self.input_proj(clip_BC).view(batch, self.prefix_length, self.width)
        const_BPD = self.prefix_const.unsqueeze(0).expand(batch, -1, -1)
        prefix_BPD = self.encoder(torch.cat([clip_BPD, const_BPD], dim=1))[:, self.prefix_length :]
        return prefix_BPD, _no_moe_aux(prefix_BPD), prefix_BPD.new_zeros(0)


def _no_moe_aux(like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros((), dtype=torch.float32)


def build_mapper(cfg: ModelConfig, clip_dim: int, width: int, ep_size: int = 1) -> nn.Module:
    """The mapper `cfg.mapper` names, from CLIP width `clip_dim` to prefix tokens of width `width`."""
    check_model_config(cfg, ep_size)
    if cfg.mapper == "moe":
        return MoeMapper(cfg, clip_dim, width, ep_size)
    if cfg.mapper == "mlp":
        return ClipCapMlpMapper(cfg, clip_dim, width)
    return ClipCapTransformerMapper(cfg, clip_dim, width)
