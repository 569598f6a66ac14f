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
import torch.nn.functional as F
from torch import nn


class MultiBranchLinearExpert(nn.Module):
    """One expert: identity + channel linear + depthwise token-mixing convs over the prefix axis.

    The convs are parameters (Conv1d modules, so checkpoints name them as branches); the forward
    applies their summed kernel (`token_kernel`) once, which is the same linear map."""

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

    def token_kernel(self, kernel_size: int | None = None) -> torch.Tensor:
        """The depthwise kernels zero-padded to `kernel_size` (default: the largest), centre-aligned
        and summed: (K, D). Differentiable, so training applies all token-mixing branches as one."""
        kernel_size = kernel_size or max(mixer.kernel_size[0] for mixer in self.token_mixers)
        kernel_KD = self.channel.weight.new_zeros(kernel_size, self.width)
        for mixer in self.token_mixers:
            size = mixer.kernel_size[0]
            offset = (kernel_size - size) // 2
            # Conv1d's depthwise weight is (D, 1, size).
            kernel_KD = kernel_KD + F.pad(mixer.weight[:, 0, :].T, (0, 0, offset, kernel_size - size - offset))
        return kernel_KD

    def forward(self, tokens_NF: torch.Tensor) -> torch.Tensor:
        # DeepSpeed hands (..., C, P*D) capacity buffers; work on (N, P, D).
        lead_shape = tokens_NF.shape[:-1]
        h_NPD = tokens_NF.reshape(-1, self.prefix_length, self.width)
        out_NPD = h_NPD + self.channel(h_NPD) + token_mix(h_NPD, self.token_kernel())
        return out_NPD.reshape(*lead_shape, self.prefix_length * self.width)


def token_mix(h_NPD: torch.Tensor, kernel_KD: torch.Tensor) -> torch.Tensor:
    """out[p] = sum_j T[j] * h[p + j - K//2], h zero padded along P: the depthwise token mix as K
    shifted multiply-adds. Same sums as the Conv1d branches, but at a prefix of ~10 tokens a handful
    of elementwise ops cost a fraction of one oneDNN depthwise convolution (forward and backward)."""
    prefix, kernel_size = h_NPD.shape[1], kernel_KD.shape[0]
    half = kernel_size // 2
    padded_NQD = F.pad(h_NPD, (0, 0, half, half))  # Q = P + 2 * half
    out_NPD = padded_NQD[:, :prefix] * kernel_KD[0]
    for j in range(1, kernel_size):
        out_NPD = out_NPD + padded_NQD[:, j : j + prefix] * kernel_KD[j]
    return out_NPD


@dataclass
class FoldedExpert:
    """One expert folded into a single linear map: `A h[p] + sum_j T[j] * h[p+j-K//2] + b`."""

    channel_DD: torch.Tensor  # (D_out, D_in), identity included
    token_kernel_KD: torch.Tensor  # (K, D), all depthwise kernels zero-padded to K and summed
    bias_D: torch.Tensor  # (D,)


def fold_expert(expert: MultiBranchLinearExpert, kernel_size: int) -> FoldedExpert:
    """Fold the branches of `expert` (RepVGG): identity into the channel matrix, kernels into one of size `kernel_size`."""
    weight = expert.channel.weight.detach()
    channel_DD = weight + torch.eye(expert.width, dtype=weight.dtype, device=weight.device)
    return FoldedExpert(channel_DD, expert.token_kernel(kernel_size).detach(), expert.channel.bias.detach().clone())
