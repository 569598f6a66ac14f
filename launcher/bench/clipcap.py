"""ClipCap's training step as its code (github.com/rmokady/CLIP_prefix_caption, `train.py`) runs it,
for the benchmark's baseline rows; written here from its description, not copied.

What its `--only_prefix --mapping_type transformer` run does each step, reproduced:
- the mapper is its `TransformerMapper`: a linear map of the CLIP embedding to `clip_length` tokens,
  `prefix_length` learned constant tokens after them, a `num_layers` transformer over both (8 heads,
  pre-norm, attention projections without bias, MLP ratio 2 with ReLU), and the constant tokens'
  outputs are the prefix; its COCO recipe is prefix 40, clip length 40, 8 layers;
- GPT-2 is "frozen" the way `ClipCaptionPrefix` freezes it: left out of the optimizer and put in eval
  mode (no dropout), but its weights keep `requires_grad`, so the backward computes (and
  accumulates) their gradients — that is part of its step's cost, and `lm_weight_grads=False`
  measures the step without it;
- the LM computes logits at every position of [prefix | caption] and the loss is the cross-entropy
  of the caption positions' logits (no `logits_to_keep`);
- `model.zero_grad()`, forward, backward, `optimizer.step()`, the linear warm-up scheduler's step,
  `optimizer.zero_grad()`.
The optimizer is built as a copy of the one it is compared with (same class and settings, so fused
vs unfused is the same on both sides); its code uses AdamW.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F

RECIPE = {"prefix_length": 40, "clip_length": 40, "num_layers": 8}  # its COCO transformer-mapper command line
HEADS = 8
MLP_RATIO = 2


class _SelfAttention(nn.Module):
    """Its multi-head attention over one sequence: queries and keys/values without bias, an output projection with."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.to_queries = nn.Linear(width, width, bias=False)
        self.to_keys_values = nn.Linear(width, 2 * width, bias=False)
        self.project = nn.Linear(width, width)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        batch, length, width = x_BLD.shape
        head_width = width // self.heads
        queries_BLHd = self.to_queries(x_BLD).reshape(batch, length, self.heads, head_width)
        keys_values = self.to_keys_values(x_BLD).reshape(batch, length, 2, self.heads, head_width)
        keys_BLHd, values_BLHd = keys_values[:, :, 0], keys_values[:, :, 1]
        # The einsum layout of its code (attention as b, n, m, h; softmax over the keys).
        attention_BLMH = (torch.einsum("bnhd,bmhd->bnmh", queries_BLHd, keys_BLHd) * self.scale).softmax(dim=2)
        out_BLD = torch.einsum("bnmh,bmhd->bnhd", attention_BLMH, values_BLHd).reshape(batch, length, width)
        return self.project(out_BLD)


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(width), _SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, MLP_RATIO * width), nn.ReLU(), nn.Linear(MLP_RATIO * width, width))

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_BLD = x_BLD + self.attention(self.norm1(x_BLD))
        return x_BLD + self.mlp(self.norm2(x_BLD))


class ClipCapTransformerMapper(nn.Module):
    """CLIP embedding (B, C) -> prefix (B, prefix_length, D), as its `TransformerMapper` computes it."""

    def __init__(self, clip_dim: int, width: int, prefix_length: int, clip_length: int, num_layers: int):
        super().__init__()
        self.clip_length = clip_length
        self.linear = nn.Linear(clip_dim, clip_length * width)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, width))
        self.layers = nn.ModuleList(_Layer(width, HEADS) for _ in range(num_layers))

    def forward(self, clip_BC: torch.Tensor) -> torch.Tensor:
        tokens_BLD = self.linear(clip_BC).view(clip_BC.shape[0], self.clip_length, -1)
        constant_BPD = self.prefix_const.unsqueeze(0).expand(clip_BC.shape[0], *self.prefix_const.shape)
        x_BLD = torch.cat((tokens_BLD, constant_BPD), dim=1)
        for layer in self.layers:
            x_BLD = layer(x_BLD)
        return x_BLD[:, self.clip_length:]


def optimizer_like(reference: torch.optim.Optimizer, params, lr: float) -> torch.optim.Optimizer:
    """A new optimizer of `reference`'s class and settings (fused, foreach, betas, ...) over `params`."""
    accepted = inspect.signature(type(reference)).parameters
    settings = {name: value for name, value in reference.defaults.items() if name in accepted} | {"lr": lr}
    if "adam_w_mode" in accepted and hasattr(reference, "adam_w_mode"):  # DeepSpeed's FusedAdam keeps it outside defaults
        settings["adam_w_mode"] = reference.adam_w_mode
    return type(reference)(params, **settings)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    """Class, module and implementation of an optimizer, for the table."""
    defaults = optimizer.defaults
    if defaults.get("fused"):
        implementation = "fused"
    elif defaults.get("foreach"):
        implementation = "foreach"
    elif "fused" in defaults:  # torch's AdamW with neither asked: foreach on CUDA tensors, a loop per tensor on CPU
        implementation = "unfused"
    else:
        implementation = "its own kernel"
    return {"class": type(optimizer).__name__, "module": type(optimizer).__module__, "fused": bool(defaults.get("fused")),
            "implementation": implementation,
            "name": f"{type(optimizer).__module__.split('.')[0]} {type(optimizer).__name__} ({implementation})"}


class ClipCapStep:
    """One ClipCap training step per call on a fixed batch (the LM loaded fresh from `lm_folder`)."""

    def __init__(self, lm_folder, clip_dim: int, prefix_length: int, clip_length: int, num_layers: int,
                 reference_optimizer: torch.optim.Optimizer, device: torch.device, batch: dict, *,
                 autocast_dtype: torch.dtype | None = None, compile_modules: bool = False, lm_weight_grads: bool = True,
                 lr: float = 2e-5, warmup_steps: int = 5000):
        from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup

        self.prefix_length = prefix_length
        self.lm = GPT2LMHeadModel.from_pretrained(lm_folder).to(device).eval()  # its ClipCaptionPrefix.train() keeps GPT-2 in eval
        self.lm.requires_grad_(lm_weight_grads)
        width = self.lm.get_input_embeddings().embedding_dim
        torch.manual_seed(0)
        self.mapper = ClipCapTransformerMapper(clip_dim, width, prefix_length, clip_length, num_layers).to(device).train()
        self.optimizer = optimizer_like(reference_optimizer, self.mapper.parameters(), lr)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, num_warmup_steps=warmup_steps, num_training_steps=10**9)
        self.run_lm = torch.compile(self.lm) if compile_modules else self.lm
        self.run_mapper = torch.compile(self.mapper) if compile_modules else self.mapper
        self.autocast_dtype, self.device_type = autocast_dtype, device.type
        self.clip_BC = batch["clip"].to(device).float()
        self.ids_BT = batch["input_ids"].to(device)
        caption_mask_BT = batch["attention_mask"].to(device)
        self.mask_BL = torch.cat((torch.ones(self.ids_BT.shape[0], prefix_length, dtype=caption_mask_BT.dtype, device=device),
                                  caption_mask_BT), dim=1)
        self.labels_BT = self.ids_BT.masked_fill(caption_mask_BT == 0, -100)  # its code ignores padding (token 0) alike

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.mapper.parameters())

    def __call__(self) -> None:
        self.mapper.zero_grad()  # its model.zero_grad(): ClipCaptionPrefix.parameters() is the mapper's only
        with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            text_BTD = self.lm.get_input_embeddings()(self.ids_BT)
            prefix_BPD = self.run_mapper(self.clip_BC)
            logits_BLV = self.run_lm(inputs_embeds=torch.cat((prefix_BPD, text_BTD), dim=1), attention_mask=self.mask_BL).logits
            caption_logits_BTV = logits_BLV[:, self.prefix_length - 1 : -1]
            loss = F.cross_entropy(caption_logits_BTV.reshape(-1, caption_logits_BTV.shape[-1]), self.labels_BT.flatten())
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
