"""Output folders: a command never replaces what it did not write (a folder without its marker is
refused), its own earlier output is swapped out atomically, and no staging survives a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlpdist.atomic import OUTPUT_MARKER, atomic_path, claim_output_dir, output_writer, replace_output_dir
from vlpdist.errors import UserError


def write_output(path: Path, text: str) -> None:
    with replace_output_dir(path, "tool", "--out") as staging:
        (staging / "result.txt").write_text(text)


def siblings(path: Path) -> list[str]:
    return sorted(entry.name for entry in path.parent.iterdir())


def test_own_output_is_replaced_and_marked(tmp_path):
    out = tmp_path / "out"
    write_output(out, "first")
    assert output_writer(out) == "tool" and (out / "result.txt").read_text() == "first"
    write_output(out, "second")
    assert sorted(entry.name for entry in out.iterdir()) == [OUTPUT_MARKER, "result.txt"]
    assert (out / "result.txt").read_text() == "second"
    assert siblings(out) == ["out"]  # nothing staged or set aside is left beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    write_output(empty, "into an empty folder")
    assert (empty / "result.txt").read_text() == "into an empty folder"


@pytest.mark.parametrize("foreign", ["user files", "another tool's output", "a file", "a link"])
def test_foreign_target_is_refused_untouched(tmp_path, foreign):
    out = tmp_path / "mymodels"
    if foreign == "a file":
        out.write_text("notes")
    elif foreign == "a link":
        (tmp_path / "target").mkdir()
        out.symlink_to(tmp_path / "target", target_is_directory=True)
    else:
        (out / "other_model").mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
        if foreign == "another tool's output":
            with replace_output_dir(tmp_path / "x", "other-tool", "--out"):
                pass
            os.replace(tmp_path / "x" / OUTPUT_MARKER, out / OUTPUT_MARKER)
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    with pytest.raises(UserError, match="--out .*mymodels is .*not an earlier output of tool") as refused:
        write_output(out, "new")
    assert "\n" not in str(refused.value)
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before
    with pytest.raises(UserError, match="not an earlier output of tool"):
        claim_output_dir(out, "tool", "root=")


def test_failure_while_writing_leaves_the_old_output_and_no_staging(tmp_path):
    out = tmp_path / "out"
    write_output(out, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with replace_output_dir(out, "tool", "--out") as staging:
            (staging / "result.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (out / "result.txt").read_text() == "old" and siblings(out) == ["out"]
    with pytest.raises(RuntimeError, match="disk full"):  # a first write fails too: no folder at all
        with replace_output_dir(tmp_path / "new", "tool", "--out"):
            raise RuntimeError("disk full")
    assert siblings(out) == ["out"]


def test_failed_rename_into_place_restores_the_old_output(tmp_path, monkeypatch):
    """Failure injected at the swap itself: the new folder's rename fails after the old one was set aside."""
    out = tmp_path / "out"
    write_output(out, "old")
    real_rename = os.rename

    def rename_failing_for_staging(source, target):
        if Path(source).name.startswith(".out.tmp."):
            raise OSError("injected rename failure")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename_failing_for_staging)
    with pytest.raises(OSError, match="injected"):
        write_output(out, "new")
    monkeypatch.undo()
    assert (out / "result.txt").read_text() == "old" and output_writer(out) == "tool"
    assert siblings(out) == ["out"]


def test_atomic_path_swaps_a_folder_without_removing_it_first(tmp_path, monkeypatch):
    """The old folder is removed only after the new one is in place (not rmtree, then rename)."""
    import shutil

    out = tmp_path / "folder"
    out.mkdir()
    (out / "a").write_text("old")
    seen_when_removing = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: (seen_when_removing.append((out / "a").read_text()),
                                                                 real_rmtree(path, *a, **k)))
    with atomic_path(out) as staging:
        staging.mkdir()
        (staging / "a").write_text("new")
    assert seen_when_removing == ["new"] and (out / "a").read_text() == "new" and siblings(out) == ["folder"]


def test_claim_marks_a_new_or_empty_folder_and_keeps_its_own(tmp_path):
    root = claim_output_dir(tmp_path / "demo", "launcher.demo", "root=")
    (root / "raw").mkdir()
    assert claim_output_dir(root, "launcher.demo", "root=") == root and (root / "raw").is_dir()
    assert output_writer(root) == "launcher.demo"
