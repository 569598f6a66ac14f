"""The expert: a multi-branch *linear* block over a prefix of P tokens of width D.

Branches (RepVGG idea): depthwise token-mixing convolutions of several odd kernel sizes over the
prefix axis, a channel linear, and the identity. Every branch is linear and the nonlinearity sits
outside the expert, so the branches fold into one linear map (`fold_expert`):

    E(h)[p] = A h[p] + sum_j T[j] * h[p + j - K//2] + b        (h: (P, D), zero padded along P)

with A (D, D) = channel weight + I, T (K, D) the sum of the zero-padded depthwise kernels
(K = the largest kernel size) and b (D,) the channel bias.

DeepSpeed routes one sample's whole prefix as one token of width P*D, so `forward` takes
(..., P*D) and reshapes inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class MultiBranchLinearExpert(nn.Module):
    """One expert: identity + channel linear + depthwise token-mixing convs over the prefix axis."""

    def __init__(self, prefix_length: int, width: int, kernel_sizes: list[int]):
        super().__init__()
        self.prefix_length = prefix_length
        self.width = width
        self.channel = nn.Linear(width, width)
        # Start near the identity branch: the block begins as a small perturbation of h.
        nn.init.normal_(self.channel.weight, std=0.02)
        nn.init.zeros_(self.channel.bias)
        self.token_mixers = nn.ModuleList(
            nn.Conv1d(width, width, size, padding=size // 2, groups=width, bias=False) for size in kernel_sizes
        )
        for mixer in self.token_mixers:
            nn.init.normal_(mixer.weight, std=0.02)

    def forward(self, tokens_NF: torch.Tensor) -> torch.Tensor:
        # DeepSpeed hands (..., C, P*D) capacity buffers; work on (N, P, D).
        lead_shape = tokens_NF.shape[:-1]
        h_NPD = tokens_NF.reshape(-1, self.prefix_length, self.width)
        out_NPD = h_NPD + self.channel(h_NPD)
        h_NDP = h_NPD.transpose(1, 2)
        for mixer in self.token_mixers:
            out_NPD = out_NPD + mixer(h_NDP).transpose(1, 2)
        return out_NPD.reshape(*lead_shape, self.prefix_length * self.width)


@dataclass
class FoldedExpert:
    """One expert folded into a single linear map: `A h[p] + sum_j T[j] * h[p+j-K//2] + b`."""

    channel_DD: torch.Tensor  # (D_out, D_in), identity included
    token_kernel_KD: torch.Tensor  # (K, D), all depthwise kernels zero-padded to K and summed
    bias_D: torch.Tensor  # (D,)


def fold_expert(expert: MultiBranchLinearExpert, kernel_size: int) -> FoldedExpert:
    """Fold the branches of `expert` (RepVGG): identity into the channel matrix, kernels into one of size `kernel_size`."""
    width = expert.width
    weight = expert.channel.weight.detach()
    channel_DD = weight + torch.eye(width, dtype=weight.dtype, device=weight.device)
    token_kernel_KD = weight.new_zeros(kernel_size, width)
    for mixer in expert.token_mixers:
        size = mixer.kernel_size[0]
        offset = (kernel_size - size) // 2
        # Conv1d depthwise weight is (D, 1, size); centre-aligned inside the largest kernel.
        token_kernel_KD[offset : offset + size] += mixer.weight.detach()[:, 0, :].T
    return FoldedExpert(channel_DD, token_kernel_KD, expert.channel.bias.detach().clone())
