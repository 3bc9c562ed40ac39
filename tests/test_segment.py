"""Segmenting your own images: `evaluate.py RUN --images DIR_OR_GLOB` and `api.ObjectCentric.segment` on tiny trained
runs; images of any size and mode are centre-cropped and resized, files that are not images fail by name before
anything is written."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import api
import evaluate
import train_ocl
from errors import UserError
from helpers import save_vae, write_ocl_config
from model import masks_to_segments

RUNS = {  # name -> write_ocl_config overrides; "vae" stands for the tiny VQ-VAE's path
    "pixels": dict(method="mixture", guidance="none", mixture_target="pixels"),
    "guidance": dict(method="mixture", guidance="vq", vae_ckpt="vae"),
    "slate": dict(method="slate", guidance="vq", vae_ckpt="vae"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_dir):
    """Tiny image runs (2 steps, 32x32, 4 slots of 16 dims): the mixture decoder over pixels and over the VQ-VAE's
    guidance vectors, and SLATE."""
    root = tmp_path_factory.mktemp("segment")
    vae = save_vae(root / "vae.pt", "vq", 8)
    made = {}
    for name, overrides in RUNS.items():
        overrides = {k: vae if v == "vae" else v for k, v in overrides.items()}
        config = write_ocl_config(root, shapes_dir, None, name=f"{name}.yaml", steps=2, val_every=2,
                                  out_dir=str(root / name), **overrides)
        train_ocl.main([config])
        made[name] = root / name
    return made


def write_images(folder, count=3, size=(50, 40), mode="RGBA"):
    """`count` random PNGs of `size` (width, height) and `mode` (RGB or RGBA) in `folder`; returns their names."""
    os.makedirs(folder, exist_ok=True)
    generator = np.random.default_rng(0)
    names = []
    for i in range(count):
        pixels = generator.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"img{i}.png"))  # RGB or RGBA from the channels
        names.append(f"img{i}.png")
    return names


def test_a_folder_of_images_gives_overlays_slot_figures_arrays_and_a_contact_sheet(runs, tmp_path, capsys):
    write_images(tmp_path / "photos")
    out = tmp_path / "out"
    evaluate.main([str(runs["pixels"]), "--images", str(tmp_path / "photos"), "--out", str(out), "--device", "cpu"])
    written = sorted(os.listdir(out))
    for i in range(3):
        for suffix in ("_overlay.png", "_slots.png", "_reconstruction.png", "_slots.npy", "_masks.npy"):
            assert f"img{i}{suffix}" in written, suffix
        slots, masks = np.load(out / f"img{i}_slots.npy"), np.load(out / f"img{i}_masks.npy")
        assert slots.dtype == np.float32 and slots.shape == (4, 16)  # write_ocl_config: 4 slots of 16 dims
        assert masks.dtype == np.float32 and masks.shape == (4, 32, 32)
        np.testing.assert_allclose(masks.sum(0), 1, atol=1e-5)
        with Image.open(out / f"img{i}_overlay.png") as overlay:
            assert overlay.height >= 96  # 32x32 enlarged to stay readable
    assert "contact_sheet.png" in written
    assert len(written) == 3 * 5 + 1
    printed = capsys.readouterr().out
    assert "img0.png: 50x40 RGBA converted to RGB on white, centre-cropped to 40x40 and resized to 32x32" in printed
    assert "reconstruction: the mixture decoder's pixels" in printed


def test_default_output_is_beside_the_run_and_a_glob_works(runs, tmp_path, capsys):
    write_images(tmp_path / "photos", count=2, size=(32, 32), mode="RGB")
    evaluate.main([str(runs["slate"]), "--images", str(tmp_path / "photos" / "*.png"), "--device", "cpu"])
    out = runs["slate"] / "segment"
    assert sorted(os.listdir(out)) == sorted(["contact_sheet.png"] + [f"img{i}{suffix}" for i in range(2) for suffix in
                                              ("_overlay.png", "_slots.png", "_slots.npy", "_masks.npy")])
    printed = capsys.readouterr().out
    assert "img0.png: 32x32 used as it is" in printed and "no reconstruction" in printed


def test_files_that_are_not_images_fail_by_name_before_anything_is_written(runs, tmp_path):
    write_images(tmp_path / "photos", count=2)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"notes.txt is not an image PIL can decode"):
        evaluate.main([str(runs["pixels"]), "--images", str(tmp_path / "photos"), "--out", str(out)])
    assert not out.exists()
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match=r"--images .*empty is a directory without files"):
        evaluate.main([str(runs["pixels"]), "--images", str(tmp_path / "empty"), "--out", str(out)])
    with pytest.raises(UserError, match=r"--images .*\*.jpg matches no file"):
        evaluate.main([str(runs["pixels"]), "--images", str(tmp_path / "photos" / "*.jpg"), "--out", str(out)])
    assert not out.exists()


def test_segment_of_a_tensor_partitions_the_image_and_its_segments_are_the_evaluation_argmax(runs):
    ocl = api.load(str(runs["guidance"]))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    result = ocl.segment(images)
    assert result["slots"].shape == (3, 4, 16) and result["masks"].shape == (3, 4, 32, 32)
    assert torch.allclose(result["masks"].sum(1), torch.ones(3, 32, 32), atol=1e-5) and result["masks"].min() >= 0
    # the oracle: the segmentation the metrics score, from the model's own masks on its feature grid
    _, grid_masks = ocl.model.slots_and_masks(images, 0.0)
    assert torch.equal(result["segments"], masks_to_segments(grid_masks, (32, 32)))
    # mixture over guidance vectors: decoded through the frozen VAE to the image's shape
    assert result["reconstruction"].shape == images.shape and result["reconstruction"].abs().max() <= 1
    assert "decoded by the VAE" in result["reconstruction_note"]


def test_the_mixture_over_pixels_reconstruction_is_what_its_loss_compares_with_the_image(runs):
    ocl = api.load(str(runs["pixels"]))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    result = ocl.segment(images)
    assert result["reconstruction"].shape == images.shape
    # the oracle: the decoder's training loss is the mean squared error of this reconstruction to the image, so the
    # pixels sit where the loss puts them (the 2-step decoder's output stays inside [-1, 1], where the clamp is idle)
    with torch.no_grad():
        loss, _, _ = ocl.model.decoder.decode_loss(images, result["slots"])
    assert result["reconstruction"].abs().max() < 1
    assert float(((result["reconstruction"] - images) ** 2).mean()) == pytest.approx(float(loss), rel=1e-5)


def test_segment_takes_image_files_and_pil_images_of_any_size(runs, tmp_path):
    write_images(tmp_path, count=1, size=(64, 48), mode="RGB")
    ocl = api.load(str(runs["pixels"]))
    result = ocl.segment([str(tmp_path / "img0.png"), Image.new("L", (20, 30))])
    assert result["notes"] == ["img0.png: 64x48 centre-cropped to 48x48 and resized to 32x32",
                               "image 1: 20x30 L converted to RGB, centre-cropped to 20x20 and resized to 32x32"]
    assert result["images"].shape == (2, 3, 32, 32) and result["masks"].shape == (2, 4, 32, 32)
    assert result["reconstruction"].shape == (2, 3, 32, 32)


def test_read_images_centre_crops_and_says_what_it_did(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    images, notes = api.read_images([str(tmp_path / "wide.png")], 40)
    assert notes == ["wide.png: 50x40 centre-cropped to 40x40"]
    # the oracle: columns 5 to 44 of the file, as pixel / 127.5 - 1, with no resizing at 40
    expected = torch.from_numpy(pixels[:, 5:45].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(images[0], expected, atol=1e-6)
    tall = Image.fromarray(np.zeros((480, 640), np.uint8), "L")
    images, notes = api.read_images([tall], 32)
    assert images.shape == (1, 3, 32, 32) and notes == ["image 0: 640x480 L converted to RGB, centre-cropped to "
                                                        "480x480 and resized to 32x32"]


def test_a_video_checkpoint_says_it_needs_videos(tmp_path, video_dir):
    write_images(tmp_path / "photos", count=1)
    vae = save_vae(tmp_path / "vae.pt", "vq", 8)
    config = write_ocl_config(tmp_path, video_dir, None, method="steve", guidance="vq", vae_ckpt=vae, steps=1,
                              batch_size=2, val_every=1, val_batch_size=1, val_samples=1)
    train_ocl.main([config])
    with pytest.raises(UserError, match=r"models videos, so it needs videos"):
        evaluate.main([str(tmp_path / "run"), "--images", str(tmp_path / "photos"), "--device", "cpu"])
