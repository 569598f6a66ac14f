"""Paraphrase augmentation (issue 18 item 6): a seq2seq paraphraser loaded by folder as a hub model
would be, the demo world's own phrasings, feature shards that carry both marked as paraphrases
(through a shard actor and through Ray, re-processed when the paraphrase settings change), and
the loader that trains on a paraphrase at the configured rate while held-out evaluation keeps the originals."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from process_fixtures import TINY_CLIP

from data_ingest.process.paraphrase import load_paraphraser, paraphrase_texts
from data_ingest.sources.synthetic import (
    COLORS,
    SHAPES,
    alternative_phrasings,
    generate_demo_samples,
    parse_scene_caption,
    scene_caption,
)
from vlpdist.config import DemoDataConfig, ProcessConfig, load_config
from vlpdist.data.feature_format import decode_feature_sample, encode_feature_sample, iterate_feature_shards
from vlpdist.errors import UserError

COLORS_LIST = list(COLORS)
OBJECT = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")


def save_tiny_paraphraser(folder: Path) -> Path:
    """A tiny random PEGASUS (the family of tuner007/pegasus_paraphrase) with a byte-level BPE tokenizer
    trained on demo captions and questions, both saved with `save_pretrained` as a hub checkpoint is."""
    import torch
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    from data_ingest.sources.demo_lm import train_caption_tokenizer

    samples = generate_demo_samples(DemoDataConfig(num_samples=40, seed=0, image_size=32))
    tokenizer = train_caption_tokenizer([s.caption for s in samples] + [s.question.question for s in samples], 300)
    config = PegasusConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    PegasusForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_paraphraser(tmp_path_factory) -> Path:
    return save_tiny_paraphraser(tmp_path_factory.mktemp("paraphraser") / "tiny-pegasus")


def write_demo_raw_shards(root: Path, num_samples: int, per_shard: int) -> list:
    """img2dataset-shaped raw shards of demo samples (seed 0) with their question columns in each
    sample's json, as img2dataset writes extra columns; returns the samples."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    samples = generate_demo_samples(DemoDataConfig(num_samples=num_samples, seed=0, image_size=32))
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, num_samples, per_shard)):
        tar_path = raw / f"{shard:05d}.tar"
        rows = {"key": [], "status": [], "url": [], "caption": []}
        with wds.TarWriter(str(tar_path)) as sink:
            for index in range(start, min(start + per_shard, num_samples)):
                sample, key = samples[index], f"{shard:05d}{index - start:04d}"
                url = f"http://127.0.0.1:1/{sample.path}"
                meta = {"key": key, "url": url, "caption": sample.caption, "question": sample.question.question,
                        "answers": list(sample.question.answers), "answer_type": sample.question.answer_type}
                sink.write({"__key__": key, "jpg": sample.jpeg, "txt": sample.caption.encode(), "json": json.dumps(meta).encode()})
                for column, value in zip(rows, (key, "success", url, sample.caption)):
                    rows[column].append(value)
        pq.write_table(pa.table(rows), tar_path.with_suffix(".parquet"))
    return samples


def _process_overrides(root: Path, clip: Path, *extra: str) -> list[str]:
    return [f"root={root}", f"process.clip_model={TINY_CLIP}", f"process.clip_pretrained={clip}", "process.vocab=demo_shapes",
            "process.batch_size=8", "process.cpus_per_task=1", "process.loader_workers=0", "process.clip_threshold=-1.0", *extra]


# -- the backends ----------------------------------------------------------------------------------

def test_seq2seq_paraphraser_loads_by_folder_and_gives_k_distinct_deterministic_paraphrases(tiny_paraphraser):
    settings = ProcessConfig(paraphraser=str(tiny_paraphraser), num_paraphrases=3, paraphrase_beams=6, paraphrase_max_tokens=8)
    texts = ["a red circle left of a blue star", "what color is the star?", "a red circle left of a blue star"]
    first = paraphrase_texts(load_paraphraser(settings.paraphraser), texts, settings, "cpu")
    again = paraphrase_texts(load_paraphraser(settings.paraphraser), texts, settings, "cpu")
    assert first == again  # beam search: the same text gets the same paraphrases in every run
    assert first[0] == first[2]
    for text, paraphrases in zip(texts, first):
        assert len(paraphrases) == 3 and len(set(paraphrases)) == 3
        assert all(p.strip() and p != text for p in paraphrases)
    with pytest.raises(UserError, match="cannot load paraphrase model"):
        load_paraphraser(str(tiny_paraphraser.parent / "no-such-model-here"))


def test_synthetic_phrasings_differ_and_describe_the_same_scene():
    samples = generate_demo_samples(DemoDataConfig(num_samples=120, seed=0, image_size=32))
    for sample in samples:
        objects = parse_scene_caption(sample.caption)
        assert objects is not None and scene_caption(objects) == sample.caption
        phrasings = alternative_phrasings(sample.caption, 3)
        assert len(set(phrasings)) == 3 and sample.caption not in phrasings
        for phrasing in phrasings:
            named = [match.groups() for match in OBJECT.finditer(phrasing)]
            reverse = "right to left" in phrasing or " right of " in phrasing
            assert tuple(named[::-1] if reverse else named) == objects, phrasing  # same objects, colours and order
        question = sample.question.question
        rephrased = alternative_phrasings(question, 3)
        assert len(set(rephrased)) == 3 and question not in rephrased
        content = lambda text: Counter(w for w in re.findall(r"[a-z]+", text) if w in COLORS or w in SHAPES or w in ("left", "right"))  # noqa: E731
        assert all(content(text) == content(question) for text in rephrased), (question, rephrased)
    assert alternative_phrasings("a red circle on the left", 3) == [] == alternative_phrasings("what is this?", 3)


# -- the format --------------------------------------------------------------------------------------

def test_paraphrases_are_marked_in_the_format_and_shards_without_them_still_read():
    image_D, text_1D = np.ones(4) / 2, np.ones((1, 4)) / 2
    qa = {"question": "is there a star?", "answers": ["yes"] * 10}
    base = dict(key="k", image_embedding=image_D, text_embeddings=text_1D, captions=["a red star"], labels=[1],
                label_names=["star"], scores={}, decision="keep_web", url="", original_caption="a red star", qa=qa)
    old = decode_feature_sample(encode_feature_sample(**base))
    assert old.caption_paraphrases == [] and old.question_paraphrases == []
    marked = encode_feature_sample(**base, caption_paraphrases=[["one red star"]], question_paraphrases=["can you see a star?"])
    meta = json.loads(marked["json"])
    assert meta["captions"] == ["a red star"] and meta["question"] == "is there a star?"  # the originals stay apart
    sample = decode_feature_sample(marked)
    assert sample.caption_paraphrases == [["one red star"]] and sample.question_paraphrases == ["can you see a star?"]
    with pytest.raises(ValueError, match="per kept caption"):
        encode_feature_sample(**base, caption_paraphrases=[])
    with pytest.raises(ValueError, match="question sample"):
        encode_feature_sample(**{**base, "qa": None}, question_paraphrases=["?"])


def test_bad_paraphrase_settings_are_one_line_user_errors(tmp_path):
    from data_ingest.process.run import check_process_config

    with pytest.raises(UserError, match="train.paraphrase_prob"):
        load_config(None, ["train.paraphrase_prob=1.5"])
    for override, key in (("process.paraphrase_beams=2", "paraphrase_beams"), ("process.num_paraphrases=0", "num_paraphrases")):
        settings = load_config(None, [f"process.paraphraser={tmp_path}", "process.num_paraphrases=3", override]).process
        with pytest.raises(UserError, match=key):
            check_process_config(settings)
    with pytest.raises(UserError, match="no such folder"):
        check_process_config(load_config(None, [f"process.paraphraser={tmp_path / 'missing'}"]).process)


# -- processing --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_shard_actor_writes_seq2seq_paraphrases_of_every_kept_caption_and_question(tmp_path, tiny_clip, tiny_paraphraser):
    from data_ingest.process.shard import ShardProcessor

    write_demo_raw_shards(tmp_path, num_samples=6, per_shard=6)
    config = load_config(None, _process_overrides(tmp_path, tiny_clip, f"process.paraphraser={tiny_paraphraser}",
                                                  "process.num_paraphrases=2", "process.paraphrase_beams=4",
                                                  "process.paraphrase_max_tokens=8"))
    stats = ShardProcessor(config.process).process(str(tmp_path / "raw" / "00000.tar"), str(tmp_path / "features"))
    samples = list(iterate_feature_shards(str(tmp_path / "features" / "00000.tar")))
    assert stats["written"] == len(samples) == 6 and stats["questions_written"] == 6
    for sample in samples:
        assert sample.captions == [sample.original_caption]  # paraphrases never join the captions
        assert len(sample.caption_paraphrases) == 1 and len(sample.caption_paraphrases[0]) == 2
        assert len(sample.question_paraphrases) == 2 and sample.qa["question"] not in sample.question_paraphrases
    assert stats["paraphrases_written"] == 6 * 4
    assert stats["paraphrase"] == {"paraphraser": str(tiny_paraphraser), "num_paraphrases": 2, "beams": 4, "max_tokens": 8}


@pytest.mark.slow
def test_ray_run_writes_synthetic_paraphrases_and_a_change_of_their_settings_processes_again(tmp_path, tiny_clip, monkeypatch):
    ray = pytest.importorskip("ray", reason="ray is in the ingest extra, which CI installs")
    from process_ray_fixtures import ray_pythonpath

    from data_ingest.process.run import run_process, shard_is_done

    samples = write_demo_raw_shards(tmp_path, num_samples=6, per_shard=6)  # one shard: one actor
    by_url = {f"http://127.0.0.1:1/{s.path}": s for s in samples}
    overrides = _process_overrides(tmp_path, tiny_clip, "process.paraphraser=synthetic")
    monkeypatch.setenv("PYTHONPATH", ray_pythonpath())
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        first = run_process(load_config(None, overrides))
        assert run_process(load_config(None, overrides))["shards_skipped"] == 1
    finally:
        ray.shutdown()
    features = tmp_path / "features"
    assert first["shards_done"] == 1 and first["written"] == 6 and first["paraphrases_written"] == 6 * (3 + 3)
    for sample in iterate_feature_shards(str(features / "00000.tar")):
        truth = by_url[sample.url]  # by URL: a mismatched web caption is another scene's caption
        assert sample.captions == [truth.caption]
        assert sample.caption_paraphrases == [alternative_phrasings(truth.caption, 3)]
        assert sample.question_paraphrases == alternative_phrasings(truth.question.question, 3)
    # The skip key: other paraphrase settings, or none, make the shard pending again; stats from
    # before paraphrasing existed (no "paraphrase" record) count as made with it off.
    assert shard_is_done(features, "00000", load_config(None, overrides).process)
    for other in ("process.num_paraphrases=1", "process.paraphraser="):
        assert not shard_is_done(features, "00000", load_config(None, [*overrides, other]).process)
    stats = features / "00000_stats.json"
    stats.write_text(json.dumps({key: value for key, value in json.loads(stats.read_text()).items() if key != "paraphrase"}))
    assert shard_is_done(features, "00000", ProcessConfig())


# -- training ----------------------------------------------------------------------------------------

def write_paraphrased_feature_shards(folder: Path, num_shards: int = 3, per_shard: int = 24, dim: int = 8) -> Path:
    """Feature shards of demo-like samples: each caption with 3 paraphrases, every second sample a
    question with 3 paraphrases, every fourth caption without paraphrases (written before they existed)."""
    import webdataset as wds

    from vlpdist.atomic import atomic_write_json

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        path = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for index in range(per_shard):
                objects = ((COLORS_LIST[rng.integers(8)], SHAPES[rng.integers(len(SHAPES))]),)
                caption = scene_caption(objects)
                qa = {"question": f"what color is the {objects[0][1]}?", "answers": [objects[0][0]] * 10} if index % 2 else None
                unit_D = rng.standard_normal(dim)
                unit_D /= np.linalg.norm(unit_D)
                writer.write(encode_feature_sample(
                    f"{shard:05d}{index:04d}", unit_D, unit_D[None], [caption], [0], [objects[0][1]], {}, "keep_web", "",
                    caption, qa,
                    caption_paraphrases=None if index % 4 == 0 else [alternative_phrasings(caption, 3)],
                    question_paraphrases=alternative_phrasings(qa["question"], 3) if qa else None))
        atomic_write_json(folder / f"{path.stem}_stats.json", {"shard": path.stem, "written": per_shard})
    return folder


def _lm_inputs(captions, questions, answers):
    """The LM input's shape only (B, 2): which texts reach the LM is read off the batch."""
    import torch

    ids_B2 = torch.ones(len(captions), 2, dtype=torch.long)
    return ids_B2, ids_B2.clone(), torch.tensor([[0, 1] if q else [1, 1] for q in questions])


def _one_epoch(features: Path, probability: float) -> list[dict]:
    from vlpdist.data.feature_shards import QuestionSampling, build_shard_plan, build_train_loader, list_feature_shards

    shards = list_feature_shards(features)[:2]
    plan = build_shard_plan([str(s) for s in shards], 1, 0, 12, 0, [], [24, 24])
    loader = iter(build_train_loader(plan, 0, 0, None, lm_inputs=_lm_inputs,
                                     sampling=QuestionSampling(0.5, "most_common", 0, paraphrase_prob=probability)))
    return [next(loader) for _ in range(plan.batches_per_rank)]


def test_loader_trains_paraphrases_at_the_configured_rate_and_heldout_keeps_the_originals(tmp_path):
    from vlpdist.data.feature_shards import iterate_heldout, iterate_heldout_questions, list_feature_shards

    features = write_paraphrased_feature_shards(tmp_path / "features")
    assert not any(batch["paraphrased"].any() for batch in _one_epoch(features, 0.0))
    swapped, swappable = 0, 0
    for batch in _one_epoch(features, 0.5):
        for row in range(len(batch["keys"])):
            caption, trained = batch["caption"][row], batch["trained_caption"][row]
            paraphrases = alternative_phrasings(caption, 3)
            assert batch["captions"][row] == [caption]  # the alignment text is the original
            if batch["is_question"][row]:
                original = batch["qa"][row]["question"]
                swappable += 1
                if batch["paraphrased"][row]:
                    swapped += 1
                    assert batch["question"][row] in alternative_phrasings(original, 3)
                else:
                    assert batch["question"][row] == original
            elif int(batch["keys"][row][-4:]) % 4:  # a caption with paraphrases
                swappable += 1
                swapped += bool(batch["paraphrased"][row])
                assert trained in paraphrases if batch["paraphrased"][row] else trained == caption
            else:  # no paraphrases written: always the original
                assert not batch["paraphrased"][row] and trained == caption
    assert 0.3 < swapped / swappable < 0.7
    again = _one_epoch(features, 0.5)
    assert [b["trained_caption"] for b in again] == [b["trained_caption"] for b in _one_epoch(features, 0.5)]

    heldout = list_feature_shards(features)[-1:]
    for batch in iterate_heldout(heldout, 8, 24):
        assert all(parse_scene_caption(c) is not None for c in batch["caption"])  # originals, never "one red circle"
        assert batch["references"] == [[c] for c in batch["caption"]]
    questions = [q for batch in iterate_heldout_questions(heldout, 8, 24) for q in batch["question"]]
    assert len(questions) == 12 and all(re.fullmatch(r"what color is the \w+\?", q) for q in questions)
