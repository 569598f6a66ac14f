"""Outputs: a command never replaces what it did not write (a folder without its marker, a file not
naming it, is refused), its own earlier output is swapped out atomically, and no staging survives a
failure; each command's --out checked through its CLI (issue 16 item 1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vlpdist.atomic import (OUTPUT_FILE_KEY, OUTPUT_MARKER, atomic_path, claim_output_dir, output_file_writer, output_writer,
                            replace_output_dir, write_output_json)
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


# Output files: a JSON object naming its command (`written_by`) is that command's; nothing else is.

def user_owned_targets(tmp_path: Path) -> dict[str, Path]:
    """Things a user may have under the name a command is told to write: none of them is that command's."""
    tmp_path.mkdir(exist_ok=True)
    targets = {name: tmp_path / name for name in ("notes.json", "other.json", "results", "link.json", "binary.json")}
    targets["notes.json"].write_text("my notes, not JSON\n")
    targets["other.json"].write_text(json.dumps({OUTPUT_FILE_KEY: "launcher.somebody_else", "score": 1}))
    (targets["results"] / "kept.txt").parent.mkdir()
    (targets["results"] / "kept.txt").write_text("mine")
    targets["binary.json"].write_bytes(b"\xff\xfe\x00")
    (tmp_path / "linked.txt").write_text("the link's target")
    targets["link.json"].symlink_to(tmp_path / "linked.txt")
    return targets


def tree_snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes() for path in sorted(folder.rglob("*"))}


def test_write_output_json_replaces_its_own_file_and_refuses_every_other(tmp_path):
    out = tmp_path / "own" / "eval.json"
    write_output_json(out, {"score": 1}, "tool", "--out")
    assert json.loads(out.read_text()) == {OUTPUT_FILE_KEY: "tool", "score": 1} and output_file_writer(out) == "tool"
    write_output_json(out, {"score": 2}, "tool", "--out")
    assert json.loads(out.read_text())["score"] == 2 and siblings(out) == ["eval.json"]
    (tmp_path / "empty.json").touch()  # an empty file holds nothing to lose (a `touch`ed or mktemp'd name)
    write_output_json(tmp_path / "empty.json", {"score": 3}, "tool", "--out")
    assert output_file_writer(tmp_path / "empty.json") == "tool"

    targets = user_owned_targets(tmp_path / "user")
    before = tree_snapshot(tmp_path / "user")
    for name, target in targets.items():
        with pytest.raises(UserError, match=f"--out .*{name} is a .*not an earlier output of tool") as refused:
            write_output_json(target, {"score": 4}, "tool", "--out")
        assert "\n" not in str(refused.value)
    assert "written by launcher.somebody_else" in str(pytest.raises(
        UserError, write_output_json, targets["other.json"], {}, "tool", "--out").value)
    assert tree_snapshot(tmp_path / "user") == before


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of a command's `main(argv)`: 0 when it returns."""
    try:
        main(argv)
    except SystemExit as exit:
        return exit.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_evaluate_refuses_an_out_file_it_did_not_write_before_any_work(tmp_path, capsys):
    """Refused before the model or the features are even looked for: they do not exist here."""
    from launcher.evaluate import main as evaluate_main

    targets = user_owned_targets(tmp_path)
    before = tree_snapshot(tmp_path)
    for name, target in targets.items():
        code, err = run_cli(evaluate_main, ["--model", str(tmp_path / "no_model"), "--features", str(tmp_path / "no_features"),
                                            "--out", str(target)], capsys)
        assert code == 2 and f"not an earlier output of launcher.evaluate" in err and err.count("\n") == 1, (name, err)
    assert tree_snapshot(tmp_path) == before
    # Its own earlier output passes the check: the run goes on to the (missing) features.
    (tmp_path / "own.json").write_text(json.dumps({OUTPUT_FILE_KEY: "launcher.evaluate", "samples": 5}))
    code, err = run_cli(evaluate_main, ["--model", str(tmp_path / "no_model"), "--features", str(tmp_path / "no_features"),
                                        "--out", str(tmp_path / "own.json")], capsys)
    assert code == 2 and "--features" in err and "not an earlier output" not in err


@pytest.mark.slow
def test_evaluate_replaces_its_own_earlier_output(tmp_path, tiny_lm, tiny_clip):
    """A real evaluation (tiny export, 2 held-out samples) over the file an earlier evaluation wrote."""
    from export_fixtures import trained_run
    from train_fixtures import tiny_features

    from launcher.evaluate import main as evaluate_main
    from launcher.export import main as export_main

    checkpoint, _ = trained_run(tmp_path / "run", tiny_lm, tiny_clip, tuned=False)
    export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")])
    features = tiny_features(tmp_path / "features", num_shards=1, samples_per_shard=2)
    out = tmp_path / "eval.json"
    out.write_text(json.dumps({OUTPUT_FILE_KEY: "launcher.evaluate", "samples": 999, "stale": True}))
    evaluate_main(["--model", str(tmp_path / "export"), "--features", str(features / "00000.tar"), "--no-spice",
                   "--out", str(out)])
    written = json.loads(out.read_text())
    assert written[OUTPUT_FILE_KEY] == "launcher.evaluate" and written["samples"] == 2 and "stale" not in written
    assert siblings(out) == sorted(["eval.json", "export", "features", "run"])


def test_geodesic_stretch_refuses_a_foreign_out_and_replaces_its_own(tmp_path, capsys):
    from launcher.geodesic_stretch import main as stretch_main

    tiny = ["--nodes", "96", "--dim", "32", "--ks", "3", "--landmarks", "4", "--anchors", "4"]
    targets = user_owned_targets(tmp_path / "user")
    before = tree_snapshot(tmp_path / "user")
    for name, target in targets.items():
        code, err = run_cli(stretch_main, [*tiny, "--out", str(target)], capsys)
        assert code == 2 and "not an earlier output of launcher.geodesic_stretch" in err and err.count("\n") == 1, (name, err)
    assert tree_snapshot(tmp_path / "user") == before

    out = tmp_path / "own" / "stretch.json"
    out.parent.mkdir()
    stretch_main([*tiny, "--seed", "0", "--out", str(out)])
    assert output_file_writer(out) == "launcher.geodesic_stretch" and json.loads(out.read_text())["settings"]["seed"] == 0
    stretch_main([*tiny, "--seed", "1", "--out", str(out)])
    assert json.loads(out.read_text())["settings"]["seed"] == 1 and siblings(out) == ["stretch.json"]


def test_make_demo_lm_refuses_a_foreign_folder_and_replaces_its_own(tmp_path, capsys):
    from data_ingest.sources.demo_lm import make_demo_lm
    from launcher.make_demo_lm import main as make_demo_lm_main

    user = tmp_path / "my_lm"
    user.mkdir()
    (user / "config.json").write_text("{\"my\": \"model\"}")
    code, err = run_cli(make_demo_lm_main, ["--out", str(user), "--steps", "1"], capsys)
    assert code == 2 and "not an earlier output of launcher.make_demo_lm" in err and err.count("\n") == 1
    with pytest.raises(UserError, match="model.lm_name= .*my_lm is a non-empty folder"):  # called as a library, too
        make_demo_lm(user, ["a red circle"], steps=1, option="model.lm_name=")
    assert sorted(path.name for path in user.iterdir()) == ["config.json"]

    out = tmp_path / "lm"
    tiny = dict(width=16, layers=1, heads=2, vocab_size=280, steps=1, batch_size=2)
    make_demo_lm(out, ["a red circle on the left", "a blue square"], **tiny)
    assert output_writer(out) == "launcher.make_demo_lm" and (out / "config.json").is_file()
    (out / "left_by_the_first_build.txt").write_text("x")
    make_demo_lm(out, ["a green triangle at the top", "a blue square"], **tiny)
    assert not (out / "left_by_the_first_build.txt").exists() and (out / "tokenizer.json").is_file()
    assert siblings(out) == ["lm", "my_lm"]


def test_gpu_wheels_replaces_its_own_folder_whole_and_keeps_it_when_a_build_fails(tmp_path, capsys):
    """--from-installed packs pure-Python installs offline; rpds-py is compiled, so packing it fails mid-build."""
    from launcher.gpu_wheels import main as gpu_wheels_main

    out = tmp_path / ".whl"
    assert gpu_wheels_main(["--from-installed", "--only", "hjson", "--out", str(out)]) == 0
    assert output_writer(out) == "launcher.gpu_wheels" and [path.name.split("-")[0] for path in out.glob("*.whl")] == ["hjson"]
    (out / "stale.whl").write_text("from an older build")
    assert gpu_wheels_main(["--from-installed", "--only", "braceexpand", "--out", str(out)]) == 0
    assert sorted(path.name.split("-")[0] for path in out.glob("*.whl")) == ["braceexpand"] and siblings(out) == [".whl"]

    before = tree_snapshot(out)
    code, err = run_cli(gpu_wheels_main, ["--from-installed", "--only", "rpds-py", "--out", str(out)], capsys)
    assert code == 2 and "not a pure-Python package" in err
    assert tree_snapshot(out) == before and siblings(out) == [".whl"]  # the old folder as it was, no staging left


def test_ingest_never_replaces_a_config_yaml_it_did_not_write(tmp_path, capsys):
    """`data_ingest.run --config <root>/config.yaml root=<root>` used to overwrite the user's own file with
    the resolved config (comments and all gone); it is refused before any stage, and a config.yaml that
    save_config wrote is replaced on the next run."""
    import shutil

    from data_ingest.run import main as ingest_main
    from vlpdist.config import SAVED_CONFIG_HEADER, load_config, save_config

    root = tmp_path / "my data"
    root.mkdir()
    user_config = root / "config.yaml"
    shutil.copy(Path(__file__).resolve().parent.parent / "configs" / "cc3m_download.yaml", user_config)
    before = tree_snapshot(tmp_path)
    code, err = run_cli(ingest_main, ["--config", str(user_config), f"root={root}", "--stage", "process"], capsys)
    assert code == 2 and "was not written by vlpdist" in err and err.count("\n") == 1, err
    assert tree_snapshot(tmp_path) == before
    own = tmp_path / "own"
    own.mkdir()
    config = load_config(str(user_config), [f"root={own}"])
    save_config(config, own)
    save_config(config, own)  # its own earlier file: replaced
    text = (own / "config.yaml").read_text()
    assert text.startswith(SAVED_CONFIG_HEADER) and load_config(str(own / "config.yaml"), []).root == str(own)
