"""Ask an export questions about images: `python -m launcher.ask --export <dir> --question "..." <inputs ...>` and/or
`--questions-file <file>` [--beams N] [--out answers.jsonl|.csv] [--resume].

With `--question`, every input is asked that question; inputs are what `launcher.caption` takes (image
files, folders, URL-list files, URLs). A questions file (.csv, .tsv, .jsonl or .parquet) has one image
and one question per row: an `image` column (or `url`, so a URL list with question columns, such as
`data_ingest.sources.vqav2`'s output, is a questions file) holding a path, an http(s) URL or a file://
URL, and a `question` column; an image may appear on many rows and is read once per batch. Images are
read, prepared and checked against the features' CLIP exactly as `launcher.caption` does (the same
code); each question is put into the export's question template and answered by Hugging Face
`generate` after the visual prefix, greedy (`--beams 1`) or beam search, at most `--max-new-tokens`
(default: the export's `model.max_answer_tokens`).

Every question gets one output row, in input order: `input`, `question`, `status` (`ok`, `unreadable`,
`not_an_image`, `download_failed`, `bad_row` for a questions-file row without an image or a question),
`answer` (for `ok`) and `error` (why not). Bad inputs are reported, never fatal; rows are appended as each
batch finishes; `--resume` skips the (input, question) rows already in the output (as often as they are
there), and an existing output is never replaced without it. Exit 0 when some question was answered
(in this run or the resumed output), 1 when none was; bad arguments exit 2 with one line.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from launcher.caption import (FetchLimits, InferenceModels, Loaded, RowWriter, add_run_arguments, check_run_arguments,
                              encode_prepared, expand_inputs, is_url, load_chunks, load_inference_models,
                              read_finished_rows, report_counts)
from vlpdist.data.question_answer import QUESTION
from vlpdist.errors import UserError, exit_on_user_error

OUTPUT_COLUMNS = ("input", "question", "status", "answer", "error")
IMAGE_COLUMNS = ("image", "url")  # the first one a questions file has names its images
QUESTIONS_FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class QuestionRow:
    """One question to answer: the image as the user wrote it, the question, and what to load (None: a bad row)."""

    input: str
    question: str
    load: tuple[str, str] | None  # ("file" | "url", source) as launcher.caption.load_input takes it
    error: str = ""


def image_to_load(image: str) -> tuple[str, str]:
    """A questions file's image entry -> (kind, source): http(s) is fetched, a file:// URL (how a URL list names local
    images for img2dataset) and a plain path are read from disk."""
    if is_url(image):
        return ("url", image)
    if image.startswith("file://"):
        return ("file", urllib.request.url2pathname(urllib.parse.urlparse(image).path))
    return ("file", image)


def question_row(image, question, where: str) -> QuestionRow:
    """A questions-file record as a row to answer, or a `bad_row` saying which cell is missing."""
    image = image.strip() if isinstance(image, str) else ""
    question = question.strip() if isinstance(question, str) else ""
    if not image or not question:
        missing = " and ".join(name for name, value in (("image", image), ("question", question)) if not value)
        return QuestionRow(image, question, None, f"{where} has no {missing}")
    return QuestionRow(image, question, image_to_load(image))


def _image_column(columns, path: Path) -> str:
    for name in IMAGE_COLUMNS:
        if name in columns:
            if QUESTION not in columns:
                raise UserError(f"questions file {path} has no {QUESTION!r} column (columns: {', '.join(map(str, columns))})")
            return name
    raise UserError(f"questions file {path} has no image column ({' or '.join(IMAGE_COLUMNS)}; "
                    f"columns: {', '.join(map(str, columns))})")


def read_questions_file(path: Path) -> list[QuestionRow]:
    """The rows of a questions file, in order; a file that cannot be read as its format, or lacks the image or question
    column, is the user's error, while a row missing a cell (or a jsonl line that is no object) is a `bad_row`."""
    if not path.is_file():
        raise UserError(f"--questions-file {path} does not exist")
    file_format = QUESTIONS_FILE_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise UserError(f"--questions-file {path}: unknown format {path.suffix!r}; use .csv, .tsv, .jsonl or .parquet")
    try:
        if file_format == "parquet":
            import pyarrow.parquet as pq

            column = _image_column(pq.read_schema(path).names, path)
            records = pq.read_table(path, columns=[column, QUESTION]).to_pylist()
            rows = [question_row(r[column], r[QUESTION], f"row {n}") for n, r in enumerate(records, 1)]
        elif file_format in ("csv", "tsv"):
            with open(path, encoding="utf-8-sig", newline="") as handle:
                reader = csv.DictReader(handle, delimiter="," if file_format == "csv" else "\t")
                column = _image_column(reader.fieldnames or [], path)
                # Line numbers as an editor shows them (the header is line 1).
                rows = [question_row(r.get(column), r.get(QUESTION), f"line {reader.line_num}") for r in reader]
        else:
            rows = _read_jsonl_questions(path)
    except UserError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:  # pyarrow's errors are ValueErrors or OSErrors
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"questions file {path} cannot be read as {file_format}: {first_line}") from None
    if not rows:
        raise UserError(f"questions file {path} has no rows")
    return rows


def _read_jsonl_questions(path: Path) -> list[QuestionRow]:
    rows, keys = [], set()
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                rows.append(QuestionRow("", "", None, f"line {number} is not a JSON object"))
                continue
            keys.update(record)
            column = next((name for name in IMAGE_COLUMNS if name in record), IMAGE_COLUMNS[0])
            rows.append(question_row(record.get(column), record.get(QUESTION), f"line {number}"))
    if rows and keys:
        _image_column(keys, path)  # no object names an image or a question: the file, not its rows, is wrong
    return rows


def rows_for_inputs(inputs: list[str], question: str) -> list[QuestionRow]:
    """Every input (expanded as the caption command expands it) asked `question`."""
    return [QuestionRow(source, question, (kind, source)) for kind, source in expand_inputs(inputs)]


def rows_to_do(rows: list[QuestionRow], finished: list[dict]) -> list[QuestionRow]:
    """`rows` less those an earlier run finished: each finished (input, question) row accounts for one occurrence,
    so a pair asked twice in the input is answered twice."""
    left = Counter((row["input"] or "", row["question"] or "") for row in finished)
    todo = []
    for row in rows:
        key = (row.input, row.question)
        if left[key]:
            left[key] -= 1
        else:
            todo.append(row)
    return todo


def answer_batch(rows: list[QuestionRow], loaded: dict[tuple[str, str], Loaded], models: InferenceModels,
                 max_new_tokens: int, beams: int) -> list[dict]:
    """Output rows for one batch: the questions on readable images answered together, the others passed through."""
    import torch

    position = {item: index for index, item in enumerate(item for item, result in loaded.items() if result.status == "ok")}
    answers: dict[int, str] = {}
    asked = [index for index, row in enumerate(rows) if row.load in position]
    if asked:
        # (U, C) features of each distinct image once, then (B, C) one per question.
        features_UC = encode_prepared([loaded[item] for item in position], models)
        features_BC = features_UC[torch.tensor([position[rows[index].load] for index in asked], device=features_UC.device)]
        texts = models.captioner.generate_answers(features_BC, [rows[index].question for index in asked], max_new_tokens, beams)
        answers = dict(zip(asked, texts))
    out = []
    for index, row in enumerate(rows):
        if row.load is None:
            status, error = "bad_row", row.error
        else:
            status, error = loaded[row.load].status, loaded[row.load].error
        out.append({"input": row.input, "question": row.question, "status": status, "answer": answers.get(index),
                    "error": error or None})
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.ask", description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, help="export folder written by python -m launcher.export")
    parser.add_argument("inputs", nargs="*", help="image files, folders, URL-list files (one URL per line) or URLs, "
                                                  "each asked --question")
    parser.add_argument("--question", default=None, help="the question to ask of every input")
    parser.add_argument("--questions-file", default=None,
                        help="csv/tsv/jsonl/parquet with an image (or url) and a question column, one question per row")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's max_answer_tokens")
    add_run_arguments(parser, "answers.jsonl", "questions")
    args = parser.parse_args(argv)
    if args.question is not None and not args.question.strip():
        raise UserError("--question is empty")
    if args.inputs and args.question is None:
        raise UserError("inputs given without --question: say what to ask of them (or give a --questions-file alone)")
    if args.question is not None and not args.inputs:
        raise UserError("--question needs images to ask it of (image files, folders, URL-list files or URLs)")
    if not args.inputs and args.questions_file is None:
        raise UserError("nothing to ask: give --question with images, or --questions-file")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    out = check_run_arguments(args)
    rows = rows_for_inputs(args.inputs, args.question.strip()) if args.inputs else []
    if args.questions_file is not None:
        rows += read_questions_file(Path(args.questions_file))
    finished = read_finished_rows(out, OUTPUT_COLUMNS, "ask") if args.resume and out.is_file() else []
    todo = rows_to_do(rows, finished)

    from tqdm import tqdm

    models = load_inference_models(args.export, args.device, args.beams)
    max_new_tokens = args.max_new_tokens or models.captioner.max_answer_tokens
    limits = FetchLimits(args.download_timeout, args.download_deadline)
    if finished:
        print(f"resuming {out}: {len(finished)} rows there, {len(todo)} questions to go", flush=True)
    print(models.prepare.describe(), flush=True)

    batches = [todo[start : start + args.batch_size] for start in range(0, len(todo), args.batch_size)]
    # Each batch loads its distinct images once: a VQA image carries several questions.
    image_chunks = [list(dict.fromkeys(row.load for row in batch if row.load is not None)) for batch in batches]
    counts = Counter(row["status"] for row in finished)
    writer = RowWriter(out, OUTPUT_COLUMNS)
    try:
        with tqdm(total=len(todo), desc="ask", unit="question") as progress:
            # The loader first in zip: it is run to its end, which shuts its thread pool down.
            for loaded, batch, items in zip(load_chunks(image_chunks, args.workers, limits, models.prepare), batches, image_chunks):
                written = answer_batch(batch, dict(zip(items, loaded)), models, max_new_tokens, args.beams)
                writer.write(written)
                counts.update(row["status"] for row in written)
                progress.update(len(batch))
    finally:
        writer.close()
    return report_counts(counts, out, models.device, "answered", "question")


if __name__ == "__main__":
    sys.exit(main()["exit_code"])
