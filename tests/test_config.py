"""Typed configuration: every shipped config loads; user errors are one line and exit code 2."""

import subprocess
import sys

import pytest
from common_fixtures import REPO

from vlpdist.config import Config, load_config, save_config
from vlpdist.errors import UserError

CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))  # configs/ray/ holds Ray's own cluster files


def test_configs_folder_is_not_empty():
    assert any(p.name == "demo.yaml" for p in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)


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
