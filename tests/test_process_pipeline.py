"""The processing stage end to end on a real in-process Ray: stats, corrupt inputs, retries, reruns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pandas as pd
import pytest
from common_fixtures import wait_for
from process_fixtures import TINY_CLIP, replace_tar_member, write_raw_shards
from process_ray_fixtures import attempts, clear_hold_dir, holding, init_ray_with_hold

from vlpdist.data.feature_format import iterate_feature_shards
from data_ingest.process.run import filter_precision_recall, run_process, score_against_truth
from vlpdist.data.provenance import read_provenance
from vlpdist.models.clip_identity import file_sha256
from data_ingest.run import main as ingest_main
from vlpdist.config import load_config, save_config
from vlpdist.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module_hold_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hold")


@pytest.fixture
def hold_dir(module_hold_dir, ray_session):
    """The hold folder of the module's Ray workers, emptied for this test."""
    return clear_hold_dir(module_hold_dir)


@pytest.fixture(scope="module")
def ray_session(module_hold_dir):
    """One local Ray for the module (2 CPUs, so 2 shard actors) with the test hold in its workers;
    run_process joins it instead of starting its own."""
    ray = pytest.importorskip("ray", reason="ray is in the ingest extra, which CI installs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        # address="local": a fresh Ray even when another runs on this machine.
        init_ray_with_hold(module_hold_dir, monkeypatch, address="local", num_cpus=2, include_dashboard=False)
        yield ray
        ray.shutdown()


def _config(root: Path, checkpoint: Path, *extra: str):
    return load_config(None, [
        f"root={root}", f"process.clip_model={TINY_CLIP}", f"process.clip_pretrained={checkpoint}",
        "process.vocab=demo_shapes", "process.batch_size=8", "process.cpus_per_task=1", *extra,
    ])


def _assert_accounted(summary: dict) -> None:
    assert summary["raw_samples"] == summary["written"] + summary["dropped_by_filter"] + sum(summary["failed"].values())


def test_run_writes_contract_shards_and_rerun_skips(tmp_path, ray_session, tiny_clip):
    write_raw_shards(tmp_path, num_samples=30, per_shard=10)
    # A random tiny CLIP scores around 0: the threshold splits samples into kept and dropped.
    # 2 CPUs a task: one actor, decoding in a DataLoader worker beside it.
    summary = run_process(_config(tmp_path, tiny_clip, "process.clip_threshold=0.0", "process.cpus_per_task=2"))
    assert summary["shards_done"] == 3 and summary["shards_skipped"] == 0 and not summary["shards_failed"]
    assert summary["raw_samples"] == 30 and summary["failed"] == {}
    _assert_accounted(summary)
    features = tmp_path / "features"
    samples = list(iterate_feature_shards(sorted(str(p) for p in features.glob("*.tar"))))
    assert len(samples) == summary["written"]
    for sample in samples:
        assert sample.captions == [sample.original_caption] and sample.decision == "keep_web"
        assert sample.scores["web_clip"] >= 0.0
        assert sample.image_embedding.shape == (32,) and sample.text_embeddings.shape == (1, 32)
        assert sample.label_names and all(name in sample.original_caption for name in sample.label_names)
    decisions = pd.concat(pd.read_parquet(p) for p in sorted(features.glob("*_decisions.parquet")))
    assert len(decisions) == 30 and set(decisions["status"]) <= {"written", "dropped"}
    assert (decisions["web_clip"][decisions["status"] == "dropped"] < 0.0).all()
    # The provenance manifest: this CLIP by its checkpoint's hash, and the config's download settings
    # (these raw shards were not made by the download stage, so it recorded none).
    provenance = read_provenance(features)
    assert provenance["clip"]["pretrained_sha256"] == file_sha256(tiny_clip) and provenance["clip"]["embed_dim"] == 32
    assert provenance["ingestion"]["recorded_by"] == "process config" and provenance["processing"]["clip_transform"]["size"] == [32, 32]

    mtimes = {p.name: p.stat().st_mtime_ns for p in features.iterdir()}
    rerun = run_process(_config(tmp_path, tiny_clip, "process.clip_threshold=0.0"))
    assert rerun["shards_skipped"] == 3 and rerun["samples_per_second"] is None
    assert rerun["written"] == summary["written"]
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in features.iterdir() if p.name in mtimes and p.suffix == ".tar")


def test_corrupt_image_and_truncated_tar_are_counted(tmp_path, ray_session, tiny_clip):
    blank_caption, to_corrupt, to_truncate = write_raw_shards(tmp_path, num_samples=30, per_shard=10)
    # Shard 1: one sample's JPEG replaced by bytes no decoder accepts.
    replace_tar_member(to_corrupt, "000010003.jpg", b"\xff\xd8 not really a jpeg")
    # Shard 0: one sample with an empty caption (and no captioner to propose one).
    replace_tar_member(blank_caption, "000000005.txt", b"")
    # Shard 2: cut in the middle of its fifth sample's image.
    size = to_truncate.stat().st_size
    to_truncate.write_bytes(to_truncate.read_bytes()[: size * 45 // 100])

    summary = run_process(_config(tmp_path, tiny_clip, "process.clip_threshold=-1.0"))
    assert summary["shards_done"] == 3 and not summary["shards_failed"]
    assert summary["raw_samples"] == 30
    assert summary["failed"]["decode_error"] == 1 and summary["failed"]["empty_caption"] == 1
    stats_2 = json.loads((tmp_path / "features" / "00002_stats.json").read_text())
    assert stats_2["tar_error"] and 3 <= stats_2["failed"]["truncated_tar"] <= 7
    assert stats_2["raw_samples"] == 10
    assert summary["written"] == 30 - 2 - stats_2["failed"]["truncated_tar"]
    _assert_accounted(summary)


def test_killed_worker_is_retried_and_run_completes(tmp_path, hold_dir, tiny_clip):
    write_raw_shards(tmp_path, num_samples=40, per_shard=10)
    (hold_dir / "hold").touch()  # actors wait before a shard's second batch until the test lets them go
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        run_process(_config(tmp_path, tiny_clip, "process.clip_threshold=-1.0", "process.max_retries=2"))))
    runner.start()
    features = tmp_path / "features"
    try:
        wait_for(lambda: holding(hold_dir), 180, "a shard actor in the hold")
        victim, shard = sorted(holding(hold_dir).items())[0]
        os.kill(victim, signal.SIGKILL)  # the actor dies mid-shard, its first batch in a temporary tar
        assert list(features.glob(f".{shard}.tar.tmp.{victim}")) and not (features / f"{shard}.tar").exists()
    finally:
        (hold_dir / "hold").unlink()
    runner.join(timeout=240)
    assert not runner.is_alive()

    tried_by = attempts(hold_dir, shard)
    assert len(tried_by) == 2 and victim in tried_by  # the killed attempt and its retry
    assert result["shards_done"] == 4 and not result["shards_failed"] and result["shards_retried"] == {shard: 2}
    assert result["raw_samples"] == 40 and result["written"] == 40 and result["failed"] == {}
    assert sorted(p.name for p in features.glob("*.tar")) == [f"{i:05d}.tar" for i in range(4)]
    assert not [p for p in features.iterdir() if ".tmp." in p.name]
    assert len(list(iterate_feature_shards(str(features / f"{shard}.tar")))) == 10


def test_transient_read_error_is_retried_and_permanent_one_fails_the_stage(tmp_path, hold_dir, tiny_clip):
    """An OSError reading a raw shard is not lost data: the shard is retried; one that never reads fails the run."""
    _, transient, permanent = write_raw_shards(tmp_path, num_samples=30, per_shard=10)
    # 00001: a directory where the tar should be (IsADirectoryError) for the first attempt; the hold
    # hook in the worker moves the real tar back after that attempt failed.
    good_copy = tmp_path / "good_00001.tar"
    shutil.move(transient, good_copy)
    transient.mkdir()
    (hold_dir / "00001.repair").write_text(str(good_copy))
    # 00002: a dangling symlink (FileNotFoundError) on every attempt.
    kept_aside = tmp_path / "kept_00002.tar"
    shutil.move(permanent, kept_aside)
    permanent.symlink_to(tmp_path / "nowhere.tar")
    config = _config(tmp_path, tiny_clip, "process.clip_threshold=-1.0", "process.max_retries=2")
    config_file = save_config(config, tmp_path / "run")

    with pytest.raises(SystemExit) as exited:  # the CLI's exit status: non-zero, finished shards kept
        ingest_main(["--config", str(config_file), "--stage", "process"])
    assert exited.value.code == 1
    summary = json.loads((tmp_path / "features" / "process_summary.json").read_text())
    assert summary["shards_done"] == 2 and list(summary["shards_failed"]) == ["00002"]
    assert "FileNotFoundError" in summary["shards_failed"]["00002"]
    assert summary["shards_retried"] == {"00001": 2, "00002": 3}
    assert len(attempts(hold_dir, "00002")) >= 1 and not (hold_dir / "00001.repair").exists()
    assert summary["raw_samples"] == summary["written"] == 20 and summary["failed"] == {}  # no sample counted lost
    assert not (tmp_path / "features" / "00002_stats.json").exists()  # not marked done
    assert not list((tmp_path / "features").glob("00002*"))

    permanent.unlink()
    shutil.move(kept_aside, permanent)
    rerun = run_process(config)  # only the failed shard runs again
    assert rerun["shards_skipped"] == 2 and rerun["shards_done"] == 3 and not rerun["shards_failed"]
    assert rerun["raw_samples"] == rerun["written"] == 30


def test_precision_recall_hand_made_case():
    # 4 mismatched among 8; the filter drops 3 of them plus 1 good caption.
    dropped = [True, True, True, False, True, False, False, False]
    mismatched = [True, True, True, True, False, False, False, False]
    result = filter_precision_recall(dropped, mismatched)
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (3, 1, 1, 3)
    assert result["precision"] == pytest.approx(0.75) and result["recall"] == pytest.approx(0.75)
    assert filter_precision_recall([False, False], [True, False])["precision"] == 0.0


def test_score_against_truth_joins_by_url_path(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    pd.DataFrame({
        "key": ["a", "b", "c", "d"], "url": [f"http://127.0.0.1:8000/img/{i}.jpg" for i in range(4)],
        "status": ["written", "dropped", "dropped", "failed"], "reason": ["", "", "", "decode_error"],
        "decision": ["keep_web", "drop", "drop", ""], "web_clip": [0.5, 0.1, 0.1, None],
        "web_kept": [True, False, False, False],
    }).to_parquet(features / "00000_decisions.parquet")
    truth = tmp_path / "truth.parquet"
    pd.DataFrame({"url_path": [f"img/{i}.jpg" for i in range(4)], "is_mismatched": [False, True, False, True]}).to_parquet(truth)
    result = score_against_truth(features, str(truth))
    # The failed sample (d) is not scored: the filter never saw it.
    assert result["samples_scored"] == 3
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)


def test_bad_settings_are_user_errors(tmp_path, tiny_clip):
    write_raw_shards(tmp_path, num_samples=2, per_shard=2)
    with pytest.raises(UserError, match="process.filter"):
        run_process(_config(tmp_path, tiny_clip, "process.filter=vibes"))
    with pytest.raises(UserError, match="process.demo_truth"):
        run_process(_config(tmp_path, tiny_clip, f"process.demo_truth={tmp_path / 'missing.parquet'}"))
    with pytest.raises(UserError, match="process.clip_pretrained"):
        run_process(_config(tmp_path, tmp_path / "missing_clip.pt"))
    with pytest.raises(UserError, match="process.vocab"):
        run_process(_config(tmp_path, tiny_clip, "process.vocab=klingon"))
    with pytest.raises(UserError, match="process.captioner.*no such folder"):
        run_process(_config(tmp_path, tiny_clip, f"process.captioner={tmp_path / 'no_blip'}"))
    with pytest.raises(UserError, match="no raw shards"):
        run_process(_config(tmp_path / "empty", tiny_clip))


def test_models_that_do_not_load_in_the_actors_fail_every_shard(tmp_path, ray_session, tiny_clip):
    """A hub name that cannot be fetched (offline) fails inside each actor as it loads its models:
    no actor is started again and again, and every shard is reported failed with the reason."""
    write_raw_shards(tmp_path, num_samples=20, per_shard=10)
    summary = run_process(_config(tmp_path, tiny_clip, "process.captioner=vlpdist-test/no-such-blip"))
    assert summary["shards_done"] == 0 and sorted(summary["shards_failed"]) == ["00000", "00001"]
    assert all("cannot load BLIP model 'vlpdist-test/no-such-blip'" in error for error in summary["shards_failed"].values())
    assert not list((tmp_path / "features").glob("*_stats.json"))
