"""Models: mappers (MoE / ClipCap baselines), exact folding, the prefix-LM captioner.

Names are imported lazily so `import vlpdist.models` needs neither DeepSpeed nor transformers.

- `build_captioner(model_cfg, clip_dim, ep_size=1, *, consolidated_state=None, ep_rank=0)`
- `PrefixCaptioner`: `forward(clip_emb_BC, input_ids_BT, attention_mask_BT) -> {"loss", "cap",
  "moe_aux", "expert_load", "prefix"}`, `tokenize`, `generate_captions`, `text_only_caption_loss`,
  `global_state_dict(ep_rank)`, `load_consolidated_state(state, ep_rank)`
- `build_mapper`, `fold_mapper(mapper) -> DenseFoldedMapper`, `save_folded_mapper`, `load_folded_mapper`,
  `load_exported_captioner(export_dir)` (folded mapper + the LM its config names, for inference)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PrefixCaptioner": "vlpdist.models.captioner",
    "build_captioner": "vlpdist.models.captioner",
    "load_exported_captioner": "vlpdist.models.captioner",
    "check_tokenizer": "vlpdist.models.captioner",
    "load_tokenizer": "vlpdist.models.captioner",
    "load_language_model": "vlpdist.models.captioner",
    "build_mapper": "vlpdist.models.mapper",
    "check_model_config": "vlpdist.models.mapper",
    "MoeMapper": "vlpdist.models.mapper",
    "DenseFoldedMapper": "vlpdist.models.fold",
    "fold_mapper": "vlpdist.models.fold",
    "save_folded_mapper": "vlpdist.models.fold",
    "load_folded_mapper": "vlpdist.models.fold",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlpdist.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
