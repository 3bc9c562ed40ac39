"""Helpers that several test files share: the repository root, the bounding-box oracle, a run's log and losses,
the torchrun launcher, and tiny OCL fixtures (a frozen VAE saved as pretrain_vae.py would, an OCL config)."""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
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


def check_statistics(split) -> dict:
    """Assert that a written split's metadata statistics are what an oracle counts: every stored segment (every frame
    of a video) read back and counted with np.unique, objects being the ids other than 0 and 255. Returns the
    oracle's per-image object counts, object areas and background shares (percent)."""
    objects, areas, background = [], [], []
    for i in range(len(split)):
        segment = split[i]["segment"]
        for frame in segment.reshape(-1, *segment.shape[-2:]):
            ids, counts = np.unique(frame, return_counts=True)
            kept = (ids != 0) & (ids != 255)
            objects.append(int(kept.sum()))
            areas.extend(100 * counts[kept] / frame.size)
            background.append(100 * counts[ids == 0].sum() / frame.size)
    statistics = split.meta["statistics"]
    assert statistics["samples"] == len(split) and statistics["images"] == len(objects)
    assert statistics["resolution"] == list(split[0]["segment"].shape[-2:])
    assert statistics["objects_per_image"] == pytest.approx({"min": min(objects), "mean": np.mean(objects),
                                                             "max": max(objects)})
    assert statistics["object_area_percent"] == pytest.approx({f"p{q}": np.percentile(areas, q)
                                                               for q in (5, 25, 50, 75, 95)})
    assert statistics["background_percent_mean"] == pytest.approx(np.mean(background))
    return {"objects": objects, "areas": areas, "background": background}


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


# A stage for study.py's tests, run as `stage.py MARK OTHER`: it writes its pid to MARK, writes MARK.stopped when it
# gets SIGTERM (as a trainer takes it: like Ctrl-C) and ends; unless OTHER is '-', it sends SIGTERM to its parent (the
# study) once the file OTHER exists (both stages run); then it waits a minute.
STOPPABLE_STAGE = ("import os, signal, sys, time\n"
                   "mark, signal_parent_after = sys.argv[1], sys.argv[2]\n"
                   "def stopped(*_):\n    open(mark + '.stopped', 'w').write('SIGTERM')\n    sys.exit(143)\n"
                   "signal.signal(signal.SIGTERM, stopped)\n"
                   "open(mark, 'w').write(str(os.getpid()))\n"
                   "if signal_parent_after != '-':  # stop the study (as a Ctrl-C or kill would) once both run\n"
                   "    while not os.path.exists(signal_parent_after):\n        time.sleep(0.05)\n"
                   "    os.kill(os.getppid(), signal.SIGTERM)\n"
                   "time.sleep(60)\n")
