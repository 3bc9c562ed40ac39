"""Training curves: one step convention (completed steps) in log.jsonl, log.txt, checkpoints and figures; the
training loss in log.txt; TensorBoard events mirroring log.jsonl and the figures (read back with TensorBoard's own
EventAccumulator), and runs without tensorboard installed."""

import os
import re
import sys

import pytest
import yaml
from PIL import Image

import pretrain_vae
import train_ocl
from helpers import read_jsonl, save_vae, write_ocl_config


def vae_config(tmp_path, shapes_dir, **overrides):
    config = dict(quantizer="msf", code_dim=8, vae_width=8, codebook_size=64, data_dir=shapes_dir, resolution=32,
                  steps=4, batch_size=4, num_workers=0, log_every=2, val_every=2, val_batch_size=8, val_samples=8,
                  out_dir=str(tmp_path / "run"))
    config.update(overrides)
    (tmp_path / "vae.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "vae.yaml")


def event_accumulator(run_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = event_accumulator.EventAccumulator(os.path.join(run_dir, "tensorboard"),
                                                     size_guidance={event_accumulator.SCALARS: 0,
                                                                    event_accumulator.IMAGES: 0})
    accumulator.Reload()
    return accumulator


def test_one_step_convention_and_the_loss_in_log_txt(tmp_path, shapes_dir):
    pretrain_vae.main([vae_config(tmp_path, shapes_dir)])
    run = tmp_path / "run"
    entries = read_jsonl(run / "log.jsonl")
    # 4 steps, log_every 2: training rows after 1 and 3 completed steps (iterations 0 and 2) and the last one
    assert [e["step"] for e in entries if "loss" in e] == [1, 3, 4]
    assert [e["step"] for e in entries if "val_recon_mse_scale1" in e] == [2, 4]
    checkpoints = sorted(n for n in os.listdir(run) if n.startswith("ckpt_"))
    figures = sorted(os.listdir(run / "figures"))
    assert checkpoints == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
    assert figures == ["step_0000002.png", "step_0000004.png"]
    text = (run / "log.txt").read_text()
    assert re.findall(r"step (\d+): loss", text) == ["1", "3", "4"]
    assert re.findall(r"step (\d+): val_", text) == ["2", "4"]
    # the loss printed in log.txt is log.jsonl's (4 significant digits)
    losses = [float(v) for v in re.findall(r"step \d+: loss ([-\d.e+]+)", text)]
    assert losses == pytest.approx([e["loss"] for e in entries if "loss" in e], rel=1e-3)


def test_resume_keeps_the_log_up_to_the_checkpoint(tmp_path, shapes_dir):
    config = vae_config(tmp_path, shapes_dir, log_every=1)
    pretrain_vae.main([config, "--steps", "2"])
    pretrain_vae.main([config, "--resume", "auto", "--allow_changed", "steps"])  # extends the 2-step run to 4
    steps = [e["step"] for e in read_jsonl(tmp_path / "run" / "log.jsonl")]
    assert steps == [1, 2, 2, 3, 4, 4]  # training 1, 2 + validation 2, then 3, 4 + validation 4: no duplicates


def test_tensorboard_mirrors_log_jsonl(tmp_path, shapes_dir):
    pytest.importorskip("tensorboard")
    pretrain_vae.main([vae_config(tmp_path, shapes_dir)])
    run = tmp_path / "run"
    accumulator = event_accumulator(run)
    entries = read_jsonl(run / "log.jsonl")
    tags = accumulator.Tags()
    for key in ("loss", "lr", "grad_norm", "val_recon_mse_scale1", "val_codebook0_usage"):
        tag = ("val/" + key[4:]) if key.startswith("val_") else "train/" + key
        assert tag in tags["scalars"], (tag, tags["scalars"])
        expected = [(e["step"], e[key]) for e in entries if key in e]
        got = [(event.step, event.value) for event in accumulator.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)
    images = accumulator.Images("figures/validation")
    assert [image.step for image in images] == [2, 4]
    with Image.open(run / "figures" / "step_0000004.png") as figure:
        width, height = figure.size
    assert (images[-1].width, images[-1].height) == (width, height)


def test_ocl_run_writes_tensorboard_figures(tmp_path, shapes_dir):
    pytest.importorskip("tensorboard")
    vae = save_vae(tmp_path / "vae.pt", "msf", 8)
    train_ocl.main([write_ocl_config(tmp_path, shapes_dir, None, vae_ckpt=vae, steps=2, val_every=2)])
    accumulator = event_accumulator(tmp_path / "run")
    assert [e.step for e in accumulator.Scalars("val/ari")] == [2]
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2]
    assert [image.step for image in accumulator.Images("figures/validation")] == [2]


def test_runs_unchanged_without_tensorboard(tmp_path, shapes_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    pretrain_vae.main([vae_config(tmp_path, shapes_dir, steps=2)])
    run = tmp_path / "run"
    assert not (run / "tensorboard").exists()
    assert sorted(n for n in os.listdir(run) if n.endswith(".pt")) == ["ckpt_0000002.pt"]
