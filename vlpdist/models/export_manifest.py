"""An export folder's manifest, `export.json`: its names and its reader.

Below both the captioner (which loads an export) and `export_bundle` (which writes one, loading the
LM through the captioner's loader), so neither imports the other both ways. What the manifest
holds is described in `vlpdist.models.export_bundle`.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlpdist.errors import UserError

MANIFEST_FILE = "export.json"
EXPORT_FORMAT = "vlpdist-export"
EXPORT_FORMAT_VERSION = 1


def read_export_manifest(export_dir: str | Path) -> dict:
    """The manifest of a complete export; a one-line `UserError` for anything partial or foreign."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_FILE
    if not export_dir.is_dir():
        raise UserError(f"export {export_dir} does not exist")
    if not path.is_file():
        raise UserError(f"export {export_dir} has no {MANIFEST_FILE}: not a complete export (write one with python -m launcher.export)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"export manifest {path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path} is not a vlpdist export manifest (a consolidated-only export? run python -m launcher.export on it)")
    if manifest.get("format_version") != EXPORT_FORMAT_VERSION:
        raise UserError(f"export {export_dir} has format version {manifest.get('format_version')}; this vlpdist reads {EXPORT_FORMAT_VERSION}")
    for name, size in manifest["files"].items():
        file = export_dir / name
        if not file.is_file():
            raise UserError(f"export {export_dir} is partial: {name} is missing")
        if file.stat().st_size != size:
            raise UserError(f"export {export_dir} is partial: {name} has {file.stat().st_size} bytes, the manifest says {size}")
    return manifest
