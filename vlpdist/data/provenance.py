"""The features folder's provenance manifest: which CLIP made the features, from images prepared how.

Training reads features, never images, so inference must repeat by itself what ingestion did to an
image before CLIP saw it. The processing stage writes `provenance.json` beside the feature shards
(at the end of the stage, atomically); training copies it into the run folder; the export carries
it in its manifest; `launcher.caption` and `launcher.evaluate` prepare images from it
(`vlpdist.data.image_preparation`). The manifest holds:

- `clip`: the CLIP identity (`vlpdist.models.clip_identity.describe_clip`): open_clip model name,
  pretrained tag or checkpoint file with its SHA-256, `embed_dim`;
- `ingestion`: img2dataset's image preparation (`image_size`, `resize_mode`, `resize_only_if_bigger`,
  up/downscale interpolation, `border_colour` of the padding, `alpha_background` transparent pixels
  are composited on, `encode_format`, `encode_quality`, `skip_reencode`, the img2dataset version),
  and `recorded_by`: "download" (the download stage recorded the arguments it ran img2dataset with)
  or "process config" (raw shards from elsewhere: the processing run's `download` settings);
- `processing`: how the processing stage decodes (PIL, RGB) and the CLIP eval transform it applied
  (`clip_transform`: size, mode, mean, std, interpolation, resize mode, fill colour).
"""

from __future__ import annotations

import json
from pathlib import Path

from vlpdist.errors import UserError

PROVENANCE_FILE = "provenance.json"
PROVENANCE_FORMAT = "vlpdist-features-provenance"
PROVENANCE_FORMAT_VERSION = 1
IMG2DATASET_WHITE = [255, 255, 255]  # img2dataset pads with white and composites alpha on white (both fixed in its resizer)
PROCESSING_DECODE = "PIL Image.open, convert('RGB')"
INGESTION_KEYS = ("image_size", "resize_mode", "resize_only_if_bigger", "upscale_interpolation", "downscale_interpolation",
                  "border_colour", "alpha_background", "encode_format", "encode_quality", "skip_reencode")


def ingestion_preparation(download, recorded_by: str) -> dict:
    """The image preparation img2dataset applies with these `DownloadConfig` settings.

    The fixed arguments are passed to img2dataset explicitly by the download stage (`resizer_arguments`),
    so this record is what it ran with, not a guess at its defaults."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tool_version = version("img2dataset")
    except PackageNotFoundError:
        tool_version = None
    return {
        "tool": "img2dataset", "tool_version": tool_version, "recorded_by": recorded_by,
        "image_size": download.image_size, "resize_mode": download.resize_mode, "resize_only_if_bigger": False,
        "upscale_interpolation": "lanczos", "downscale_interpolation": "area",
        "border_colour": IMG2DATASET_WHITE, "alpha_background": IMG2DATASET_WHITE,
        "encode_format": download.encode_format, "encode_quality": download.encode_quality, "skip_reencode": False,
    }


def resizer_arguments(ingestion: dict) -> dict:
    """The keyword arguments of img2dataset's `download` / `Resizer` this record stands for."""
    return {key: ingestion[key] for key in ("image_size", "resize_mode", "resize_only_if_bigger", "upscale_interpolation",
                                            "downscale_interpolation", "encode_format", "encode_quality", "skip_reencode")}


def build_provenance(clip_identity: dict, ingestion: dict) -> dict:
    """The manifest for features made by `clip_identity` (its `preprocess` is the CLIP transform) from images `ingestion` prepared."""
    clip = {key: value for key, value in clip_identity.items() if key not in ("preprocess", "model_config")}
    return {
        "format": PROVENANCE_FORMAT,
        "format_version": PROVENANCE_FORMAT_VERSION,
        "clip": clip,
        "ingestion": ingestion,
        "processing": {"decode": PROCESSING_DECODE, "clip_transform": clip_identity.get("preprocess")},
    }


def validate_provenance(manifest, where: str) -> dict:
    """`manifest` itself when it is a provenance manifest this vlpdist reads; a one-line `UserError` naming `where` if not."""
    if not isinstance(manifest, dict) or manifest.get("format") != PROVENANCE_FORMAT:
        raise UserError(f"{where} is not a vlpdist features provenance manifest")
    if manifest.get("format_version") != PROVENANCE_FORMAT_VERSION:
        raise UserError(f"{where} has provenance format version {manifest.get('format_version')}; this vlpdist reads {PROVENANCE_FORMAT_VERSION}")
    clip, ingestion, processing = (manifest.get(key) for key in ("clip", "ingestion", "processing"))
    if not isinstance(clip, dict) or not clip.get("model_name") or "pretrained_kind" not in clip:
        raise UserError(f"{where}: 'clip' must name the CLIP's model_name and pretrained_kind")
    if clip["pretrained_kind"] == "file" and not clip.get("pretrained_sha256"):
        raise UserError(f"{where}: a CLIP checkpoint file needs its pretrained_sha256")
    missing = [key for key in INGESTION_KEYS if not isinstance(ingestion, dict) or key not in ingestion]
    if missing:
        raise UserError(f"{where}: 'ingestion' lacks {missing}")
    if not isinstance(processing, dict) or "clip_transform" not in processing:
        raise UserError(f"{where}: 'processing' must hold the clip_transform")
    return manifest


def read_provenance(folder: str | Path) -> dict | None:
    """The validated manifest in `folder`, or None when it has none."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    return validate_provenance(manifest, str(path))


def write_provenance(folder: str | Path, manifest: dict) -> Path:
    """Validate and write `manifest` into `folder` atomically; its path."""
    from vlpdist.atomic import atomic_write_json

    path = Path(folder) / PROVENANCE_FILE
    atomic_write_json(path, validate_provenance(manifest, "the provenance to write"))
    return path


def copy_provenance(features_dir: str | Path, run_dir: str | Path) -> dict | None:
    """Copy the features' manifest into the run folder (validated); None when the features have none."""
    manifest = read_provenance(features_dir)
    if manifest is not None:
        write_provenance(run_dir, manifest)
    return manifest


def find_run_provenance(start: str | Path) -> dict | None:
    """The manifest of the run a checkpoint or export file belongs to: in `start`'s folder or one of its three
    parents (where `launcher.export` finds the run's `config.yaml`); None when there is none."""
    start = Path(start).resolve()
    folder = start if start.is_dir() else start.parent
    for candidate in [folder, *folder.parents][:4]:
        manifest = read_provenance(candidate)
        if manifest is not None:
            return manifest
    return None


def describe_clip_briefly(clip: dict) -> str:
    pretrained = clip.get("pretrained_sha256") or clip.get("pretrained") or "no weights"
    if clip.get("pretrained_sha256"):
        pretrained = f"checkpoint sha256 {pretrained[:12]}"
    return f"{clip['model_name']!r} ({pretrained})"


def same_clip(features_clip: dict, other_clip: dict) -> bool:
    """Whether two CLIP identities are one model: same name and same weights (tag, or checkpoint SHA-256).
    `embed_dim` alone says nothing: ViT-B-32 and ViT-B-16 both embed into 512."""
    if features_clip["model_name"] != other_clip["model_name"] or features_clip["pretrained_kind"] != other_clip["pretrained_kind"]:
        return False
    if features_clip["pretrained_kind"] == "file":
        return features_clip["pretrained_sha256"] == other_clip.get("pretrained_sha256")
    return features_clip.get("pretrained", "") == other_clip.get("pretrained", "")


def check_same_clip(provenance: dict, clip_identity: dict, what: str) -> None:
    """A one-line `UserError` when `what`'s CLIP is not the one the features were made with."""
    features_clip = provenance["clip"]
    if not same_clip(features_clip, clip_identity):
        raise UserError(f"{what} names CLIP {describe_clip_briefly(clip_identity)} but the features were made with "
                        f"{describe_clip_briefly(features_clip)}: set process.clip_model / process.clip_pretrained to the CLIP "
                        "that made the features")
