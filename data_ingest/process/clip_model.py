"""open_clip loading and batched, normalised embedding.

One call loads every CLIP: `open_clip.create_model_and_transforms(name, pretrained=...)`, where
`pretrained` is a tag (`laion2b_s34b_b79k`, downloaded by open_clip on a machine with a hub) or a
local checkpoint file. Custom model configs are registered from `clip_configs/` (shipped here)
and from a `<model_name>.json` lying next to a checkpoint file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlpdist.errors import UserError
from vlpdist.models.clip_identity import looks_like_path, register_clip_config_dirs

SHIPPED_CLIP_CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"


def register_clip_configs(model_name: str, pretrained: str) -> None:
    """Make custom model configs known to open_clip (shipped ones, and one beside the checkpoint)."""
    register_clip_config_dirs(model_name, pretrained, [SHIPPED_CLIP_CONFIG_DIR])


def check_clip_checkpoint(pretrained: str) -> None:
    """A `pretrained` that names a checkpoint file must exist (a tag is open_clip's to resolve)."""
    if looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise UserError(f"config key 'process.clip_pretrained': checkpoint file {pretrained} does not exist")


def load_clip(model_name: str, pretrained: str, device: str = "cpu"):
    """(model in eval mode, image preprocess, tokenizer) through open_clip's own loading path."""
    import open_clip

    check_clip_checkpoint(pretrained)
    register_clip_configs(model_name, pretrained)
    # hf-hub:/local-dir: names are resolved by open_clip itself, not from its config registry.
    if not model_name.startswith(("hf-hub:", "local-dir:")) and model_name not in open_clip.list_models():
        raise UserError(f"config key 'process.clip_model': open_clip knows no model {model_name!r}")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def encode_images(model, images, device: str) -> np.ndarray:
    """(B, 3, H, W) preprocessed images -> (B, D) float32 unit vectors."""
    import torch

    with torch.inference_mode(), inference_autocast(device):
        features = model.encode_image(images.to(device), normalize=True)
    return features.float().cpu().numpy()


def encode_texts(model, tokenizer, texts: list[str], device: str) -> np.ndarray:
    """N >= 1 captions -> (N, D) float32 unit vectors."""
    import torch

    tokens_NL = tokenizer(texts).to(device)
    with torch.inference_mode(), inference_autocast(device):
        if text_padding_is_inert(model):
            features = encode_text_trimmed(model, tokens_NL)
        else:
            features = model.encode_text(tokens_NL, normalize=True)
    return features.float().cpu().numpy()


def text_padding_is_inert(model) -> bool:
    """True when the padding after the batch's last end-of-text token cannot change any text feature.

    So it is for open_clip's `CLIP` text tower (OpenAI's design, and LAION's ViT-B-32): a causal
    attention mask, so no position sees those after it, and the feature pooled at the end-of-text
    token (`argmax`/`eos`). Not for towers that attend both ways or pool over all positions
    (SigLIP, CoCa, Hugging Face text towers): those always get the full context.
    """
    import open_clip

    return (type(model) is open_clip.CLIP and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", "") in ("argmax", "eos"))


def encode_text_trimmed(model, tokens_NL):
    """`model.encode_text(tokens, normalize=True)`, with the context cut after the batch's last end-of-text token.

    Captions are short (a LAION caption is about 15 tokens of CLIP's 77), and open_clip always runs
    the text transformer over the full context; cutting the padding nobody attends to makes the
    text tower several times cheaper and leaves every feature as it was (tests compare the two).
    open_clip has no option for it, so this repeats `CLIP.encode_text` on a shorter context.
    """
    import torch.nn.functional as F
    from open_clip.transformer import text_global_pool
    from torch import nn

    eos_id = getattr(model, "text_eos_id", None)
    if model.text_pool_type == "eos":
        pooled_at_N = (tokens_NL == eos_id).int().argmax(dim=-1)
    else:  # argmax: the end-of-text token has the largest id
        pooled_at_N = tokens_NL.argmax(dim=-1)
    length = int(pooled_at_N.max()) + 1
    tokens_NT = tokens_NL[:, :length]  # (N, T), T <= L
    cast_dtype = model.transformer.get_cast_dtype()
    x_NTW = model.token_embedding(tokens_NT).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x_NTW = model.transformer(x_NTW, attn_mask=model.attn_mask[:length, :length])
    x_NTW = model.ln_final(x_NTW)
    x_NW = text_global_pool(x_NTW, tokens_NT, model.text_pool_type, eos_token_id=eos_id)
    if model.text_projection is not None:
        x_NW = model.text_projection(x_NW) if isinstance(model.text_projection, nn.Linear) else x_NW @ model.text_projection
    return F.normalize(x_NW, dim=-1)


def inference_autocast(device: str):
    """fp16 autocast on GPU (as CLIP and BLIP inference usually run); a no-op on CPU."""
    import contextlib

    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
