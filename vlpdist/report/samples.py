"""A few members of a tar without reading the tar: `tarfile`'s random-access mode reads the 512-byte
headers and seeks over every member's data, then only the members asked for are read. Images
become small inline JPEG thumbnails (data URIs)."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
THUMBNAIL_PX = 96  # longest side; a JPEG of this size is a few KB, so a grid of 24 stays under 200 KB


def member_index(tar_path: Path) -> dict[str, tarfile.TarInfo]:
    """{member name: its header (offset and size)} from the headers alone (`tarfile.open(mode="r:")`
    seeks over the data of an uncompressed tar). A cut archive gives the members before the cut."""
    index: dict[str, tarfile.TarInfo] = {}
    try:
        # Unbuffered: a buffered file would fill 8 KB around every 512-byte header it seeks to.
        with open(tar_path, "rb", buffering=0) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    index[member.name] = member
    except (tarfile.TarError, OSError):
        pass
    return index


def read_members(tar_path: Path, members: list[tarfile.TarInfo]) -> dict[str, bytes]:
    """The bytes of these members only, each read at its own offset."""
    out = {}
    with open(tar_path, "rb") as handle:
        for member in members:
            handle.seek(member.offset_data)
            out[member.name] = handle.read(member.size)
    return out


def members_by_key(index: dict[str, tarfile.TarInfo], keys: list[str], suffixes: tuple[str, ...]) -> dict[str, tarfile.TarInfo]:
    """{key: the first member named `<key><suffix>` for one of the suffixes}."""
    found = {}
    for key in keys:
        for suffix in suffixes:
            if f"{key}{suffix}" in index:
                found[key] = index[f"{key}{suffix}"]
                break
    return found


def thumbnail_uri(data: bytes) -> str | None:
    """A `data:image/jpeg;base64,...` thumbnail of an encoded image; None when it does not decode."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnails_for_keys(raw_dir: Path, keys: list[str], max_shards: int = 16) -> dict[str, str]:
    """{key: thumbnail URI} for the keys whose image is found in `raw_dir/NNNNN.tar`. img2dataset's
    keys start with their shard's number, so the shards whose stem prefixes a key are indexed first;
    at most `max_shards` shards' headers are read in all."""
    shards = sorted(raw_dir.glob("*.tar")) if raw_dir.is_dir() else []
    wanted = set(keys)
    ordered = sorted(shards, key=lambda shard: not any(key.startswith(shard.stem) for key in wanted))
    found: dict[str, str] = {}
    for shard in ordered[:max_shards]:
        if not wanted:
            break
        if not any(key.startswith(shard.stem) for key in wanted) and len(shards) > 1 and found:
            break
        members = members_by_key(member_index(shard), sorted(wanted), IMAGE_SUFFIXES)
        for name, data in read_members(shard, list(members.values())).items():
            key = name.rsplit(".", 1)[0]
            uri = thumbnail_uri(data)
            if uri is not None:
                found[key] = uri
        wanted -= set(members)
    return found
