"""Shared test settings (offline, quiet, loopback only) and the session-wide tiny models."""

import os

import pytest

# Set before any test imports the libraries that read them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need a CUDA device: where there is none they are skipped with that reason
    (listed by -ra), and run with `pytest -m gpu` on a machine that has one."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run `pytest -m gpu` (or launcher/gpu_run.sh) where one is")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip checkpoint file (random weights, seeded) with its model config beside it."""
    from process_fixtures import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny GPT-2 + BPE tokenizer trained on the synthetic captions, built once per test session."""
    from train_fixtures import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
