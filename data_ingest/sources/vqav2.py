"""VQAv2's own layout -> a URL list with question rows, in one command:

    python -m data_ingest.sources.vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json \\
        (--images <COCO folder> | --image-url-template "http://host/val2014/COCO_val2014_{image_id:012d}.jpg") \\
        --out vqav2_val.parquet

The questions and annotations are joined on `question_id`; each question becomes one parquet row with
the columns the URL-list path reads (`data_ingest.url_list`, `vlpdist.data.question_answer.QA_FIELDS`):
`url`, `caption` (""), `question`, `answers` (a list of the annotators' answer strings, VQAv2's 10),
`question_type`, `answer_type`, plus `question_id` and `image_id` (kept in the shards when named in
`download.extra_columns`). With `--images`, every `*.jpg` under the folder whose name ends in a 12-digit
image id (COCO's `COCO_val2014_000000000042.jpg` and `000000000042.jpg`) is an image, given as an
absolute file:// URL: img2dataset opens each URL with urllib, which reads file:// URLs but refuses
plain paths. With `--image-url-template`, `{image_id}` (and `{data_subtype}`, e.g. val2014) are filled in.

Every question ends in one state, and the counts (printed, and kept in the output's parquet metadata
under `vlpdist.output`) add up to the questions: `rows` written, `missing_image` (not in --images),
`no_annotation` (no annotation has its question_id). A file that is not VQAv2 JSON is one line and exit
2. The output appears complete or not at all (written beside it, then renamed), and an existing --out
is replaced only when this command wrote it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

from vlpdist.atomic import atomic_path
from vlpdist.data.question_answer import ANSWER_TYPE, ANSWERS, QUESTION, QUESTION_TYPE
from vlpdist.errors import UserError, exit_on_user_error

WRITER = "data_ingest.sources.vqav2"
METADATA_KEY = b"vlpdist.output"  # the parquet key-value metadata entry naming this command and its counts
COCO_IMAGE_NAME = re.compile(r"(?:^|_)(\d{12})\.jpg$", re.IGNORECASE)


def read_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _entries(document: object, key: str, fields: tuple[str, ...], path: Path, what: str) -> list[dict]:
    """`document[key]`, a list of objects each with `fields`; else a `UserError` naming the first bad entry."""
    if not isinstance(document, dict) or not isinstance(document.get(key), list):
        raise UserError(f"{what} {path} is not VQAv2's format: it has no {key!r} list")
    for index, entry in enumerate(document[key]):
        missing = [field for field in fields if not isinstance(entry, dict) or field not in entry]
        if missing:
            raise UserError(f"{what} {path}: {key}[{index}] has no {missing[0]!r}")
    return document[key]


def read_vqav2(questions_path: Path, annotations_path: Path) -> tuple[list[dict], dict[int, dict], str]:
    """(the questions in file order, question_id -> annotation, the questions' data_subtype) from VQAv2's two files."""
    questions_document = read_json(questions_path, "--questions")
    questions = _entries(questions_document, "questions", ("question_id", "image_id", "question"), questions_path, "--questions")
    annotations = _entries(read_json(annotations_path, "--annotations"), "annotations",
                           ("question_id", "answers", "question_type", "answer_type"), annotations_path, "--annotations")
    seen = Counter(question["question_id"] for question in questions)
    repeated = next((qid for qid, count in seen.items() if count > 1), None)
    if repeated is not None:
        raise UserError(f"--questions {questions_path}: question_id {repeated} appears {seen[repeated]} times (the join needs it unique)")
    by_question: dict[int, dict] = {}
    for index, annotation in enumerate(annotations):
        answers = annotation["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise UserError(f"--annotations {annotations_path}: annotations[{index}]'s answers are not a list of {{\"answer\": str}}")
        by_question[annotation["question_id"]] = annotation
    return questions, by_question, str(questions_document.get("data_subtype", ""))


def index_images(folder: Path) -> dict[int, Path]:
    """image_id -> absolute path of every COCO-named image under `folder` (the first, sorted, when two share an id)."""
    if not folder.is_dir():
        raise UserError(f"--images {folder} is not a folder")
    images: dict[int, Path] = {}
    for path in sorted(folder.rglob("*")):
        match = COCO_IMAGE_NAME.search(path.name)
        if match and path.is_file():
            images.setdefault(int(match.group(1)), path.resolve())
    return images


def url_from_template(template: str, image_id: int, data_subtype: str) -> str:
    try:
        return template.format(image_id=image_id, data_subtype=data_subtype)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"--image-url-template {template!r} cannot be filled ({type(err).__name__}: {err}); "
                        "it may name {image_id} and {data_subtype}") from None


def build_rows(questions: list[dict], annotations: dict[int, dict], image_url) -> tuple[list[dict], Counter, list[int]]:
    """The URL-list rows, the count of each question's end state, and the question_ids whose image is missing.
    `image_url(image_id)` is the image's URL, or None when it is missing."""
    rows, states, missing_image = [], Counter(), []
    for question in questions:
        annotation = annotations.get(question["question_id"])
        if annotation is None:
            states["no_annotation"] += 1
            continue
        url = image_url(question["image_id"])
        if url is None:
            states["missing_image"] += 1
            missing_image.append(question["question_id"])
            continue
        rows.append({
            "url": url,
            "caption": "",
            QUESTION: question["question"],
            ANSWERS: [answer["answer"] for answer in annotation["answers"]],
            QUESTION_TYPE: str(annotation["question_type"]),
            ANSWER_TYPE: str(annotation["answer_type"]),
            "question_id": int(question["question_id"]),
            "image_id": int(question["image_id"]),
        })
        states["rows"] += 1
    return rows, states, missing_image


def output_report(path: Path) -> dict | None:
    """This command's report from the parquet metadata of `path`, or None when `path` is not its output."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
        report = json.loads(metadata[METADATA_KEY])
    except (OSError, ValueError, KeyError):  # not parquet, or parquet without this command's entry
        return None
    return report if isinstance(report, dict) and report.get("writer") == WRITER else None


def write_url_list(rows: list[dict], report: dict, out: Path) -> None:
    """The rows as parquet (answers a list<string> column), staged beside `out` and renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), (QUESTION, pa.string()),
                        (ANSWERS, pa.list_(pa.string())), (QUESTION_TYPE, pa.string()), (ANSWER_TYPE, pa.string()),
                        ("question_id", pa.int64()), ("image_id", pa.int64())],
                       metadata={METADATA_KEY: json.dumps(report).encode()})
    with atomic_path(out) as staging:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), staging)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m data_ingest.sources.vqav2", description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_<split>_questions.json")
    parser.add_argument("--annotations", required=True, help="v2_mscoco_<split>_annotations.json")
    images = parser.add_mutually_exclusive_group(required=True)
    images.add_argument("--images", help="folder holding the COCO images (searched recursively)")
    images.add_argument("--image-url-template", help='e.g. "http://host/val2014/COCO_val2014_{image_id:012d}.jpg"')
    parser.add_argument("--out", required=True, help="the URL list to write, .parquet")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".parquet":
        raise UserError(f"--out {out}: the URL list is written as .parquet (its answers are a list column)")
    if (out.exists() or out.is_symlink()) and (not out.is_file() or output_report(out) is None):
        raise UserError(f"--out {out} exists and was not written by {WRITER}: choose another --out (it is never overwritten)")
    if args.image_url_template is not None and "{image_id" not in args.image_url_template:
        raise UserError(f"--image-url-template {args.image_url_template!r} has no {{image_id}}: every question would get one image")

    questions, annotations, data_subtype = read_vqav2(Path(args.questions), Path(args.annotations))
    if args.images is not None:
        found = index_images(Path(args.images))

        def image_url(image_id: int) -> str | None:
            path = found.get(image_id)
            return path.as_uri() if path is not None else None
    else:
        def image_url(image_id: int) -> str | None:
            return url_from_template(args.image_url_template, image_id, data_subtype)

    rows, states, missing_image = build_rows(questions, annotations, image_url)
    counts = {"questions": len(questions), **{state: states[state] for state in ("rows", "missing_image", "no_annotation")}}
    first_missing = ", ".join(map(str, missing_image[:5])) + (" ..." if len(missing_image) > 5 else "")
    if not rows:
        raise UserError(f"no question of {args.questions} could be written ({counts['missing_image']} without their image"
                        f"{f' (question_ids {first_missing})' if missing_image else ''}, {counts['no_annotation']} without an annotation)")
    report = {"writer": WRITER, "questions_file": str(args.questions), "annotations_file": str(args.annotations),
              "images": args.images, "image_url_template": args.image_url_template, **counts,
              "missing_image_question_ids": missing_image}
    write_url_list(rows, report, out)
    print(f"{counts['questions']} questions -> {out}: {counts['rows']} rows, {counts['missing_image']} missing their image"
          f"{f' (question_ids {first_missing})' if missing_image else ''}, {counts['no_annotation']} without an annotation",
          flush=True)
    return {"out": str(out), **counts}


if __name__ == "__main__":
    main()
