"""Helpers that several test files share: the repository root, the bounding-box oracle, a run's log and losses,
the torchrun launcher, and tiny OCL fixtures (a frozen VAE saved as pretrain_vae.py would, an OCL config)."""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import torch
import yaml

import msf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boxes_by_loop(segment, max_objects: int) -> np.ndarray:
    """Oracle: each object's normalised ltrb bounding box (K,4) by explicit search, zeros where it is absent."""
    height, width = segment.shape
    boxes = np.zeros((max_objects, 4), np.float32)
    for k in range(1, max_objects + 1):
        ys, xs = np.nonzero(segment == k)
        if len(ys):
            boxes[k - 1] = [xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height]
    return boxes


def read_jsonl(path) -> list:
    """The entries of a JSON-lines log, one dict per line."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(run_dir) -> dict:
    """{step: training loss} from a run directory's log.jsonl."""
    return {e["step"]: e["loss"] for e in read_jsonl(os.path.join(run_dir, "log.jsonl")) if "loss" in e}


def torchrun(script: str, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """Run a stage script as `processes` gloo ranks on the CPU (one thread each, so they fit on 2 cores)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), script, *args, "--device", "cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def save_vae(path, quantizer: str, code_dim: int, resolution: int = 32, **overrides) -> str:
    """A tiny untrained VAE checkpoint as pretrain_vae.py writes it; returns its path."""
    config = {k: o.default for k, o in msf.VAE_OPTIONS.items()}
    config.update(quantizer=quantizer, code_dim=code_dim, vae_width=8, codebook_size=64, **overrides)
    torch.manual_seed(0)
    vae = msf.build_vae(config)
    torch.save({"kind": "vae", "config": config, "model": vae.state_dict(), "step": 0,
                "data": {"resolution": resolution}}, path)
    return str(path)


def write_ocl_config(tmp_path, data_dir, vaes=None, name="ocl.yaml", **overrides) -> str:
    """A tiny train_ocl.py config in `tmp_path`; `vaes` ({(quantizer, code_dim): path}) supplies vae_ckpt."""
    config = dict(method="slate", guidance="msf", encoder="cnn", cnn_channels=8, encoder_stride=2, num_slots=4,
                  slot_dim=16, decoder_dim=16, decoder_layers=1, decoder_heads=2, decoder_dropout=0.0,
                  unet_channels=16, dinosaur_hidden=16, mixture_hidden=16, dino_pretrained=False, dino_depth=1, sysbinder_blocks=2,
                  sysbinder_prototypes=8, data_dir=data_dir, resolution=32, num_frames=3, steps=4, batch_size=4,
                  num_workers=0, log_every=1, val_every=2, val_batch_size=4, val_samples=4,
                  out_dir=str(tmp_path / "run"))
    config.update(overrides)
    if vaes is not None and config["guidance"] != "none" and "vae_ckpt" not in overrides:
        config["vae_ckpt"] = vaes[(config["guidance"], 4 if config["method"] == "slotdiffusion" else 8)]
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def write_vae_config(tmp_path, shapes_dir, name="vae.yaml", **overrides):
    """A tiny MSF VAE run config (8-d codes, 32 px, a few steps) written to tmp_path/name; returns its path."""
    config = dict(quantizer="msf", code_dim=8, vae_width=8, codebook_size=64, data_dir=shapes_dir, resolution=32,
                  steps=6, batch_size=4, num_workers=0, log_every=1, val_every=3, val_batch_size=8, val_samples=8,
                  replace_every=2, out_dir=str(tmp_path / "run"), gumbel_anneal_fraction=1.0)
    config.update(overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


@contextlib.contextmanager
def hold_flock(path):
    """Another process holding an exclusive flock on `path` (as a concurrent run or generation would) while the
    block runs."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, time\n"
                               f"f = open({str(path)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()
