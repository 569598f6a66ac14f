"""A feature shard whose stats file disagrees with its tar (either way), or whose tar is cut, is
found when rank 0 makes the data plan: every rank stops with the same one line and exit 2, never a
rank failing hours in while the others wait in a collective (nor a tail dropped every epoch)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from common_fixtures import REPO, free_port
from train_fixtures import TINY_CONFIG, tiny_features, tiny_overrides

from vlpdist.config import load_config
from vlpdist.data.feature_shards import count_shard_share, list_feature_shards, shard_sample_counts
from vlpdist.errors import UserError
from vlpdist.train.run_setup import read_data_world

SAMPLES = 48  # per shard, as tiny_features writes them


def _recount(features, shard: str, written: int) -> None:
    (features / f"{shard}_stats.json").write_text(f'{{"shard": "{shard}", "written": {written}}}')


@pytest.mark.parametrize("written", [SAMPLES + 1, SAMPLES - 1], ids=["over_count", "under_count"])
def test_a_stats_count_that_disagrees_with_its_tar_is_refused_at_planning(tmp_path, written):
    features = tiny_features(tmp_path / "features")
    _recount(features, "00002", written)
    with pytest.raises(UserError, match=rf"00002.tar holds {SAMPLES} samples but 00002_stats.json counts {written}"):
        shard_sample_counts(list_feature_shards(features))
    # What rank 0 sends every rank, from the two ranks' shares of the counting: no plan, the one line.
    world = _data_world_of_two_ranks(features, tmp_path)
    assert world.plan is None and f"counts {written}" in world.error and "\n" not in world.error


def _data_world_of_two_ranks(features, tmp_path):
    config = load_config(TINY_CONFIG, tiny_overrides(features, tmp_path / "lm", tmp_path / "run"))
    return read_data_world(config, 2, features, [count_shard_share(features, rank, 2) for rank in range(2)])


def test_two_ranks_share_the_counting_and_agreeing_stats_make_the_plan(tmp_path):
    features = tiny_features(tmp_path / "features")
    shares = [count_shard_share(features, rank, 2) for rank in range(2)]
    assert [sorted(share) for share, _ in shares] == [["00000.tar", "00002.tar", "00004.tar"],
                                                     ["00001.tar", "00003.tar", "00005.tar"]]
    world = _data_world_of_two_ranks(features, tmp_path)
    assert world.error is None and world.plan.counts == [SAMPLES] * 5 and world.heldout_samples == SAMPLES


@pytest.mark.parametrize("where", ["at_a_header", "inside_a_header"])
def test_a_cut_feature_tar_is_refused_at_planning(tmp_path, where):
    """A tar cut at (or in) a member header reads to tarfile as a whole, shorter one."""
    import tarfile

    features = tiny_features(tmp_path / "features", num_shards=2, samples_per_shard=8)
    shard = features / "00001.tar"
    with tarfile.open(shard) as archive:
        fifth = [member for member in archive.getmembers() if member.name.startswith("000010004.")][0]
    cut = fifth.offset + (100 if where == "inside_a_header" else 0)
    shard.write_bytes(shard.read_bytes()[:cut])
    _recount(features, "00001", 4)  # stats that agree with what is left: only the cut gives it away
    with pytest.raises(UserError, match=r"00001.tar is cut or corrupt \(the archive ends at byte"):
        shard_sample_counts(list_feature_shards(features))
    # Rank 1 counts shard 00001: its error is what rank 0 sends every rank.
    assert "00001.tar is cut or corrupt" in _data_world_of_two_ranks(features, tmp_path).error


@pytest.mark.timeout(300)
def test_two_ranks_both_stop_at_planning_with_one_line_and_exit_2(tmp_path, tiny_lm):
    """Two gloo ranks of launcher/train.py, started directly (not through the deepspeed launcher,
    which would kill the second rank when the first exits): each exits 2 with the one line."""
    features = tiny_features(tmp_path / "features")
    _recount(features, "00003", SAMPLES + 5)
    port = free_port()
    command = [sys.executable, str(REPO / "launcher" / "train.py"), "--config", str(TINY_CONFIG),
               *tiny_overrides(features, tiny_lm, tmp_path / "run")]
    ranks = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(2)]
    try:
        outputs = [rank.communicate(timeout=240) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    for rank, (_, stderr) in zip(ranks, outputs):
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert rank.returncode == 2, stderr[-3000:]
        assert len(errors) == 1 and "00003.tar holds 48 samples but 00003_stats.json counts 53" in errors[0], stderr
        assert "Traceback" not in stderr
    assert not (tmp_path / "run").exists()  # stopped before the run folder was made


@pytest.mark.parametrize("tar_format", ["USTAR_FORMAT", "GNU_FORMAT", "PAX_FORMAT"])
def test_member_names_from_headers_alone_are_tarfiles(tmp_path, tar_format):
    """Long names (a ustar prefix, a GNU long name, a pax path), a directory and a link: the header
    walk that counts samples names the regular files tarfile names."""
    import io
    import tarfile

    from vlpdist.data.tars import tar_file_names

    path = tmp_path / "names.tar"
    names = ["short.txt", f"{'d' * 90}/{'k' * 60}.npy", "x" * 99 + ".json", "sub/0001.cls"]
    with tarfile.open(path, "w", format=getattr(tarfile, tar_format)) as archive:
        directory = tarfile.TarInfo("sub")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        for index, name in enumerate(names):
            if tar_format == "USTAR_FORMAT" and len(name) > 100 and "/" not in name:
                continue  # ustar has no room for a 100+-character base name
            member = tarfile.TarInfo(name)
            member.size = 700 * index
            archive.addfile(member, io.BytesIO(bytes(member.size)))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "short.txt"
        archive.addfile(link)
    with tarfile.open(path) as archive:
        expected = [member.name for member in archive.getmembers() if member.isfile()]
    with open(path, "rb") as file:
        assert tar_file_names(file) == (expected, None)
    assert len(expected) >= 3
