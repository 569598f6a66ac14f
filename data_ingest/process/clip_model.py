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

SHIPPED_CLIP_CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"


def looks_like_path(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def register_clip_configs(model_name: str, pretrained: str) -> None:
    """Make custom model configs known to open_clip (shipped ones, and one beside the checkpoint)."""
    import open_clip

    open_clip.add_model_config(SHIPPED_CLIP_CONFIG_DIR)
    if looks_like_path(pretrained):
        beside = Path(pretrained).parent / f"{model_name}.json"
        if beside.is_file():
            open_clip.add_model_config(beside)


def load_clip(model_name: str, pretrained: str, device: str = "cpu"):
    """(model in eval mode, image preprocess, tokenizer) through open_clip's own loading path."""
    import open_clip

    if looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise UserError(f"config key 'process.clip_pretrained': checkpoint file {pretrained} does not exist")
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

    with torch.no_grad(), inference_autocast(device):
        features = model.encode_image(images.to(device), normalize=True)
    return features.float().cpu().numpy()


def encode_texts(model, tokenizer, texts: list[str], device: str) -> np.ndarray:
    """N >= 1 captions -> (N, D) float32 unit vectors."""
    import torch

    with torch.no_grad(), inference_autocast(device):
        features = model.encode_text(tokenizer(texts).to(device), normalize=True)
    return features.float().cpu().numpy()


def inference_autocast(device: str):
    """fp16 autocast on GPU (as CLIP and BLIP inference usually run); a no-op on CPU."""
    import contextlib

    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
