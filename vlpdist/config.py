"""Typed configuration: dataclasses are the single source of truth.

Resolution order: dataclass defaults -> YAML file -> `key.sub=value` overrides from the command
line. The resolved config is written next to the outputs (`save_config`). Any unknown key, wrong
type or missing file is a `UserError` naming the key and the file (one line, exit code 2).

Sections grow with the pipeline: `demo` (synthetic source), `download` (img2dataset); later
stages add their own dataclass here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from vlpdist.errors import UserError


@dataclass
class DemoDataConfig:
    """The embedded synthetic world: coloured shapes with captions, served over loopback HTTP."""

    num_samples: int = 600
    """Good image-caption pairs generated (broken URLs come on top)."""
    seed: int = 0
    """Everything (shapes, colours, captions, which captions are mismatched) follows this seed."""
    image_size: int = 64
    """Side of the square generated images, in pixels."""
    mismatch_fraction: float = 0.2
    """Fraction of samples whose caption deliberately describes another image (web noise)."""
    broken_per_kind: int = 2
    """URLs of each broken kind (404, 500, html, truncated, empty, slow) added to the list."""
    slow_response_s: float = 4.0
    """How long the 'slow' URLs stall; must exceed download.timeout_s to count as a timeout."""


@dataclass
class DownloadConfig:
    """img2dataset download of a URL list into webdataset shards under `<root>/raw`."""

    url_list: str = ""
    """A file or a folder of files (parquet, csv, tsv, jsonl). The demo fills this in."""
    input_format: str = "auto"
    """One of auto, parquet, csv, tsv, jsonl; auto picks by file extension."""
    url_col: str = "url"
    """Column holding the image URL (LAION: URL, CC3M: url, SBU: image_url)."""
    caption_col: str = "caption"
    """Column holding the caption (LAION: TEXT, CC3M: caption, SBU: caption)."""
    extra_columns: list[str] = field(default_factory=list)
    """Further columns copied into each sample's json (LAION: similarity, punsafe, ...)."""
    header_names: list[str] = field(default_factory=list)
    """For csv/tsv without a header line (CC3M's TSV): the column names, in order."""
    image_size: int = 256
    resize_mode: str = "border"
    """img2dataset resize mode: no, keep_ratio, center_crop, border."""
    encode_format: str = "jpg"
    encode_quality: int = 95
    samples_per_shard: int = 10000
    processes: int = 2
    threads: int = 16
    timeout_s: float = 10.0
    retries: int = 0
    distributor: str = "multiprocessing"
    """multiprocessing (one machine) or ray (a Ray cluster; run inside `ray submit`/`ray job`)."""
    user_agent_token: str = "vlpdist"
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    """Opt-out X-Robots-Tag directives honoured, as img2dataset does by default."""


@dataclass
class Config:
    """The whole vlpdist configuration tree."""

    root: str = "runs/demo"
    """Dataset root: raw/ (img2dataset shards), features/ (processed), url_list/."""
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file at `path` (optional) <- `key.sub=value` overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(Config)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"config override {item!r} (command line) is not of the form key.sub=value")
        key, raw_value = item.split("=", 1)
        nested: dict = {}
        cursor = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[leaf] = yaml.safe_load(raw_value) if raw_value != "" else ""
        layers.append(("command line", nested))

    merged = schema
    for origin, values in layers:
        try:
            merged = OmegaConf.merge(merged, values)
        except OmegaConfBaseException as err:
            raise UserError(_describe_config_error(err, origin)) from None
    config = OmegaConf.to_object(merged)
    _check_values(config)
    return config


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise UserError(f"config file {path}{line} is not valid YAML") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not {type(values).__name__}")
    return values


def _describe_config_error(err: Exception, origin: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    message = str(getattr(err, "msg", err)).splitlines()[0]
    if "not in" in message or "Key '" in message and "not" in message:
        return f"unknown config key '{key}' in {origin}"
    return f"config key '{key}' in {origin}: {message}"


def _check_values(config: Config) -> None:
    """Value checks the type system cannot express."""
    choices = {
        "download.input_format": (config.download.input_format, {"auto", "parquet", "csv", "tsv", "jsonl"}),
        "download.distributor": (config.download.distributor, {"multiprocessing", "ray"}),
        "download.resize_mode": (config.download.resize_mode, {"no", "keep_ratio", "center_crop", "border"}),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"config key '{key}' is {value!r}; expected one of {sorted(allowed)}")
    if not 0.0 <= config.demo.mismatch_fraction < 1.0:
        raise UserError("config key 'demo.mismatch_fraction' must be in [0, 1)")


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, folder: str | os.PathLike) -> Path:
    """Write the resolved config as YAML into `folder` (atomically) and return its path."""
    from vlpdist.atomic import atomic_write_text

    return atomic_write_text(Path(folder) / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
