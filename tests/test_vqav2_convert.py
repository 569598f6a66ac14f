"""`python -m data_ingest.sources.vqav2`: a hand-written 3-question VQAv2 layout (questions file, annotations
file, a COCO-named image folder missing one image) becomes a URL list that `data_ingest.url_list` accepts with
every question column, whose rows read back as question samples and whose file:// URLs img2dataset's own
fetch reads; every question is accounted for; a URL template; output replaced only when its own; bad JSON
is one line and exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_ingest.sources.vqav2 import main as convert_main
from data_ingest.url_list import check_url_list
from vlpdist.config import DownloadConfig
from vlpdist.data.question_answer import QA_FIELDS, parse_answers, qa_fields

ANSWERS_42 = ["red"] * 7 + ["dark red", "pink", "red"]


def vqa_answers(strings: list[str]) -> list[dict]:
    return [{"answer": text, "answer_confidence": "yes", "answer_id": index + 1} for index, text in enumerate(strings)]


@pytest.fixture
def vqav2(tmp_path) -> dict:
    """VQAv2's layout in miniature: image 42 is in the folder (two questions), image 7 is not (one question)."""
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
                 "questions": [
                     {"image_id": 42, "question": "What color is the bus?", "question_id": 42000},
                     {"image_id": 7, "question": "How many dogs are there?", "question_id": 7000},
                     {"image_id": 42, "question": "Is it raining?", "question_id": 42001},
                 ]}
    annotations = {"info": {}, "data_subtype": "val2014", "annotations": [
        {"question_id": 42000, "image_id": 42, "question_type": "what color is the", "answer_type": "other",
         "multiple_choice_answer": "red", "answers": vqa_answers(ANSWERS_42)},
        {"question_id": 7000, "image_id": 7, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "2", "answers": vqa_answers(["2"] * 9 + ["3"])},
        {"question_id": 42001, "image_id": 42, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "no", "answers": vqa_answers(["no"] * 8 + ["yes"] * 2)},
    ]}
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    images = tmp_path / "coco" / "val2014"
    images.mkdir(parents=True)
    (images / "COCO_val2014_000000000042.jpg").write_bytes(b"\xff\xd8 the bytes of image 42")
    (images / "COCO_val2014_000000000042.txt").write_text("not an image name")
    return {"questions": tmp_path / "questions.json", "annotations": tmp_path / "annotations.json",
            "image_42": images / "COCO_val2014_000000000042.jpg", "root": tmp_path}


def convert(vqav2: dict, out: Path, *image_args: str) -> dict:
    return convert_main(["--questions", str(vqav2["questions"]), "--annotations", str(vqav2["annotations"]),
                         *image_args, "--out", str(out)])


@pytest.mark.slow  # importing img2dataset's downloader (its resizer pulls in cv2 and albumentations)
def test_image_folder_converts_to_a_url_list_that_the_download_stage_reads(vqav2, capsys):
    out = vqav2["root"] / "urls.parquet"
    summary = convert(vqav2, out, "--images", str(vqav2["root"] / "coco"))  # the COCO root: searched recursively
    assert summary == {"out": str(out), "questions": 3, "rows": 2, "missing_image": 1, "no_annotation": 0}
    assert "3 questions -> " in capsys.readouterr().out
    assert [path.name for path in vqav2["root"].iterdir() if path.name.startswith(".urls")] == []  # no staging left

    url_list = check_url_list(DownloadConfig(url_list=str(out)))
    assert url_list.rows == 2 and url_list.question_columns == list(QA_FIELDS)

    # Read back as img2dataset reads a parquet URL list (pandas), each row's question columns parse as a sample's.
    records = pd.read_parquet(out).to_dict("records")
    assert [record["question_id"] for record in records] == [42000, 42001] and all(r["caption"] == "" for r in records)
    assert qa_fields(records[0]) == {"question": "What color is the bus?", "answers": ANSWERS_42,
                                     "question_type": "what color is the", "answer_type": "other"}
    assert qa_fields(records[1])["answers"] == ["no"] * 8 + ["yes"] * 2
    assert records[0]["url"] == records[1]["url"] == vqav2["image_42"].resolve().as_uri()

    # img2dataset opens URLs with urllib: a file:// URL is fetched, a bare path is not (why the list holds URLs).
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import download_image

    _, stream, error = download_image((0, records[0]["url"]), 5, None, ["noai"])
    assert error is None and stream.getvalue() == vqav2["image_42"].read_bytes()
    assert "unknown url type" in download_image((0, str(vqav2["image_42"])), 5, None, ["noai"])[2]

    assert parse_answers(records[0]["answers"]) == ANSWERS_42  # the numpy array a parquet list column reads as
    report = json.loads(pq.read_schema(out).metadata[b"vlpdist.output"])  # the missing question, named
    assert report["missing_image_question_ids"] == [7000] and report["rows"] + report["missing_image"] == report["questions"]


def test_url_template_counts_unannotated_questions_and_replaces_only_its_own_output(vqav2, capsys):
    annotations = json.loads(vqav2["annotations"].read_text())
    annotations["annotations"].pop(1)  # question 7000 loses its annotation
    vqav2["annotations"].write_text(json.dumps(annotations))
    out = vqav2["root"] / "urls.parquet"
    template = "http://images.example/{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg"
    for _ in range(2):  # the second run replaces the first's output: its own
        summary = convert(vqav2, out, "--image-url-template", template)
        assert summary["rows"] == 2 and summary["no_annotation"] == 1 and summary["missing_image"] == 0
    assert pd.read_parquet(out)["url"].tolist() == ["http://images.example/val2014/COCO_val2014_000000000042.jpg"] * 2

    foreign = vqav2["root"] / "mine.parquet"
    pd.DataFrame({"url": ["http://x/1.jpg"], "caption": ["a cat"]}).to_parquet(foreign)
    with pytest.raises(SystemExit) as refused:
        convert(vqav2, foreign, "--image-url-template", template)
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {foreign} exists and was not written by "
                                               "data_ingest.sources.vqav2: choose another --out (it is never overwritten)")
    assert pd.read_parquet(foreign)["caption"].tolist() == ["a cat"]


@pytest.mark.parametrize("content, message", [
    ('{"questions": [{"image_id": 42, "question": "Is it', "is not valid JSON (line 1, column 45: Unterminated string"),
    ('[1, 2]', "is not VQAv2's format: it has no 'questions' list"),
    ('{"questions": [{"image_id": 42, "question": "Is it?"}]}', "questions[0] has no 'question_id'"),
])
def test_malformed_questions_file_is_one_line_and_exit_2(vqav2, capsys, content, message):
    vqav2["questions"].write_text(content)
    out = vqav2["root"] / "urls.parquet"
    with pytest.raises(SystemExit) as refused:
        convert(vqav2, out, "--images", str(vqav2["root"] / "coco"))
    err = capsys.readouterr().err
    assert refused.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert err.startswith(f"error: --questions {vqav2['questions']}") and not out.exists()
