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


def test_each_training_step_a_figure_times_runs_and_changes_the_weights():
    """The figures time closures; a closure that raises (a renamed option, a stale variable) would only show when
    someone runs bench.py. One Adam step of each must move the model's weights."""
    cpu = torch.device("cpu")
    for step in (bench.ocl_step("msf", cpu, False), bench.config_step("mixture_msf_easy", cpu),
                 bench.config_step("mixture_msf_easy", cpu, cached_target=True),
                 *(bench.config_step(f"{method}_msf_easy", cpu, cached_target=True)
                   for method in ("slate", "ogdr", "sysbinder", "slotdiffusion", "steve"))):
        optimizer = next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.optim.Adam))
        before = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
        step()
        after = [p.detach() for group in optimizer.param_groups for p in group["params"]]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_the_layout_figures_run_every_path_in_both_layouts():
    """conv_layout's and vae_step_layout's closures run (forward and backward) in both layouts; the step 'before'
    puts msf.channels_last back when it is done."""
    cpu = torch.device("cpu")
    for name, (module, x, *owner) in bench._layout_cases(cpu).items():
        for layout in (torch.contiguous_format, torch.channels_last):
            bench._layout_step(module, x, owner[0] if owner else None, layout)()
    original = bench.msf.channels_last
    for before in (False, True):
        bench._vae_layout_step("vae_msf_easy", {}, 4, before)()
    assert bench.msf.channels_last is original
