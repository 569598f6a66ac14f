"""The export folder as the trained model, self-contained, and its manifest.

An export folder holds (next to `mapper.safetensors` + `mapper_config.json`, the folded mapper):

- `lm/`: the LM and tokenizer as trained (`save_pretrained`), when the LM was tuned (its weights
  come from the consolidated `lm.*` entries) or copied (`copy_lm`: by default a frozen LM from a
  local folder is, a frozen hub LM is not); a frozen LM not copied is named instead, by hub name
  with the revision (commit) of the hub cache's copy when there is one, or by absolute path;
- `extras.safetensors`: the bottleneck tokens (`bottleneck`, (B, D)) and the alignment heads
  (`heads.*`, for retrieval), when the model has them;
- `clip/`: the open_clip model config (and the checkpoint, when copied) of the CLIP the features
  came from (`vlpdist.models.clip_identity`);
- `config.yaml`: the run config it was exported with;
- in the manifest, `features_provenance`: which CLIP made the training features from images prepared
  how (`vlpdist.data.provenance`), so inference prepares images the same way; None for a run whose
  features had no provenance;
- `export.json`: the manifest, written last: format and version, model and align config, the LM and
  CLIP identities, and every other file with its size. An export without it, or with a listed
  file missing or of another size, is refused (`read_export_manifest`, in `export_manifest`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Mapping

import torch

from vlpdist.config import Config
from vlpdist.errors import UserError
# The manifest's names and reader live below the captioner; imported here for the writer and for callers.
from vlpdist.models.export_manifest import EXPORT_FORMAT, EXPORT_FORMAT_VERSION, MANIFEST_FILE, read_export_manifest  # noqa: F401

LM_DIR = "lm"
EXTRAS_FILE = "extras.safetensors"
LM_PREFIX = "lm."
HEADS_PREFIX = "heads."
BOTTLENECK_KEY = "bottleneck"


def resolve_model_name(name: str) -> str:
    """A local folder by absolute path (the export may be used from another directory); a hub name stays a name."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def hub_revision(repo_id: str) -> str | None:
    """The commit the hub cache's `main` of model repo `repo_id` points at (what `from_pretrained`
    loaded offline), or None: a local path, not in the cache."""
    if not repo_id or Path(repo_id).exists():
        return None
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.strip('/').replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def clip_tag_revision(model_name: str, tag: str) -> str | None:
    """The hub commit of an open_clip pretrained tag's weights, when open_clip fetches them from the hub and they are cached."""
    from open_clip import get_pretrained_cfg

    return hub_revision((get_pretrained_cfg(model_name, tag) or {}).get("hf_hub", ""))


def expected_extras(config: Config) -> tuple[bool, bool]:
    """(has bottleneck tokens, has alignment heads), as `PrefixCaptioner.__init__` decides them."""
    return config.model.bottleneck_tokens > 0, config.align.enabled and bool(config.align.text_target)


def load_trained_lm_weights(lm: torch.nn.Module, lm_state: Mapping[str, torch.Tensor], name: str) -> None:
    """Every LM tensor from `lm_state`; a key may be absent only when it is tied to one that is present
    (GPT-2's `lm_head.weight` is `transformer.wte.weight`), so no trained weight is left at its base value."""
    try:
        result = lm.load_state_dict({key: value.to(lm.dtype) for key, value in lm_state.items()}, strict=False)
    except RuntimeError as err:
        raise UserError(f"the checkpoint's 'lm.*' weights do not fit LM {name!r}: {str(err).splitlines()[-1].strip()}") from None
    tensors = lm.state_dict()
    loaded_storage = {tensors[key].data_ptr() for key in lm_state if key in tensors}
    untrained = [key for key in result.missing_keys if tensors[key].data_ptr() not in loaded_storage]
    if untrained or result.unexpected_keys:
        raise UserError(f"the checkpoint's 'lm.*' weights do not fit LM {name!r}: missing {untrained[:3]}, unexpected {result.unexpected_keys[:3]}")


def write_language_model(out_dir: Path, config: Config, state: Mapping[str, torch.Tensor], copy_lm: bool | None) -> dict:
    """Save the LM as trained into `out_dir/lm` (tuned, or frozen and `copy_lm`), or name it; the manifest's `lm` entry.

    `copy_lm=None`: copy a frozen LM whose model or tokenizer is a local folder (nothing outside the
    export is then needed), name a hub LM. A consolidated state holds `lm.*` exactly when the LM was
    trained (a frozen LM is left out of it)."""
    from vlpdist.models.captioner import load_language_model_and_tokenizer

    lm_state = {key[len(LM_PREFIX):]: value for key, value in state.items() if key.startswith(LM_PREFIX)}
    if not config.model.freeze_lm and not lm_state:
        raise UserError("model.freeze_lm is false but the checkpoint holds no 'lm.*' weights: the tuned LM is missing from it")
    # A hub name is pinned to the commit the cache holds (the one training loaded), for loading it later
    # (`load_exported_captioner`) and, for a tuned LM, for the "without the image" baseline it started from.
    base = {"name": resolve_model_name(config.model.lm_name),
            "tokenizer": resolve_model_name(config.model.tokenizer_name or config.model.lm_name)}
    base.update(revision=hub_revision(config.model.lm_name), tokenizer_revision=hub_revision(base["tokenizer"]))
    if copy_lm is None:
        copy_lm = Path(config.model.lm_name).is_dir() or Path(config.model.tokenizer_name or config.model.lm_name).is_dir()
    if not lm_state and not copy_lm:
        return {"source": "reference", "tuned": False, **base}
    lm, tokenizer = load_language_model_and_tokenizer(config.model)
    if lm_state:
        load_trained_lm_weights(lm, lm_state, config.model.lm_name)
    lm.save_pretrained(out_dir / LM_DIR)
    tokenizer.save_pretrained(out_dir / LM_DIR)
    return {"source": "bundled", "path": LM_DIR, "tuned": bool(lm_state), "trained_from": base}


def write_extras(out_dir: Path, config: Config, state: Mapping[str, torch.Tensor]) -> str | None:
    """Bottleneck tokens and alignment heads into `extras.safetensors`; its name, or None when the model has neither."""
    from safetensors.torch import save_file

    wants_bottleneck, wants_heads = expected_extras(config)
    extras = {key: value.float().contiguous() for key, value in state.items()
              if (wants_bottleneck and key == BOTTLENECK_KEY) or (wants_heads and key.startswith(HEADS_PREFIX))}
    if wants_bottleneck and BOTTLENECK_KEY not in extras:
        raise UserError(f"model.bottleneck_tokens is {config.model.bottleneck_tokens} but the checkpoint holds no '{BOTTLENECK_KEY}'")
    if wants_heads and not any(key.startswith(HEADS_PREFIX) for key in extras):
        raise UserError("align is enabled (alignment heads) but the checkpoint holds no 'heads.*' weights")
    if not extras:
        return None
    save_file(extras, str(out_dir / EXTRAS_FILE))
    return EXTRAS_FILE


def list_files(folder: Path) -> dict[str, int]:
    """Every file under `folder` but the manifest: relative path -> size in bytes."""
    return {path.relative_to(folder).as_posix(): path.stat().st_size
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE}


def write_export_bundle(
    out_dir: Path, config: Config, state: Mapping[str, torch.Tensor], clip_dim: int, *,
    copy_lm: bool | None = None, copy_clip: bool = True, clip_config_dirs: Iterable[str | Path] = (), meta: dict | None = None,
    provenance: dict | None = None,
) -> dict:
    """Write the LM, extras, CLIP identity and (last) the manifest into `out_dir`, which already holds
    the folded mapper; returns the manifest. `out_dir` is a staging folder: the caller renames it into place.

    `provenance`: the run's features provenance (`vlpdist.data.provenance`), carried in the manifest;
    a CLIP other than the one it names is refused."""
    from vlpdist.atomic import atomic_write_json
    from vlpdist.models.clip_identity import record_clip_identity

    clip = record_clip_identity(config.process.clip_model, config.process.clip_pretrained, out_dir,
                                config_dirs=clip_config_dirs, copy_checkpoint=copy_clip)
    if clip["pretrained_kind"] == "tag":
        clip["revision"] = clip_tag_revision(config.process.clip_model, config.process.clip_pretrained)
    if provenance is not None:
        from vlpdist.data.provenance import check_same_clip

        check_same_clip(provenance, clip, "the run config (process.clip_model / process.clip_pretrained)")
    lm = write_language_model(out_dir, config, state, copy_lm)  # after the CLIP check: a refused export loads no LM
    extras = write_extras(out_dir, config, state)
    manifest = {
        **(meta or {}),
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "clip_dim": clip_dim,
        "model": asdict(config.model),
        "align": asdict(config.align),
        "lm": lm,
        "clip": clip,
        "features_provenance": provenance,
        "extras": extras,
        "files": list_files(out_dir),
    }
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest
