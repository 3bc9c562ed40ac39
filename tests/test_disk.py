"""Disk use of runs: checkpoints keep frozen weights (random DINO, guidance VAE) in one file per run, best.pt is a
slim self-contained export, and every file still loads offline to the exact model that was trained."""

import os
import shutil

import pytest
import torch

import api
import train_ocl
from errors import UserError
from helpers import save_vae, write_ocl_config
from runs import load_checkpoint, slim_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:DINO is RANDOMLY")


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes_dir):
    """A tiny SLATE run with the big-little encoder and a random (offline) one-block DINO; checkpoints at 1 and 2."""
    root = tmp_path_factory.mktemp("disk")
    vae = save_vae(root / "vae.pt", "msf", 8)
    config = write_ocl_config(root, shapes_dir, None, vae_ckpt=vae, encoder="dino_biglittle", steps=2, val_every=1)
    train_ocl.main([config])
    return root / "run"


def frozen_keys_of(model) -> set:
    """Oracle: the entries of the frozen sub-modules, named as in the whole model's state dict."""
    return ({"vae." + k for k in model.model.vae.state_dict()}
            | {"encoder.backbone.dino." + k for k in model.model.encoder.backbone.dino.state_dict()})


def test_frozen_weights_are_written_once_per_run(run):
    frozen_files = [n for n in os.listdir(run) if n.startswith("frozen-")]
    assert len(frozen_files) == 1
    best = api.load(str(run / "best.pt"))
    frozen = torch.load(run / frozen_files[0], weights_only=True)
    assert set(frozen) == frozen_keys_of(best)
    for name in ("ckpt_0000001.pt", "ckpt_0000002.pt"):
        raw = torch.load(run / name, weights_only=True)
        assert raw["frozen"] == frozen_files[0] and "optimizer" in raw and "rng" in raw
        assert not set(raw["model"]) & set(frozen)
        assert set(raw["model"]) | set(frozen) == set(best.model.state_dict())


def test_best_is_a_slim_export_of_its_checkpoint(run):
    raw = torch.load(run / "best.pt", weights_only=True)
    assert not {"optimizer", "scaler", "rng", "frozen"} & set(raw)
    assert {"model", "config", "step", "data", "vae_config", "metrics"} <= set(raw)
    # the checkpoint of the same step, merged with the run's frozen file, holds exactly best.pt's weights
    merged = load_checkpoint(str(run / f"ckpt_{raw['step']:07d}.pt"))
    assert set(merged["model"]) == set(raw["model"])
    assert all(torch.equal(merged["model"][k], raw["model"][k]) for k in raw["model"])


def test_random_dino_travels_with_the_run(run, tmp_path):
    frozen_name = next(n for n in os.listdir(run) if n.startswith("frozen-"))
    frozen = torch.load(run / frozen_name, weights_only=True)
    # a checkpoint moved with its frozen file, and best.pt alone, load the same random DINO
    shutil.copy(run / "ckpt_0000002.pt", tmp_path / "ckpt_0000002.pt")
    shutil.copy(run / frozen_name, tmp_path / frozen_name)
    os.makedirs(tmp_path / "alone")
    shutil.copy(run / "best.pt", tmp_path / "alone" / "best.pt")
    for path in (tmp_path / "ckpt_0000002.pt", tmp_path / "alone" / "best.pt"):
        loaded = api.load(str(path))
        state = loaded.model.state_dict()
        assert all(torch.equal(state[k], frozen[k]) for k in frozen), path
        slots, masks = loaded.slots_and_masks(torch.rand(1, 3, 32, 32) * 2 - 1)
        assert masks.shape == (1, 4, 32, 32)
    os.makedirs(tmp_path / "lonely")
    shutil.copy(run / "ckpt_0000002.pt", tmp_path / "lonely" / "ckpt_0000002.pt")
    with pytest.raises(UserError, match="frozen weights .* missing.*best.pt"):
        load_checkpoint(str(tmp_path / "lonely" / "ckpt_0000002.pt"))


def test_resume_from_a_checkpoint_with_shared_frozen_weights(run, tmp_path):
    train_ocl.main([str(run.parent / "ocl.yaml"), "--steps", "3", "--out_dir", str(tmp_path / "resumed"), "--resume",
                    str(run / "ckpt_0000002.pt"), "--allow_changed", "steps"])  # extends the 2-step run
    resumed = load_checkpoint(str(tmp_path / "resumed" / "ckpt_0000003.pt"))
    original = torch.load(next(run.glob("frozen-*.pt")), weights_only=True)
    assert all(torch.equal(resumed["model"][k], original[k]) for k in original)


def test_slim_checkpoint_drops_only_training_state():
    state = {"kind": "ocl", "model": {"w": torch.ones(1)}, "optimizer": {}, "scaler": {}, "rng": [], "step": 3,
             "config": {}, "best": 1.0}
    assert slim_checkpoint(state) == {k: v for k, v in state.items() if k in ("kind", "model", "step", "config", "best")}
