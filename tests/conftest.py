"""Shared fixtures: small data in the real formats and one tiny training run reused by many tests."""
import os
import sys
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before MindSpore runs a convolution
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mindspore as ms  # noqa: E402
import pytest  # noqa: E402

# The device is chosen before any test runs a kernel: MindSpore refuses to choose it afterwards, and
# tests that call runtime.setup (as the doors do) may run after tests that computed something.
ms.set_device("CPU")

# A narrow iresnet18 and a handful of identities: a few seconds per epoch on two cores.
TINY_TRAIN_ARGS = ["--network", "r18", "--width", "8", "--batch_size", "8", "--epochs", "4",
                   "--lr", "3.2", "--schedule", "3", "--gamma", "0.5", "--margin", "arcface", "--scale", "16",
                   "--log_interval", "1", "--num_workers", "1", "--keep_checkpoint_max", "3", "--seed", "7"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """8 training identities x 8 images (RecordIO) and a 40-pair held-out verification .bin."""
    from src.data.demo_data import make_demo_data
    root = tmp_path_factory.mktemp("tiny_data")
    train_dir, bin_path = make_demo_data(str(root), num_train_ids=8, images_per_id=8, num_test_ids=6,
                                         num_pairs=40, seed=3, progress=False)
    return Path(train_dir), Path(bin_path)


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """Four epochs of 8 steps, verifying the held-out pairs every 16 steps; returns the output folder
    (checkpoints, best.ckpt, train.log, metrics.jsonl, training_curve.png)."""
    from train import main
    out = tmp_path_factory.mktemp("trained_run")
    eval_args = ["--eval_url", str(tiny_data[1].parent), "--eval_targets", "demo", "--eval_interval", "16",
                 "--eval_batch_size", "16"]
    assert main(["--data_url", str(tiny_data[0]), "--train_url", str(out)] + TINY_TRAIN_ARGS + eval_args) == 0
    return out


# Tiers (pyproject.toml): tests that use these fixtures train, export or launch workers.
TIER_OF_FIXTURE = {"trained_run": "slow", "exported": "slow", "dist_run": "dist"}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, tier in TIER_OF_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(tier)
