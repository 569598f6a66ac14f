"""`python -m launcher.evaluate` and the scoring it shares with the end of training: BLEU through
pycocoevalcap against a value worked out by hand, the command on a tiny export (its CLIP a tiny
open_clip model saved locally) with feature shards and with a COCO-format reference file over real
JPEG files, and a bad reference file refused with one line and exit 2."""

from __future__ import annotations

import gc
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from eval_fixtures import CAPFILT_SAMPLES, capfilt_shard
from export_fixtures import trained_run
from PIL import Image
from train_fixtures import tiny_features

from launcher.caption import main as caption_main
from launcher.evaluate import main as evaluate_main
from launcher.export import main as export_main
from vlpdist.data.feature_shards import iterate_heldout
from vlpdist.eval.captioning import caption_metrics, start_meteor
from vlpdist.eval.scoring import score_caption_systems
from vlpdist.models import load_exported_captioner

# Each command run loads the tiny LM and runs Java (PTB tokenizer, METEOR) a few times.
pytestmark = pytest.mark.slow


def test_bleu_matches_the_formula_worked_by_hand():
    references = {"x": ["a red circle on the left"], "y": ["a green square", "a big green square"]}
    predictions = {"x": "a blue circle on", "y": "a green square"}
    # Clipped unigram matches: x 3 of 4 (a, circle, on), y 3 of 3; bigrams: x 1 of 3 (circle on), y 2 of 2.
    # Brevity penalty over the corpus: c = 4 + 3 hypothesis words, r = 6 + 3 (y's closest reference length).
    brevity = math.exp(1 - 9 / 7)
    bleu1 = brevity * 6 / 7
    bleu2 = brevity * math.sqrt(6 / 7 * 3 / 5)
    scores = score_caption_systems(references, {"ours": predictions}, meteor=False, spice=False)
    ours = scores["captioning"]["ours"]
    assert ours["BLEU-1"] == pytest.approx(bleu1, rel=1e-6)
    assert ours["BLEU-2"] == pytest.approx(bleu2, rel=1e-6)
    assert scores["skipped_metrics"] == {"METEOR": "not requested", "SPICE": "not requested"}
    # A perfect corpus scores BLEU-1 = 1 (no brevity penalty when every hypothesis is as long as a reference).
    assert caption_metrics(references, {"x": references["x"][0], "y": references["y"][1]})["BLEU-1"] == pytest.approx(1.0)


def test_one_meteor_scorer_serves_the_process_and_an_ended_one_is_replaced():
    """Each METEOR start loads its tables for about 10 s: every evaluation in a process shares one."""
    first = start_meteor()
    assert start_meteor() is first and first.meteor_p.poll() is None
    first.meteor_p.kill()
    first.meteor_p.wait()
    second = start_meteor()
    assert second is not first and second.meteor_p.poll() is None and start_meteor() is second
    second.lock.acquire()  # as a call that failed half-way leaves it
    third = start_meteor()
    assert third is not second and third.meteor_p.poll() is None and not second.lock.locked()
    del first, second  # pycocoevalcap's __del__ takes each one's lock: it must not wait
    gc.collect()
    assert start_meteor() is third


@pytest.fixture
def export_and_run(tmp_path, tiny_lm, tiny_clip) -> tuple[Path, Path]:
    """(the self-contained export, the run's consolidated fp32 folder it was made from)."""
    checkpoint, _ = trained_run(tmp_path / "run", tiny_lm, tiny_clip, tuned=False)
    export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")])
    return tmp_path / "export", checkpoint.parent


def end_of_training_evaluation(captioner, run_dir: Path, train_shard: Path, heldout_shard: Path, samples: int,
                               store: Path) -> dict:
    """What training's last step scores (`vlpdist.train.run_end.evaluate`), on one gloo rank."""
    import torch.distributed as dist

    from vlpdist.config import load_config
    from vlpdist.data.feature_shards import ShardPlan
    from vlpdist.parallel.engine import DistInfo
    from vlpdist.train.run_end import evaluate
    from vlpdist.train.run_setup import DataWorld

    config = load_config(run_dir / "config.yaml", [f"train.eval_max_samples={samples}"])
    plan = ShardPlan(shards=[str(train_shard)], counts=[6], world_size=1, num_workers=0,
                     micro_batch_size=config.train.micro_batch_size, seed=0, heldout=[str(heldout_shard)])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        return evaluate(captioner, config, DataWorld(plan, heldout_samples=6, clip_dim=32), DistInfo(0, 1, 0, False))
    finally:
        dist.destroy_process_group()


def test_evaluate_feature_shards(tmp_path, export_and_run, capsys):
    export_dir, consolidated_dir = export_and_run
    features = tiny_features(tmp_path / "features", num_shards=2, samples_per_shard=6)
    shard = features / "00001.tar"
    result = evaluate_main(["--model", str(export_dir), "--features", str(shard), "--beams", "2", "--max-samples", "5",
                            "--train-features", str(features / "00000.tar"), "--out", str(tmp_path / "eval.json")])
    printed = capsys.readouterr().out
    assert result["samples"] == 5 and json.loads((tmp_path / "eval.json").read_text())["samples"] == 5
    # The greedy captions are the export's own on those features, in held-out order.
    batch = next(iterate_heldout([shard], 5, 5))
    expected = load_exported_captioner(export_dir).generate_captions(batch["clip"], 12)
    assert [row["greedy"] for row in result["captions"]] == expected
    assert [row["references"] for row in result["captions"]] == batch["captions"]
    assert set(result["captioning"]) == {"greedy", "beam 2", "most-frequent caption"}
    assert result["captioning"]["greedy"] == pytest.approx(caption_metrics(
        {row["id"]: row["references"] for row in result["captions"]}, {row["id"]: row["greedy"] for row in result["captions"]},
        meteor=True))
    assert result["skipped_metrics"].keys() == {"SPICE"}  # Java is here; the Stanford jars are not
    # 5 pairs: every true pair ranks within the top 5, so R@5 = R@10 = 1 both ways.
    assert all(result["retrieval"][f"{d}_R@{k}"] == 1.0 for d in ("image_to_text", "text_to_image") for k in (5, 10))
    assert 0.0 <= result["retrieval"]["image_to_text_R@1"] <= 1.0
    assert result["lm_without_image_loss"] > 0 and result["caption_loss"] > 0
    assert "scores x100" in printed and "SPICE skipped:" in printed and "image -> text" in printed
    # Not a COCO run over the Karpathy test: the published ClipCap row is not set beside it.
    assert "ClipCap" not in printed and "33.53" not in printed
    assert "5 images, 5 captions (all references, 1 per image)" in printed and "ties ranked pessimistically" in printed

    # The baseline is the most frequent TRAINING caption, and training's own last step reports the
    # same rows on the same held-out shard.
    train_captions = [c for batch in iterate_heldout([features / "00000.tar"], 6, 6) for refs in batch["captions"] for c in refs]
    assert result["most_frequent_caption"] == max(train_captions, key=train_captions.count)
    held_out_captions = [c for refs in batch["captions"] for c in refs]
    assert result["most_frequent_caption"] not in held_out_captions
    at_training = end_of_training_evaluation(load_exported_captioner(export_dir), consolidated_dir.parent,
                                             features / "00000.tar", shard, 5, tmp_path / "store")
    assert at_training["most_frequent_caption"] == result["most_frequent_caption"]
    assert at_training["captioning"]["most-frequent caption"] == result["captioning"]["most-frequent caption"]
    assert at_training["retrieval_protocol"] == result["retrieval_protocol"]

    # BLIP's synthetic captions are not references: they are scored in a table of their own.
    capfilt = capfilt_shard(tmp_path / "capfilt" / "00000.tar")
    scored = evaluate_main(["--model", str(export_dir), "--features", str(capfilt), "--out", str(tmp_path / "capfilt.json")])
    printed = capsys.readouterr().out
    assert {row["id"]: row["references"] for row in scored["captions"]} == {key: web for key, web, _ in CAPFILT_SAMPLES}
    assert {row["id"]: row["synthetic"] for row in scored["captions"]} == {key: synthetic for key, _, synthetic in CAPFILT_SAMPLES}
    greedy = {row["id"]: row["greedy"] for row in scored["captions"]}
    assert scored["reference_samples"] == 2 and scored["synthetic_samples"] == 2
    assert scored["captioning"]["greedy"] == pytest.approx(caption_metrics(
        {key: web for key, web, _ in CAPFILT_SAMPLES if web}, {key: greedy[key] for key in ("w", "ws")}, meteor=True))
    assert scored["synthetic_captioning"]["greedy"] == pytest.approx(caption_metrics(
        {key: synthetic for key, _, synthetic in CAPFILT_SAMPLES if synthetic}, {key: greedy[key] for key in ("ws", "s")},
        meteor=True))
    assert "captioning vs the references: 2 images" in printed and "captioning vs synthetic captions" in printed
    assert "most-frequent caption: not scored; --train-features" in printed
    assert scored["retrieval_protocol"].startswith("2 images, 2 captions")


def jpeg_file(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue())


def test_evaluate_coco_references_over_jpegs(tmp_path, export_and_run, capsys):
    export_dir, _ = export_and_run
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        jpeg_file(images / f"COCO_val_{index}.jpg", seed=index)
    coco = {
        "images": [{"id": 10 + index, "file_name": f"COCO_val_{index}.jpg"} for index in range(3)]
                  + [{"id": 99, "file_name": "missing.jpg"}],
        "annotations": [{"image_id": 10 + index, "caption": caption} for index in range(3)
                        for caption in (f"a red circle number {index}", "a shape on a grey background")]
                       + [{"image_id": 99, "caption": "never seen"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    result = evaluate_main(["--model", str(export_dir), "--references", str(tmp_path / "captions.json"),
                            "--images", str(images), "--out", str(tmp_path / "eval.json")])
    assert result["samples"] == 3
    assert [Path(name).name for name in result["skipped_images"]] == ["missing.jpg"]
    assert "1 images left out" in capsys.readouterr().out
    assert [row["id"] for row in result["captions"]] == ["10", "11", "12"]
    assert result["captions"][0]["references"] == ["a red circle number 0", "a shape on a grey background"]
    # The same images through the caption command: the same greedy captions.
    captioned = tmp_path / "captions.jsonl"
    caption_main(["--export", str(export_dir), str(images), "--out", str(captioned)])
    by_file = {Path(row["input"]).name: row["caption"] for row in map(json.loads, captioned.read_text().splitlines())}
    assert [row["greedy"] for row in result["captions"]] == [by_file[f"COCO_val_{index}.jpg"] for index in range(3)]
    assert all(0.0 <= value <= 1.0 for name, value in result["captioning"]["greedy"].items() if name != "CIDEr")
    assert all(result["retrieval"][f"{d}_R@5"] == 1.0 for d in ("image_to_text", "text_to_image"))


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}), "it needs the lists 'images' and 'annotations'"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}),
     "annotations[0] names image_id 2, which is not in 'images'"),
])
def test_bad_references_exit_2(tmp_path, capsys, content, message):
    (tmp_path / "refs.json").write_text(content)
    with pytest.raises(SystemExit) as exited:
        evaluate_main(["--model", str(tmp_path), "--references", str(tmp_path / "refs.json"), "--images", str(tmp_path),
                       "--out", str(tmp_path / "eval.json")])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2
    assert stderr.startswith("error: --references ") and message in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "eval.json").exists()
