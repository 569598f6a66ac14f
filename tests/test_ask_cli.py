"""`python -m launcher.ask` on a real tiny export (tiny open_clip saved locally, tiny GPT-2): a folder asked one
question plus a questions file whose rows repeat an image, name it by file:// URL, miss a cell, point at a
truncated JPEG or are no JSON; one row per question with its status, answers as the export's own
`generate_answers` gives them, greedy and beam, `--resume` after a cut line, exit 1 and exit 2."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from export_fixtures import trained_run
from PIL import Image

from launcher.ask import main as ask_main
from launcher.export import main as export_main
from vlpdist.models import load_exported_captioner
from vlpdist.models.clip_identity import build_clip_image_encoder
from vlpdist.models.export_bundle import read_export_manifest

pytestmark = pytest.mark.slow  # the module's export (~10 s with the session's tiny LM) and a few model loads


def jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_lm, tiny_clip) -> Path:
    root = tmp_path_factory.mktemp("ask_export")
    checkpoint, _ = trained_run(root / "run", tiny_lm, tiny_clip, tuned=False)
    export_main(["--checkpoint", str(checkpoint), "--out", str(root / "export")])
    return root / "export"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder (a photo, a truncated JPEG, a text file) and a jsonl questions file over it with one bad row of each kind."""
    root = tmp_path_factory.mktemp("ask_world")
    images = root / "images"
    images.mkdir()
    photo = images / "photo.jpg"
    photo.write_bytes(jpeg_bytes(0))
    (images / "truncated.jpg").write_bytes(jpeg_bytes(0)[:600])
    (images / "notes.txt").write_text("not an image\n")
    questions = root / "questions.jsonl"
    lines = [
        json.dumps({"image": str(photo), "question": "is the circle red?"}),
        json.dumps({"url": photo.as_uri(), "question": "how many squares are there?"}),  # a URL list's column and file://
        json.dumps({"image": str(photo), "question": "is the circle red?"}),  # the same pair twice: answered twice
        json.dumps({"image": "", "question": "what is left of the star?"}),
        json.dumps({"image": str(images / "truncated.jpg"), "question": "what colour is it?"}),
        "{not json",
    ]
    questions.write_text("\n".join(lines) + "\n")
    return {"root": root, "images": images, "photo": photo, "questions": questions}


def expected_answers(export_dir: Path, image_path: Path, questions: list[str], beams: int) -> list[str]:
    """The questions answered in this process through the export's own CLIP and captioner (default answer length)."""
    from data_ingest.process.clip_model import encode_images

    model, preprocess = build_clip_image_encoder(read_export_manifest(export_dir)["clip"], export_dir)
    features_1C = torch.from_numpy(encode_images(model, preprocess(Image.open(image_path).convert("RGB"))[None], "cpu"))
    captioner = load_exported_captioner(export_dir)
    return captioner.generate_answers(features_1C.expand(len(questions), -1), questions, captioner.max_answer_tokens, beams)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ask_folder_and_questions_file_greedy_then_resume(export_dir, world, capsys):
    out = world["root"] / "answers.jsonl"
    args = ["--export", str(export_dir), "--question", "what shape is it?", str(world["images"]),
            "--questions-file", str(world["questions"]), "--batch-size", "4", "--out", str(out)]
    result = ask_main(args)
    rows = read_jsonl(out)
    assert [(Path(row["input"]).name, row["status"]) for row in rows] == [
        ("notes.txt", "not_an_image"), ("photo.jpg", "ok"), ("truncated.jpg", "unreadable"),  # the folder, --question
        ("photo.jpg", "ok"), ("photo.jpg", "ok"), ("photo.jpg", "ok"), ("", "bad_row"), ("truncated.jpg", "unreadable"),
        ("", "bad_row"),
    ]
    assert rows[4]["input"] == world["photo"].as_uri()  # the row names the image as the file did
    assert rows[6]["error"] == "line 4 has no image" and rows[8]["error"] == "line 6 is not a JSON object"
    assert all(row["answer"] is None and row["error"] for row in rows if row["status"] != "ok")
    ok_questions = [row["question"] for row in rows if row["status"] == "ok"]
    assert [row["answer"] for row in rows if row["status"] == "ok"] == expected_answers(export_dir, world["photo"], ok_questions, 1)
    assert result == {"rows": 9, "counts": {"ok": 4, "not_an_image": 1, "unreadable": 2, "bad_row": 2}, "out": str(out), "exit_code": 0}
    assert "answered 4 of 9 questions" in capsys.readouterr().out

    with pytest.raises(SystemExit) as refused:  # an existing output is never replaced without --resume
        ask_main(args)
    assert refused.value.code == 2 and "pass --resume" in capsys.readouterr().err

    # A crash after five rows, the sixth cut mid-line: --resume keeps the five and asks the rest, the repeated pair included.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:20])
    resumed = ask_main([*args, "--resume"])
    assert read_jsonl(out) == rows and resumed["rows"] == 9 and resumed["exit_code"] == 0
    assert "5 rows there, 4 questions to go" in capsys.readouterr().out


def test_ask_beam_search_from_a_csv_questions_file(export_dir, world):
    questions = world["root"] / "questions.csv"
    with open(questions, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "question", "answers"])  # other columns ride along unread
        writer.writerow([str(world["photo"]), "is there a star?", '["yes"]'])
        writer.writerow([str(world["photo"]), "", ""])
        writer.writerow([str(world["photo"]), "how many circles?", '["two"]'])
    out = world["root"] / "beams.csv"
    assert ask_main(["--export", str(export_dir), "--questions-file", str(questions), "--beams", "3", "--out", str(out)])["exit_code"] == 0
    with open(out, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(row["question"], row["status"], row["error"]) for row in table] == [
        ("is there a star?", "ok", ""), ("", "bad_row", "line 3 has no question"), ("how many circles?", "ok", "")]
    assert [table[0]["answer"], table[2]["answer"]] == expected_answers(
        export_dir, world["photo"], ["is there a star?", "how many circles?"], 3)


def test_nothing_answered_exits_1_and_bad_arguments_exit_2(export_dir, world, capsys):
    nothing = world["root"] / "nothing"
    nothing.mkdir()
    (nothing / "notes.txt").write_text("still not an image")
    failed = ask_main(["--export", str(export_dir), "--question", "what is it?", str(nothing), "--out", str(world["root"] / "none.jsonl")])
    assert failed["exit_code"] == 1 and failed["counts"] == {"not_an_image": 1}
    assert "no question was answered" in capsys.readouterr().err

    no_question_column = world["root"] / "wrong.csv"
    no_question_column.write_text("image,text\na.jpg,what?\n")
    for argv, message in [
        ([str(world["images"])], "error: inputs given without --question: say what to ask of them (or give a --questions-file alone)"),
        (["--question", "what?"], "error: --question needs images to ask it of (image files, folders, URL-list files or URLs)"),
        (["--questions-file", str(no_question_column)],
         f"error: questions file {no_question_column} has no 'question' column (columns: image, text)"),
        (["--questions-file", str(world["root"] / "missing.tsv")], f"error: --questions-file {world['root'] / 'missing.tsv'} does not exist"),
    ]:
        with pytest.raises(SystemExit) as refused:
            ask_main(["--export", str(export_dir), *argv, "--out", str(world["root"] / "never.jsonl")])
        assert refused.value.code == 2 and capsys.readouterr().err.strip() == message
    assert not (world["root"] / "never.jsonl").exists()
