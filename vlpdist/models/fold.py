"""Exact folding of the trained MoE mapper into the dense inference mapper (CondConv + RepVGG).

Each MoE block computes, per sample, `h + gelu(sum_i g_i(x) E_i(x))` with linear experts E_i.
Folding every expert's branches into one linear map (A_i, T_i, b_i) (`fold_expert`) and mixing
those with the sample's gates gives one dense layer per sample:

    W(x) = sum_i g_i(x) W_i,   y = h + gelu(W(x) x + b(x))

The gates reproduce DeepSpeed's eval-mode routing exactly (`deepspeed_eval_gates`): softmax of
`x @ wg^T` in fp32, top-k; k = 1 keeps the raw probability, k >= 2 renormalises over the chosen k;
nothing is dropped (eval capacity is unbounded, see `MoeBlock.train`).

`W(x) x` is evaluated whichever way is cheaper: by mixing the weights per sample (CondConv; pays
when k is large) or by applying each sample's k folded experts (one matmul each instead of the
expert's several branches, and no capacity buffers or dispatch).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlpdist.errors import UserError
from vlpdist.models.experts import fold_expert

FOLDED_WEIGHTS_FILE = "mapper.safetensors"
FOLDED_CONFIG_FILE = "mapper_config.json"


@dataclass
class FoldedMapperConfig:
    """Shapes of a folded mapper, written next to its weights."""

    clip_dim: int
    prefix_length: int
    width: int
    depth: int
    num_experts: int
    top_k: int
    kernel_size: int


def deepspeed_eval_gates(logits_BE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-sample gate values (B, E), zero outside the top-k, as DeepSpeed's TopKGate gives them in eval."""
    probs_BE = F.softmax(logits_BE.float(), dim=1)
    top_p_BK, top_idx_BK = probs_BE.topk(top_k, dim=1)
    if top_k >= 2:
        top_p_BK = top_p_BK / top_p_BK.sum(dim=1, keepdim=True).clamp(min=torch.finfo(top_p_BK.dtype).eps)
    return torch.zeros_like(probs_BE).scatter(1, top_idx_BK, top_p_BK)


class FoldedBlock(nn.Module):
    """One MoE block folded: the gate and the E folded experts, stacked; W(x) x is evaluated per sample."""

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

    def forward(self, h_BPD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = h_BPD.shape[0]
        x_BPD = self.norm(h_BPD)
        gates_BE = deepspeed_eval_gates(F.linear(x_BPD.reshape(batch, -1).float(), self.gate_weight.float()), self.top_k)
        gates_BE = gates_BE.to(x_BPD.dtype)
        # Same W(x) x either way; pick the cheaper evaluation. Mixing the weights costs E*D^2 + P*D^2
        # multiply-adds per sample, applying the k chosen folded experts one by one k*P*D^2.
        experts = gates_BE.shape[1]
        if experts + self.prefix_length < self.top_k * self.prefix_length:
            y_BPD = self._apply_mixed_weights(x_BPD, gates_BE)
        else:
            y_BPD = self._apply_chosen_experts(x_BPD, gates_BE)
        return h_BPD + F.gelu(y_BPD), (gates_BE > 0).float().sum(dim=0)

    def _apply_mixed_weights(self, x_BPD: torch.Tensor, gates_BE: torch.Tensor) -> torch.Tensor:
        """CondConv: build each sample's layer W(x) = sum_i g_i(x) W_i, then apply it."""
        batch, _, width = x_BPD.shape
        channel_BDD = (gates_BE @ self.channel.flatten(1)).view(batch, width, width)
        kernel_BKD = (gates_BE @ self.token_kernel.flatten(1)).view(batch, self.kernel_size, width)
        y_BPD = torch.bmm(x_BPD, channel_BDD.transpose(1, 2)) + (gates_BE @ self.bias).unsqueeze(1)
        return y_BPD + self._token_mix(x_BPD, kernel_BKD)

    def _apply_chosen_experts(self, x_BPD: torch.Tensor, gates_BE: torch.Tensor) -> torch.Tensor:
        """sum_i g_i(x) (W_i x): each folded expert (one matmul + one depthwise mix) on the samples that chose it."""
        y_BPD = torch.zeros_like(x_BPD)
        for expert in range(gates_BE.shape[1]):
            rows = gates_BE[:, expert].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            x_RPD = x_BPD[rows]
            out_RPD = x_RPD @ self.channel[expert].T + self.bias[expert]
            out_RPD = out_RPD + self._token_mix(x_RPD, self.token_kernel[expert].unsqueeze(0))
            y_BPD.index_add_(0, rows, out_RPD * gates_BE[rows, expert].view(-1, 1, 1))
        return y_BPD

    def _token_mix(self, x_BPD: torch.Tensor, kernel_BKD: torch.Tensor) -> torch.Tensor:
        """Depthwise mixing over the prefix axis (zero padded), kernel per sample (B, K, D) or shared (1, K, D)."""
        prefix, pad = x_BPD.shape[1], self.kernel_size // 2
        padded = F.pad(x_BPD, (0, 0, pad, pad))  # (B, P + K - 1, D)
        return sum(padded[:, j : j + prefix] * kernel_BKD[:, j].unsqueeze(1) for j in range(self.kernel_size))


class DenseFoldedMapper(nn.Module):
    """The inference mapper: same outputs as the MoE mapper in eval mode, one dense layer per block and sample."""

    def __init__(self, cfg: FoldedMapperConfig):
        super().__init__()
        self.config = cfg
        self.prefix_length = cfg.prefix_length
        self.width = cfg.width
        self.num_experts = cfg.num_experts
        self.input_proj = nn.Linear(cfg.clip_dim, cfg.prefix_length * cfg.width)
        self.blocks = nn.ModuleList(FoldedBlock(cfg) for _ in range(cfg.depth))

    def forward(self, clip_BC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = clip_BC.shape[0]
        h_BPD = self.input_proj(clip_BC).view(batch, self.prefix_length, self.width)
        load_E = torch.zeros(self.num_experts, device=h_BPD.device)
        for block in self.blocks:
            h_BPD, counts_E = block(h_BPD)
            load_E = load_E + counts_E / batch
        return h_BPD, h_BPD.new_zeros((), dtype=torch.float32), load_E / len(self.blocks)


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
    """Read back what `save_folded_mapper` wrote (safetensors only: no unpickling)."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    weights, config = export_dir / FOLDED_WEIGHTS_FILE, export_dir / FOLDED_CONFIG_FILE
    for path in (weights, config):
        if not path.is_file():
            raise UserError(f"{path} does not exist: not a folded-mapper export folder")
    folded = DenseFoldedMapper(FoldedMapperConfig(**json.loads(config.read_text())["folded_mapper"]))
    folded.load_state_dict(load_file(str(weights)))
    return folded.eval()
