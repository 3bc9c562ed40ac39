"""Shared fixtures: tiny synthetic datasets generated once per test session."""

import os

import pytest
import torch

import prepare_data
import runs


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small `shapes` dataset (48 train / 16 val images) in the project's LMDB format."""
    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_data.write_synthetic("shapes", str(out), {"train": 48, "val": 16}, seed=0, min_objects=2,
                                 max_objects=4, frames=0, workers=1, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory):
    """A small `shapes_video` dataset (6 train / 2 val videos of 12 frames)."""
    out = tmp_path_factory.mktemp("data") / "shapes_video"
    prepare_data.write_synthetic("shapes_video", str(out), {"train": 6, "val": 2}, seed=0, min_objects=2,
                                 max_objects=3, frames=12, workers=1, progress=False)
    return str(out)


@pytest.fixture(autouse=True)
def _few_threads():
    """Tests run on 2 cores; keep torch from oversubscribing them."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(autouse=True)
def _release_run_locks():
    """A run that stops with an error inside the test process keeps its run directory locked, as a real process does
    until it exits; the next test is another process's turn, so whatever a test left locked is released after it
    (else messages that name the latest held run, such as study.py's stop sentence, would name an earlier test's)."""
    yield
    for handle in runs._RUN_LOCKS.values():
        handle.close()
    runs._RUN_LOCKS.clear()
