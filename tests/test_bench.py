"""bench.py's peak-memory measurement against allocations of known size."""

import os

import pytest
import torch

import bench

SIZES_MIB = {"small": 96, "large": 320}


def allocate(name, device, full):
    """A 'training step' whose only memory is one float32 tensor of SIZES_MIB[name], every page written."""
    def step():
        tensor = torch.ones(SIZES_MIB[name] * 2 ** 20 // 4, device=device)
        assert float(tensor[-1]) == 1.0

    return step


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="CPU peak memory is measured on Linux only")
def test_cpu_peak_memory_matches_known_allocations():
    # The parent holds more memory than either step needs: a measurement that inherits the parent's resident set
    # (getrusage's ru_maxrss in a spawned child does) would report it for both.
    ballast = torch.ones(640 * 2 ** 20 // 4)
    result = bench.peak_memory(allocate, ("small", "large"), torch.device("cpu"), False, "test")
    del ballast
    for name, mib in SIZES_MIB.items():
        measured_mib = result[f"test_peak_gib_{name}"] * 1024
        assert mib - 4 <= measured_mib <= mib + 48, (name, measured_mib)
    assert result["test_peak_memory_ratio"] == pytest.approx(320 / 96, rel=0.15)
