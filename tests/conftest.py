"""Shared test settings (offline, quiet, loopback only) and the session-wide tiny models."""

import os

import pytest

# Set before any test imports the libraries that read them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread per process: the suite's command runs three pytest workers, each launching 2- and
# 4-rank DeepSpeed runs and Ray actors, on 2 cores; torch's default of a thread per core in every one
# of them oversubscribed the cores (the suite's wall time on 2 cores: 2 workers 1231 s, 1053 s with
# one thread; 3 workers 1225 s, 947 s with one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The files whose tests take longest on 2 cores under the suite's command (`--durations=0`, setup,
# call and teardown summed per file), longest first. That command runs files on three workers
# (`-n 3 --dist loadfile`: a file's tests, and so its module fixtures, stay on one worker); starting
# the long ones first keeps one worker from running a long file alone at the end. Order only: a file
# missing here runs after these, in its own order.
LONGEST_FILES_FIRST = (
    "test_process_pipeline.py", "test_train_deepspeed.py", "test_demo_small.py", "test_consolidate.py",
    "test_train_alignment.py", "test_ray_cluster.py", "test_train_four_ranks.py", "test_train_ep_parity.py",
    "test_slurm.py", "test_train_failures.py", "test_download.py", "test_ablate.py",
    "test_process_streaming.py", "test_bench.py", "test_caption_cli.py", "test_process_ray_nodes.py",
    "test_alignment_mechanics.py", "test_gpu_run.py", "test_qa_train.py", "test_model_metrics.py",
)


def pytest_collection_modifyitems(config, items):
    """Files in LONGEST_FILES_FIRST order (stable: tests keep their order within a file), then the
    `gpu`-marked tests: where there is no CUDA device they are skipped with that reason (listed by
    -ra), and run with `pytest -m gpu` on a machine that has one."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

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
