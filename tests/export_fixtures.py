"""A trained run as training leaves it, for the export and caption tests: tiny LM, tiny CLIP, a perturbed MoE mapper."""

from __future__ import annotations

from pathlib import Path

import torch
from process_fixtures import TINY_CLIP
from safetensors.torch import save_file

from vlpdist.config import AlignConfig, Config, ModelConfig, ProcessConfig, save_config
from vlpdist.models import build_captioner

CLIP_DIM = 32  # the tiny CLIP's embed_dim (process_fixtures.TINY_CLIP_CONFIG)


def heldout_features(count: int = 8) -> torch.Tensor:
    """(N, C) unit vectors, as CLIP features are, never seen by the 'training' below."""
    return torch.nn.functional.normalize(torch.randn(count, CLIP_DIM, generator=torch.Generator().manual_seed(7)), dim=-1)


def trained_run(run_dir: Path, tiny_lm: Path, tiny_clip: Path, *, tuned: bool):
    """A run folder as training leaves it (config.yaml + export/model_fp32.safetensors) and the live captioner.

    The mapper is perturbed away from its initialisation; when tuned, so is every LM weight (a
    dropped LM would then caption differently), and the model carries bottleneck tokens and heads."""
    model = ModelConfig(lm_name=str(tiny_lm), prefix_length=3, mapper_depth=2, num_experts=4, top_k=2, kernel_sizes=[3],
                        max_caption_tokens=12, freeze_lm=not tuned, bottleneck_tokens=2 if tuned else 0)
    align = AlignConfig(itc_weight=0.1 if tuned else 0.0, embed_dim=8)
    config = Config(model=model, align=align, process=ProcessConfig(clip_model=TINY_CLIP, clip_pretrained=str(tiny_clip)))
    torch.manual_seed(0)
    captioner = build_captioner(model, CLIP_DIM, align=align).eval()
    with torch.no_grad():
        for param in captioner.mapper.parameters():
            param.add_(0.2 * torch.randn_like(param))
        if tuned:
            for param in captioner.lm.parameters():
                param.add_(0.3 * param.std() * torch.randn_like(param))
            captioner.bottleneck.add_(torch.randn_like(captioner.bottleneck))
    # What consolidated_state_dict keeps: everything, but a frozen LM (it is reloaded by name).
    state = {key: value.detach().clone().contiguous() for key, value in captioner.global_state_dict(ep_rank=0).items()
             if tuned or not key.startswith("lm.")}
    (run_dir / "export").mkdir(parents=True)
    save_file(state, str(run_dir / "export" / "model_fp32.safetensors"))
    save_config(config, run_dir)
    return run_dir / "export" / "model_fp32.safetensors", captioner


def tiny_clip_provenance(tiny_clip: Path, **download) -> dict:
    """A features provenance manifest as processing writes it for features of the tiny CLIP (`download.*` settings overridable)."""
    from vlpdist.config import load_config
    from vlpdist.data.provenance import build_provenance, ingestion_preparation
    from vlpdist.models.clip_identity import describe_clip

    identity, _ = describe_clip(TINY_CLIP, str(tiny_clip))
    settings = load_config(None, [f"download.{key}={value}" for key, value in download.items()]).download
    return build_provenance(identity, ingestion_preparation(settings, recorded_by="download"))
