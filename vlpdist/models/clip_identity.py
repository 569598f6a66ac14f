"""The CLIP an export's features came from: recorded at export, rebuilt (image tower + preprocess) for captioning.

Training never sees CLIP (it reads features), so an export must say which CLIP made them, or it
cannot caption an image. The identity is what open_clip needs to rebuild the same image tower:

- `model_name`: an open_clip model name. Its model config (JSON) is copied into the export, so a
  custom config (the demo's `vlpdist-demo-clip`, shipped with the ingestion code) needs nothing
  but the export; `hf-hub:` / `local-dir:` names carry their own config and are kept as names.
- `pretrained`: an open_clip pretrained tag (open_clip downloads it), or a local checkpoint file,
  recorded by absolute path with its size and SHA-256 (or copied into the export), or "" (random).
- `preprocess`: the eval-time image preprocessing, resolved as open_clip resolves it in
  `create_model_and_transforms` (defaults <- the tag's mean/std/interpolation/resize mode <- the
  tower's image size), and applied from the record, so an open_clip upgrade cannot change it silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from vlpdist.errors import UserError

CLIP_DIR = "clip"  # inside the export: the model config, and the checkpoint when copied
SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")


def looks_like_path(pretrained: str) -> bool:
    """Whether `pretrained` names a checkpoint file rather than an open_clip tag."""
    return "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def register_clip_config_dirs(model_name: str, pretrained: str, config_dirs: Iterable[str | Path] = ()) -> None:
    """Make custom open_clip model configs known: those in `config_dirs`, and `<model_name>.json` beside a checkpoint file."""
    import open_clip

    for folder in config_dirs:
        open_clip.add_model_config(Path(folder))
    if looks_like_path(pretrained):
        beside = Path(pretrained).parent / f"{model_name}.json"
        if beside.is_file():
            open_clip.add_model_config(beside)


def image_size_pair(size) -> tuple[int, int]:
    """(H, W): open_clip's towers keep a square size as a pair (`to_2tuple`), and resize the same either way."""
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def eval_preprocess_config(model_config: dict, model_name: str, pretrained: str) -> dict:
    """open_clip's eval preprocessing for this identity, as `create_model` settles it for a built-in name."""
    from open_clip import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    preprocess = asdict(PreprocessCfg())
    if pretrained and not looks_like_path(pretrained):
        preprocess = merge_preprocess_dict(preprocess, get_pretrained_cfg(model_name, pretrained) or {})
    preprocess["size"] = image_size_pair(model_config["vision_cfg"]["image_size"])
    return {key: list(value) if isinstance(value, tuple) else value for key, value in preprocess.items()}


def describe_clip(model_name: str, pretrained: str, *, config_dirs: Iterable[str | Path] = ()) -> tuple[dict, dict | None]:
    """(the identity of this CLIP, its open_clip model config or None for `hf-hub:`/`local-dir:` names), writing nothing.

    `config_dirs`: folders of custom open_clip model configs (the ingestion code ships one)."""
    import open_clip

    if not model_name:
        raise UserError("config key 'process.clip_model' is empty: the export must name the CLIP its features came from")
    identity: dict = {"model_name": model_name, "pretrained": pretrained, "pretrained_kind": "none"}
    if model_name.startswith(SCHEMA_PREFIXES):
        # open_clip ignores `pretrained` for these and reads config and preprocessing from the source.
        identity.update(pretrained="", model_config=None, preprocess=None, embed_dim=None)
        return identity, None
    if pretrained:
        identity["pretrained_kind"] = "file" if looks_like_path(pretrained) else "tag"
    if identity["pretrained_kind"] == "tag" and pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
        raise UserError(f"config key 'process.clip_pretrained': {pretrained!r} is neither a checkpoint file nor an open_clip tag of {model_name!r}")
    if identity["pretrained_kind"] == "file":
        checkpoint = Path(pretrained).resolve()
        if not checkpoint.is_file():
            raise UserError(f"config key 'process.clip_pretrained': CLIP checkpoint {pretrained} does not exist")
        identity.update(pretrained=str(checkpoint), pretrained_size=checkpoint.stat().st_size, pretrained_sha256=file_sha256(checkpoint))
    register_clip_config_dirs(model_name, pretrained, config_dirs)
    model_config = open_clip.get_model_config(model_name)
    if model_config is None:
        raise UserError(f"config key 'process.clip_model': open_clip knows no model {model_name!r}")
    identity.update(embed_dim=model_config["embed_dim"], preprocess=eval_preprocess_config(model_config, model_name, pretrained))
    return identity, model_config


def record_clip_identity(
    model_name: str, pretrained: str, out_dir: Path, *, config_dirs: Iterable[str | Path] = (), copy_checkpoint: bool = False
) -> dict:
    """Write what rebuilds this CLIP into `out_dir/clip/` and return the identity for the manifest (`describe_clip`)."""
    identity, model_config = describe_clip(model_name, pretrained, config_dirs=config_dirs)
    if model_config is None:
        return identity
    clip_dir = out_dir / CLIP_DIR
    clip_dir.mkdir(parents=True, exist_ok=True)
    config_file = clip_dir / f"{model_name}.json"
    config_file.write_text(json.dumps(model_config, indent=2) + "\n")
    identity["model_config"] = f"{CLIP_DIR}/{config_file.name}"
    if copy_checkpoint and identity["pretrained_kind"] == "file":
        copied = clip_dir / Path(identity["pretrained"]).name
        shutil.copyfile(identity["pretrained"], copied)
        identity["pretrained"] = f"{CLIP_DIR}/{copied.name}"
    return identity


def resolve_tag_weights(model_name: str, tag: str, revision: str | None) -> str:
    """The weights file of open_clip tag `tag` at hub commit `revision`, or the tag itself when no revision
    was recorded (or the tag's weights are not on the hub). `create_model` fetches a tag at the hub's
    `main`; open_clip's own hub download takes a revision, and `create_model` loads the file it returns."""
    import os

    from open_clip import get_pretrained_cfg
    from open_clip.pretrained import download_pretrained_from_hf

    hf_hub = (get_pretrained_cfg(model_name, tag) or {}).get("hf_hub", "")
    if not revision or not hf_hub:
        return tag
    # As open_clip's download_pretrained splits it: 'org/repo/file' or 'org/repo/' (its default file name).
    repo_id, filename = os.path.split(hf_hub)
    try:
        return download_pretrained_from_hf(repo_id, filename=filename or None, revision=revision)
    except FileNotFoundError as err:
        raise UserError(f"CLIP {model_name!r} tag {tag!r}: no weights at the export's hub revision {revision} of {repo_id} "
                        f"(not in the hub cache, and offline?): {str(err).splitlines()[0]}") from None


def resolve_clip_checkpoint(identity: dict, export_dir: Path) -> str:
    """The `pretrained` argument for open_clip: the tag (its weights file at the recorded hub revision,
    when there is one), or the checkpoint file, checked against its recorded size and hash."""
    pretrained = identity["pretrained"]
    if identity["pretrained_kind"] == "tag":
        return resolve_tag_weights(identity["model_name"], pretrained, identity.get("revision"))
    if identity["pretrained_kind"] != "file":
        return pretrained
    checkpoint = export_dir / pretrained  # an absolute recorded path stays itself under `/`
    if not checkpoint.is_file():
        raise UserError(f"the export's CLIP checkpoint {checkpoint} does not exist (moved? re-export with --copy-clip)")
    if checkpoint.stat().st_size != identity["pretrained_size"] or file_sha256(checkpoint) != identity["pretrained_sha256"]:
        raise UserError(f"the CLIP checkpoint {checkpoint} changed since the export was made: it is not the CLIP the features came from")
    return str(checkpoint)


def _as_tuple(value):
    """JSON turns tuples into lists; PreprocessCfg and open_clip keep tuples."""
    return tuple(value) if isinstance(value, list) else value


def build_clip_image_encoder(identity: dict, export_dir: str | Path, device: str = "cpu"):
    """(open_clip model in eval mode, eval image preprocess) rebuilt from a recorded identity.

    The preprocess is the recorded one (`image_transform_v2` of it), not whatever the installed
    open_clip would pick today; a tower whose image size differs from the record is refused."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    export_dir = Path(export_dir)
    name = identity["model_name"]
    if identity.get("model_config"):
        open_clip.add_model_config(export_dir / identity["model_config"])  # registered under the file's stem, the model name
    pretrained = resolve_clip_checkpoint(identity, export_dir)
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, device=device)
    except (RuntimeError, OSError, ValueError) as err:
        raise UserError(f"cannot build CLIP {name!r} (pretrained {pretrained!r}): {str(err).splitlines()[0]}") from None
    model.eval()
    if identity.get("preprocess") is None:
        return model, image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    recorded = PreprocessCfg(**{key: _as_tuple(value) for key, value in identity["preprocess"].items()})
    built_size = image_size_pair(model.visual.preprocess_cfg["size"])
    if built_size != recorded.size:
        raise UserError(f"CLIP {name!r} builds with image size {built_size}, the export recorded {recorded.size}")
    return model, image_transform_v2(recorded, is_train=False)
