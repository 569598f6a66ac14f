"""Typed configuration: every shipped config loads and passes the value checks of the stage that reads
it; the real recipes hold what the cluster walk-through promises; user errors are one line and exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest
from common_fixtures import REPO

from data_ingest.process.run import check_process_config
from data_ingest.url_list import check_url_list
from vlpdist.config import Config, load_config, save_config
from vlpdist.errors import UserError, exit_on_user_error
from vlpdist.models.mapper import check_model_config
from vlpdist.parallel.deepspeed_config import build_deepspeed_config, check_train_config

CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))  # configs/ray/ holds Ray's own cluster files
TRAIN_RECIPE = REPO / "configs" / "cc3m_vitb32_gpt2.yaml"
GPUS_PER_NODE = 8
# Each download recipe's columns, as each dataset publishes its URL list (CC3M's TSV after the header
# line its comment asks for; SBU's and LAION's parquet files).
DOWNLOAD_RECIPES = {
    "cc3m_download.yaml": ("tsv", "url", "caption"),
    "sbu_download.yaml": ("parquet", "image_url", "caption"),
    "laion400m_download.yaml": ("parquet", "URL", "TEXT"),
}


def test_configs_folder_is_not_empty():
    assert any(p.name == "demo.yaml" for p in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_passes_the_value_checks(path, tmp_path):
    # Paths under root move to tmp_path; a demo's ground-truth file, written by its download stage, is made here.
    config = load_config(path, [f"root={tmp_path}"])
    if config.process.demo_truth:
        Path(config.process.demo_truth).parent.mkdir(parents=True, exist_ok=True)
        Path(config.process.demo_truth).touch()
    check_model_config(config.model, config.train.ep_size)
    check_train_config(config.train, world_size=config.train.ep_size)  # the smallest launch it allows
    check_process_config(config.process)


def test_train_recipe_is_the_published_setting():
    config = load_config(TRAIN_RECIPE)
    open_clip = pytest.importorskip("open_clip")
    assert (config.process.clip_model, config.process.clip_pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert (config.process.clip_model, config.process.clip_pretrained) in open_clip.list_pretrained()
    model = config.model
    assert (model.mapper, model.num_experts, model.top_k, model.prefix_length) == ("moe", 8, 2, 10)
    assert (model.lm_name, model.freeze_lm) == ("gpt2", True)
    assert (config.train.zero_stage, config.train.precision, config.train.ep_size) == (2, "bf16", GPUS_PER_NODE)


@pytest.mark.parametrize("nodes", [1, 4, 16])
def test_train_recipe_deepspeed_config_on_nodes_of_8_gpus(nodes):
    config = load_config(TRAIN_RECIPE)
    train, world_size = config.train, GPUS_PER_NODE * nodes
    check_model_config(config.model, train.ep_size)
    ds = build_deepspeed_config(train, world_size=world_size, on_gpu=True)
    assert ds["train_micro_batch_size_per_gpu"] == train.micro_batch_size
    assert ds["gradient_accumulation_steps"] == train.gradient_accumulation_steps
    assert ds["train_batch_size"] == train.micro_batch_size * train.gradient_accumulation_steps * world_size
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == train.zero_stage == 2  # DeepSpeed's MoE allows ZeRO 1 or 2 only
    assert ds["zero_optimization"]["overlap_comm"]  # a GPU setting
    assert ds["optimizer"]["params"]["torch_adam"] and ds["optimizer"]["params"]["fused"]  # torch's fused AdamW, no op compiled
    # Expert parallelism: one expert per GPU within a node, the experts replicated once per node.
    assert world_size % train.ep_size == 0 and config.model.num_experts % train.ep_size == 0
    assert config.model.num_experts // train.ep_size == 1
    assert world_size // train.ep_size == nodes


def test_train_recipe_refuses_a_world_its_experts_do_not_divide():
    with pytest.raises(UserError, match="train.ep_size"):
        build_deepspeed_config(load_config(TRAIN_RECIPE).train, world_size=12, on_gpu=True)


@pytest.mark.parametrize("name", sorted(DOWNLOAD_RECIPES))
def test_download_recipe_reads_its_dataset_columns(name, tmp_path):
    import pandas as pd

    input_format, url_col, caption_col = DOWNLOAD_RECIPES[name]
    config = load_config(REPO / "configs" / name)
    download = config.download
    assert (download.input_format, download.url_col, download.caption_col) == DOWNLOAD_RECIPES[name]
    # A two-row file shaped as the dataset publishes it passes the same check the download stage runs.
    rows = pd.DataFrame({caption_col: ["a dog on the grass", "a red car"],
                         url_col: ["http://127.0.0.1/1.jpg", "http://127.0.0.1/2.jpg"],
                         **{column: [0.0, 1.0] for column in download.extra_columns}})
    url_list = tmp_path / f"urls.{input_format}"
    if input_format == "parquet":
        rows.to_parquet(url_list, index=False)
    else:
        rows.to_csv(url_list, sep="\t", index=False)
    download.url_list = str(url_list if Path(download.url_list).suffix else tmp_path)
    checked = check_url_list(download)
    assert sum(file.rows for file in checked.files) == 2


def test_overrides_win_over_yaml_and_are_typed(tmp_path):
    config = load_config(REPO / "configs" / "demo.yaml", ["download.timeout_s=7", "demo.seed=3", f"root={tmp_path}"])
    assert config.download.timeout_s == 7.0 and isinstance(config.download.timeout_s, float)
    assert config.demo.seed == 3
    saved = save_config(config, tmp_path)
    assert load_config(saved).download.timeout_s == 7.0


@pytest.mark.parametrize(
    "yaml_text, overrides, expected",
    [
        ("download:\n  timeoutt: 3\n", [], "unknown config key 'download.timeoutt' in {file}"),
        ("download:\n  timeout_s: fast\n", [], "config key 'download.timeout_s' in {file}"),
        ("", ["download.nope=1"], "unknown config key 'download.nope' in command line"),
        ("", ["demo.num_samples=many"], "config key 'demo.num_samples' in command line"),
        ("", ["download.distributor=spark"], "config key 'download.distributor' is 'spark'"),
        ("download: [1, 2\n", [], "config file {file} line"),
        ("train: 5\n", [], "config key 'train' in {file} is a section"),
    ],
)
def test_config_errors_name_the_key_and_the_file(tmp_path, yaml_text, overrides, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert expected.format(file=path) in message
    assert "\n" not in message


# Malformed overrides: each is one line naming the key, exit code 2, no traceback.
BAD_OVERRIDES = [
    ("train=5", "config key 'train' in command line is a section"),
    ("root.x=1", "config key 'root' in command line is a value, not a section"),
    ("train.seed.x=1", "config key 'train.seed' in command line is a value, not a section"),
    ("train.nope=1", "unknown config key 'train.nope' in command line"),
    ("nope.seed=1", "unknown config key 'nope' in command line"),
    ("train.seed=abc", "config key 'train.seed' in command line: 'abc' is not an integer"),
    ("train.seed=1.5", "config key 'train.seed' in command line: '1.5' is not an integer"),
    ("train.seed=", "config key 'train.seed' in command line: '' is not an integer"),
    ("train.lr=fast", "config key 'train.lr' in command line: 'fast' is not a number"),
    ("train.lr=nan", "config key 'train.lr' in command line: 'nan' is not a finite number"),
    ("train.compile=yes", "config key 'train.compile' in command line: 'yes' is not true or false"),
    ("train.compile=1", "config key 'train.compile' in command line: '1' is not true or false"),
    ("model.kernel_sizes=3", "config key 'model.kernel_sizes' in command line: '3' is not a list"),
    ("model.kernel_sizes=[3, x]", "config key 'model.kernel_sizes' in command line: 'x' is not an integer"),
    ("=x", "config override '=x' (command line) has an empty key"),
    ("train.=1", "config override 'train.=1' (command line) has an empty key"),
    ("train..seed=1", "has an empty key"),
    ("train.", "config override 'train.' (command line) is not of the form key.sub=value"),
    ("train.seed", "is not of the form key.sub=value"),
    ("train.seed=-1", "config key 'train.seed' is -1; it must be in [0, 2**32)"),
    ("train.seed=4294967296", "config key 'train.seed' is 4294967296"),
    ("demo.lm_steps=0", "config key 'demo.lm_steps' must be >= 1, not 0"),
]


@pytest.mark.parametrize("override, expected", BAD_OVERRIDES, ids=[item for item, _ in BAD_OVERRIDES])
def test_a_malformed_override_is_one_line_and_exit_2(capsys, override, expected):
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(load_config)(None, [override])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err


# (override, field, the value it must hold): a string field keeps the text after the first '=' as
# typed; the others are converted by the field's declared type, not by YAML.
GOOD_OVERRIDES = [
    ("train.output_dir=/data/my runs/run #2", "train.output_dir", "/data/my runs/run #2"),
    ("root=007", "root", "007"),
    ("download.url_list=@x", "download.url_list", "@x"),
    ("download.url_list= padded ", "download.url_list", " padded "),
    ("download.url_list=a=b", "download.url_list", "a=b"),
    ("download.url_list=${HOME}", "download.url_list", "${HOME}"),
    ("download.url_list=", "download.url_list", ""),
    ("process.filter=null", "process.filter", "null"),
    ("process.captioner=true", "process.captioner", "true"),
    ("train.seed=007", "train.seed", 7),
    ("train.lr=1e-3", "train.lr", 1e-3),
    ("align.itc_weight=0", "align.itc_weight", 0.0),
    ("process.clip_threshold=-1.0", "process.clip_threshold", -1.0),
    ("train.compile=true", "train.compile", True),
    ("train.resume=False", "train.resume", False),
    ("model.kernel_sizes=[3, 5]", "model.kernel_sizes", [3, 5]),
    ("model.kernel_sizes=[]", "model.kernel_sizes", []),
    ("download.extra_columns=[similarity, punsafe]", "download.extra_columns", ["similarity", "punsafe"]),
]


@pytest.mark.parametrize("override, key, expected", GOOD_OVERRIDES, ids=[item for item, _, _ in GOOD_OVERRIDES])
def test_an_override_holds_exactly_its_typed_value_and_round_trips(tmp_path, override, key, expected):
    def value(config):
        section, _, name = key.rpartition(".")
        return getattr(getattr(config, section) if section else config, name)

    config = load_config(REPO / "configs" / "demo.yaml", [override])
    assert value(config) == expected and type(value(config)) is type(expected)
    assert value(load_config(save_config(config, tmp_path))) == expected  # the saved run config reads back the same


def test_optional_and_enum_fields_take_null_and_member_names():
    from enum import Enum
    from typing import Optional

    from vlpdist.config import _convert_override_value

    class Mode(Enum):
        FAST = "fast"

    assert _convert_override_value("null", Optional[int], "k") is None
    assert _convert_override_value("3", Optional[int], "k") == 3
    assert _convert_override_value("null", str, "k") == "null"
    assert _convert_override_value("FAST", Mode, "k") is Mode.FAST and _convert_override_value("fast", Mode, "k") is Mode.FAST
    with pytest.raises(UserError, match="'slow' is not one of"):
        _convert_override_value("slow", Mode, "k")


@pytest.mark.parametrize(
    "command, override, expected",
    [
        (["launcher/train.py", "--config", "configs/demo.yaml"], "train=5", "config key 'train' in command line is a section"),
        (["-m", "data_ingest.run", "--config", "configs/demo.yaml"], "train.compile=yes", "'yes' is not true or false"),
    ],
)
def test_the_entry_points_refuse_a_malformed_override_in_one_line(command, override, expected):
    result = subprocess.run([sys.executable, *command, override], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
        (["--config", "configs/demo.yaml", "download.bogus=1"], "unknown config key 'download.bogus'"),
        (["--config", "configs/demo.yaml", "download.url_list=/nonexistent/urls.parquet"], "URL list /nonexistent/urls.parquet does not exist"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, args, expected):
    result = subprocess.run(
        [sys.executable, "-m", "data_ingest.run", *args, f"root={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
