"""The momentum (EMA) copy of the mapper and the alignment heads that fills the memory bank (MoCo, ALBEF).

Bank entries of different steps stay comparable because the copy moves slowly:
`p_m <- m p_m + (1 - m) p` after every applied optimizer step. The copy is taken from the online
module on each rank, so an expert-parallel mapper's copy holds this rank's experts, sharded like
the online ones, and its forward takes part in the same expert all-to-all. It runs in eval mode
(no capacity dropping; with top_k 1 DeepSpeed's gate still draws its random token selection from
the torch RNG, which the checkpoint restores, so resume stays exact) and keeps fp32 weights
whatever precision the online model trains in: a bf16 EMA with m = 0.995 would round most
updates away. It follows the online module's weights (bf16 on GPUs), not the optimizer's fp32
master copy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def copy_sharing_process_groups(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose submodules keep the same process groups: DeepSpeed's MoE layers
    hold their expert-parallel group, which cannot be copied (nor should it: the copy's experts
    talk over the same group)."""
    import torch.distributed as dist

    memo = {}
    for submodule in module.modules():
        for value in vars(submodule).values():
            if isinstance(value, dist.ProcessGroup):
                memo[id(value)] = value
    return copy.deepcopy(module, memo)


class MomentumEncoder:
    """EMA copies of `captioner.mapper` and `captioner.heads`; not part of the engine (no gradients, no optimizer)."""

    def __init__(self, captioner: nn.Module, momentum: float):
        self.momentum = momentum
        self.mapper = copy_sharing_process_groups(captioner.mapper).float().eval().requires_grad_(False)
        self.heads = copy.deepcopy(captioner.heads).float().eval().requires_grad_(False)
        # EMA steps taken: one per applied optimizer step, none for a skipped one (saved with the weights).
        self.updates = 0

    def modules(self) -> dict[str, nn.Module]:
        return {"mapper": self.mapper, "heads": self.heads}

    @torch.no_grad()
    def keys(self, clip_BC: torch.Tensor, text_feature_BDt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual_BE, text_BE) unit-norm keys of the momentum model for a batch."""
        prefix_BPD, _, _ = self.mapper(clip_BC.float())
        return self.heads.visual_embed(prefix_BPD), self.heads.text_embed(text_feature_BDt.detach())

    @torch.no_grad()
    def update(self, captioner: nn.Module) -> None:
        """One EMA step towards the online mapper and heads (call after each applied optimizer step)."""
        for name, module in self.modules().items():
            online = dict(getattr(captioner, name).named_parameters())
            momentum_params = [param for _, param in module.named_parameters()]
            online_params = [online[param_name].detach().float() for param_name, _ in module.named_parameters()]
            torch._foreach_lerp_(momentum_params, online_params, 1.0 - self.momentum)
        self.updates += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"{name}.{key}": value.detach().cpu().contiguous() for name, module in self.modules().items()
                   for key, value in module.state_dict().items()}
        return {**tensors, "updates": torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.updates = int(tensors["updates"]) if "updates" in tensors else 0
        for name, module in self.modules().items():
            prefix = f"{name}."
            module.load_state_dict({key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)})
