"""Checking a URL list before img2dataset reads it.

img2dataset reads the list itself; this module only makes sure it can (format known, file not
empty, the named columns present) and counts its rows per file, so that the run summary can
prove every input row ended in exactly one state. Errors are `UserError`s (one line, exit 2).

Conventions of the common datasets (column names to put in the config):
  LAION-400M/5B parquet: url_col=URL, caption_col=TEXT, extra_columns=[similarity, punsafe, pwatermark]
  CC3M/CC12M tsv: add a header line "caption<TAB>url" as img2dataset's docs say; url_col=url
  SBU parquet/jsonl: url_col=image_url, caption_col=caption
  VQA rows (issue 18): the columns question, answers (a list; in csv/tsv a JSON-encoded list) and
  optionally question_type, answer_type travel as extra columns without being named in the config
  (`UrlList.question_columns`); one row per question, the caption may be empty.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlpdist.config import DownloadConfig
from vlpdist.data.question_answer import ANSWERS, QA_FIELDS, QUESTION
from vlpdist.errors import UserError

SUPPORTED_FORMATS = ("parquet", "csv", "tsv", "jsonl")


@dataclass(frozen=True)
class UrlListFile:
    path: Path
    rows: int
    columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class UrlList:
    """A checked URL list: what img2dataset will read, in the order it will read it."""

    location: Path  # the file or folder handed to img2dataset
    input_format: str
    files: tuple[UrlListFile, ...]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def question_columns(self) -> list[str]:
        """The question-answer columns every file of the list holds (none when it holds no question column)."""
        return [c for c in QA_FIELDS if all(c in f.columns for f in self.files)] if self.files else []

    def shard_count(self, samples_per_shard: int) -> int:
        """img2dataset numbers shards consecutively across files, each file split on its own."""
        return sum(-(-f.rows // samples_per_shard) for f in self.files)


def _infer_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix == "json":
        suffix = "jsonl"
    if suffix not in SUPPORTED_FORMATS:
        raise UserError(
            f"URL list {path}: unknown format '.{suffix}'; use one of {', '.join(SUPPORTED_FORMATS)} "
            "or set download.input_format"
        )
    return suffix


def _read_columns_and_rows(path: Path, input_format: str) -> tuple[list[str], int]:
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    try:
        if input_format == "parquet":
            metadata = pq.read_metadata(path)
            # The Arrow schema's names are the columns; the Parquet schema's are its leaves (a list column
            # `answers` is the leaf `element`).
            return list(metadata.schema.to_arrow_schema().names), metadata.num_rows
        if input_format in ("csv", "tsv"):
            delimiter = "," if input_format == "csv" else "\t"
            table = pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
            return table.column_names, table.num_rows
        # jsonl: one object per line; the union of keys is the column set (as pyarrow reads it).
        columns: dict[str, None] = {}
        rows = 0
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"URL list {path} line {line_number} is not valid JSON") from None
                if not isinstance(record, dict):
                    raise UserError(f"URL list {path} line {line_number} is not a JSON object")
                columns.update(dict.fromkeys(record))
                rows += 1
        return list(columns), rows
    except UserError:
        raise
    except Exception as err:  # pyarrow raises several types for unreadable files
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"URL list {path} cannot be read as {input_format}: {first_line}") from None


def check_url_list(config: DownloadConfig) -> UrlList:
    """Validate `config.url_list` and count its rows; raise `UserError` on anything img2dataset would choke on."""
    if not config.url_list:
        raise UserError("config key 'download.url_list' is empty: give the URL list file or folder")
    location = Path(config.url_list)
    if not location.exists():
        raise UserError(f"URL list {location} does not exist")

    if location.is_dir():
        if config.input_format == "auto":
            present = sorted({p.suffix.lstrip(".") for p in location.iterdir() if p.is_file()} & set(SUPPORTED_FORMATS))
            if len(present) != 1:
                raise UserError(
                    f"URL list folder {location} holds {present or 'no'} supported formats; set download.input_format"
                )
            input_format = present[0]
        else:
            input_format = config.input_format
        paths = sorted(location.glob(f"*.{input_format}"))  # the order img2dataset uses
        if not paths:
            raise UserError(f"URL list folder {location} has no *.{input_format} files")
    else:
        input_format = _infer_format(location) if config.input_format == "auto" else config.input_format
        paths = [location]

    files = []
    required = [config.url_col, config.caption_col, *config.extra_columns]
    for path in paths:
        if path.stat().st_size == 0:
            raise UserError(f"URL list {path} is empty")
        columns, rows = _read_columns_and_rows(path, input_format)
        missing = [c for c in required if c not in columns]
        if missing:
            raise UserError(f"URL list {path} has no column {missing[0]!r} (columns: {', '.join(columns)})")
        if rows == 0:
            raise UserError(f"URL list {path} has no rows")
        if QUESTION in columns and ANSWERS not in columns:
            raise UserError(f"URL list {path} has a {QUESTION!r} column but no {ANSWERS!r} column (a list of answers per row)")
        files.append(UrlListFile(path=path, rows=rows, columns=tuple(columns)))
    return UrlList(location=location, input_format=input_format, files=tuple(files))
