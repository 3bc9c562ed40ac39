"""pretrain_vae.py end to end: outputs, exact resume, DDP equivalence, and the errors a user can cause."""

import os

import pytest
import torch
import yaml

import pretrain_vae
from errors import UserError
from helpers import losses, read_jsonl, torchrun, write_vae_config


def test_run_directory_contents(tmp_path, shapes_dir):
    pretrain_vae.main([write_vae_config(tmp_path, shapes_dir)])
    run = tmp_path / "run"
    assert sorted(set(os.listdir(run)) - {"tensorboard"}) == ["ckpt_0000003.pt", "ckpt_0000006.pt", "config.yaml",
                                                             "environment.json", "figures", "log.jsonl", "log.txt"]
    assert sorted(os.listdir(run / "figures")) == ["step_0000003.png", "step_0000006.png"]
    entries = read_jsonl(run / "log.jsonl")
    val = [e for e in entries if "val_recon_mse_scale1" in e]
    assert len(val) == 2 and "val_codebook0_usage" in val[0] and "val_recon_mse_scale3" in val[0]
    state = torch.load(run / "ckpt_0000006.pt", weights_only=True)
    assert state["kind"] == "vae" and state["step"] == 6 and state["config"]["quantizer"] == "msf"
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 6


def test_keeps_only_the_last_checkpoints(tmp_path, shapes_dir):
    pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, steps=4, val_every=1, keep_checkpoints=2)])
    assert sorted(n for n in os.listdir(tmp_path / "run") if n.endswith(".pt")) == ["ckpt_0000003.pt",
                                                                                      "ckpt_0000004.pt"]


def test_resume_is_bit_identical(tmp_path, shapes_dir):
    """Gumbel matching and code replacement on: RNG state, data order and schedules must all resume exactly."""
    config = write_vae_config(tmp_path, shapes_dir, gumbel=True, code_replacement=True)
    pretrain_vae.main([config])
    full = tmp_path / "run"
    pretrain_vae.main([config, "--out_dir", str(tmp_path / "resumed"), "--resume", str(full / "ckpt_0000003.pt")])
    resumed = tmp_path / "resumed"
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    assert all(a[s] == b[s] for s in b), (a, b)
    final_a = torch.load(full / "ckpt_0000006.pt", weights_only=True)["model"]
    final_b = torch.load(resumed / "ckpt_0000006.pt", weights_only=True)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_auto_continues_in_place(tmp_path, shapes_dir):
    config = write_vae_config(tmp_path, shapes_dir, steps=3)
    pretrain_vae.main([config])
    pretrain_vae.main([config, "--steps", "6", "--resume", "auto", "--allow_changed", "steps"])
    steps = [e["step"] for e in read_jsonl(tmp_path / "run" / "log.jsonl") if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["group", "batch"])
def test_ddp_two_processes_equal_one_process(tmp_path, shapes_dir, norm):
    """Same global batch: 1 process x 4 images and 2 gloo processes x 2 images give the same parameters (with
    BatchNorm: the same batch statistics and running statistics, those of the global batch)."""
    config = write_vae_config(tmp_path, shapes_dir, steps=3, val_every=3, gumbel=False, code_replacement=False,
                              num_workers=1, vae_norm=norm)
    pretrain_vae.main([config, "--out_dir", str(tmp_path / "one")])
    result = torchrun("pretrain_vae.py", config, "--out_dir", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "ckpt_0000003.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "ckpt_0000003.pt", weights_only=True)["model"]
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(la) == sorted(lb) == [1, 2, 3] and all(abs(la[s] - lb[s]) < 1e-5 for s in la), (la, lb)
    # Under BatchNorm a conv weight's gradient has directions the loss is invariant to (a channel's scale), where it
    # is rounding noise; Adam's first steps scale each gradient element to about lr whatever its size, so those
    # elements differ by up to ~0.2 lr between the two summation orders. The losses above agree to 1e-7; per-rank
    # statistics would move them by 1e-2.
    atol = 1e-5 if norm == "group" else 1e-3
    for key in one:
        torch.testing.assert_close(two[key].float(), one[key].float(), atol=atol, rtol=1e-4, msg=key)


def test_non_finite_loss_stops_with_the_step(tmp_path, shapes_dir):
    with pytest.raises(UserError, match="non-finite loss at step"):
        pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, lr=1e30, grad_clip=0.0, steps=20, val_every=100)])


def test_resume_from_another_config_is_refused(tmp_path, shapes_dir):
    pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, steps=3)])
    with pytest.raises(UserError, match="quantizer='msf' but the config says quantizer='vq'"):
        pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, quantizer="vq"), "--resume", "auto"])


def test_bad_inputs_fail_with_one_sentence(tmp_path, shapes_dir):
    with pytest.raises(UserError, match="does not exist; create it with"):
        pretrain_vae.main([write_vae_config(tmp_path, str(tmp_path / "missing"))])
    with pytest.raises(UserError, match="unknown config key 'stepz'"):
        pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, stepz=3)])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        pretrain_vae.main([write_vae_config(tmp_path, shapes_dir), "--resume", str(bad)])
    with pytest.raises(UserError, match="divisible"):
        pretrain_vae.main([write_vae_config(tmp_path, shapes_dir, resolution=40)])
