"""api.py: the README's example runs on tiny trained runs, tokenize/detokenize agree with the VAE's own
quantise + decode path, slot masks are a partition of unity, and stored paths resolve against the checkpoint."""

import os
import re

import pytest
import torch
import yaml

import api
import evaluate
import msf
import pretrain_vae
import train_ocl
from helpers import ROOT, save_vae, write_ocl_config
from runs import resolve_stored_path


def readme_api_example() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_dir):
    """Tiny VAE and SLATE runs trained as the README's commands would, with paths relative to `root`."""
    root = tmp_path_factory.mktemp("api")
    os.makedirs(root / "data")
    os.symlink(shapes_dir, root / "data" / "shapes")
    vae_config = dict(quantizer="msf", code_dim=8, vae_width=8, codebook_size=64, data_dir="data/shapes",
                      resolution=32, steps=2, batch_size=4, num_workers=0, log_every=1, val_every=2,
                      val_batch_size=8, val_samples=8, out_dir="runs/vae_msf_shapes")
    (root / "vae.yaml").write_text(yaml.safe_dump(vae_config))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        pretrain_vae.main(["vae.yaml"])
        config = write_ocl_config(root, "data/shapes", None, name="ocl.yaml", vae_ckpt="runs/vae_msf_shapes",
                                  steps=2, val_every=2, out_dir="runs/slate_msf_shapes")
        train_ocl.main([config])
    finally:
        os.chdir(cwd)
    return root


def test_readme_example_runs(runs, monkeypatch):
    monkeypatch.chdir(runs)
    namespace = {}
    exec(compile(readme_api_example(), "README.md", "exec"), namespace)
    ids, recon, slots, masks = (namespace[k] for k in ("ids", "recon", "slots", "masks"))
    assert [tuple(i.shape) for i in ids] == [(2, 8, 8, 2), (2, 4, 4, 2), (2, 2, 2, 2)]
    assert [tuple(r.shape) for r in recon] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    assert slots.shape == (2, 4, 16) and masks.shape == (2, 4, 32, 32)


def test_api_works_from_another_directory(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vae = api.load(str(runs / "runs" / "vae_msf_shapes"))
    assert isinstance(vae, api.VAETokenizer) and vae.resolution == 32
    ocl = api.load(str(runs / "runs" / "slate_msf_shapes" / "best.pt"))
    assert isinstance(ocl, api.ObjectCentric)
    assert os.path.samefile(ocl.state["data"]["data_dir"], runs / "data" / "shapes")


def test_evaluate_runs_from_another_directory(runs, tmp_path, monkeypatch):
    """Training stored data_dir 'data/shapes' relative to its own directory; evaluating from elsewhere finds it."""
    monkeypatch.chdir(tmp_path)
    evaluate.main([str(runs / "runs" / "slate_msf_shapes"), "--out", "eval", "--device", "cpu", "--num_workers", "0",
                   "--figures", "0", "--samples", "4"])
    assert (tmp_path / "eval" / "metrics.json").exists()


def test_slot_masks_partition_the_image(runs):
    ocl = api.load(str(runs / "runs" / "slate_msf_shapes"))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    slots, masks = ocl.slots_and_masks(images)
    assert slots.shape == (3, 4, 16) and masks.shape == (3, 4, 32, 32)
    assert torch.allclose(masks.sum(1), torch.ones(3, 32, 32), atol=1e-5) and masks.min() >= 0
    # The same attention the model's own forward pass returns, upsampled independently.
    _, _, raw = ocl.model({"image": images})
    expected = torch.nn.functional.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(masks, expected, atol=1e-6)


@pytest.mark.parametrize("quantizer,overrides,groups", [
    ("vq", {}, [1]), ("grouped", {}, [2]), ("msf", {}, [2, 2, 2]), ("msf", {"fusion": "mean"}, [2, 2, 2]),
    ("msf", {"intra_scale_fusion": False}, [1, 1, 1]), ("msf", {"sv_codebook": "shared", "num_scales": 2}, [2, 2])])
def test_detokenize_of_tokenize_is_quantise_then_decode(tmp_path, quantizer, overrides, groups):
    path = save_vae(tmp_path / "vae.pt", quantizer, 8, **overrides)
    vae = api.load(path)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = vae.tokenize(images)
    assert [i.shape[-1] for i in ids] == groups and all(i.dtype == torch.long for i in ids)
    # ids lie in the codebook sizes the config asks for (64 combinations: 64 VQ codes, 8 per group / per MSF book)
    limit = 64 if quantizer == "vq" else 8
    assert all(0 <= int(i.min()) and int(i.max()) < limit for i in ids)
    # Oracle: the VAE's own path, built independently from the checkpoint (quantise -> guidance X_n -> decode).
    state = torch.load(path, weights_only=True)
    reference = msf.build_vae(state["config"])
    reference.load_state_dict(state["model"])
    reference.eval()
    quantized = reference.quantize(images)
    expected = [reference.decode(x) for x in quantized.guidance]
    recon = vae.detokenize(ids)
    assert len(recon) == len(expected)
    for got, want in zip(recon, expected):
        assert torch.allclose(got, want, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(ids, quantized.indices))


def test_the_api_says_what_it_expects_instead_of_computing_on_wrong_input(runs, tmp_path):
    vae, ocl = api.load(str(runs / "runs" / "vae_msf_shapes")), api.load(str(runs / "runs" / "slate_msf_shapes"))
    torch.manual_seed(0)
    good = torch.rand(2, 3, 32, 32) * 2 - 1
    wrong = {"must be 32x32, the model's resolution, got 48x48": torch.rand(2, 3, 48, 48) * 2 - 1,
             r"must be in \[-1, 1\] \(pixel / 127.5 - 1\), got values from \d+ to 25\d": good.add(1).mul(127.5).round(),
             "dtype torch.uint8": good.add(1).mul(127.5).to(torch.uint8),
             "NaN or infinite": good.clone().index_fill_(0, torch.tensor([1]), float("nan")),
             r"tensor \(b, 3, H, W\) of RGB images, got \(3, 32, 32\)": good[0]}
    for message, images in wrong.items():
        with pytest.raises(ValueError, match=message):
            ocl.slots_and_masks(images)
        if "resolution" not in message:
            with pytest.raises(ValueError, match=message):
                vae.tokenize(images)
    with pytest.raises(ValueError, match=r"multiples of 16 \(4 x 2\^\(scales - 1\)\), got 40x40"):
        vae.tokenize(torch.zeros(1, 3, 40, 40))
    ids = vae.tokenize(good)
    sizes = vae.vocabulary()
    for bad, value in ((-1, -1), (sizes[0][1], sizes[0][1])):  # -1 would wrap to the last code
        broken = ids[0].clone()
        broken[0, 0, 0, 1] = bad
        with pytest.raises(ValueError, match=f"scale 1 ids of group 1 must lie in \\[0, {sizes[0][1]}\\), got "
                                             f"values from {min(0, value)} to"):
            vae.detokenize([broken])
    with pytest.raises(ValueError, match=r"integer tensor \(b, h, w, 2\)"):
        vae.detokenize(ids[0].float())
    assert [r.shape for r in vae.detokenize(ids)] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]


def test_an_empty_batch_gives_empty_results(runs):
    vae, ocl = api.load(str(runs / "runs" / "vae_msf_shapes")), api.load(str(runs / "runs" / "slate_msf_shapes"))
    none = torch.zeros(0, 3, 32, 32)
    ids = vae.tokenize(none)
    assert [tuple(i.shape) for i in ids] == [(0, 8, 8, 2), (0, 4, 4, 2), (0, 2, 2, 2)]
    assert all(i.dtype == torch.long for i in ids)
    assert [tuple(r.shape) for r in vae.detokenize(ids)] == [(0, 3, 32, 32), (0, 3, 16, 16), (0, 3, 8, 8)]
    slots, masks = ocl.slots_and_masks(none)
    assert slots.shape == (0, 4, 16) and masks.shape == (0, 4, 32, 32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA GPU")
def test_loading_onto_a_gpu_that_is_not_there_is_one_sentence(runs):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device '{device}' was asked for but no CUDA GPU is visible here; load "
                                             f"with device='cpu'"):
            api.load(str(runs / "runs" / "vae_msf_shapes"), device=device)


def test_stored_paths_resolve_against_the_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "project" / "data" / "shapes").mkdir(parents=True)
    (tmp_path / "project" / "runs" / "a").mkdir(parents=True)
    checkpoint = str(tmp_path / "project" / "runs" / "a" / "best.pt")
    monkeypatch.chdir(tmp_path)
    expected = str(tmp_path / "project" / "data" / "shapes")
    assert resolve_stored_path("data/shapes", checkpoint, "runs/a") == expected
    assert resolve_stored_path("data/shapes", checkpoint, "./runs/a/") == expected
    assert resolve_stored_path("/abs/data", checkpoint, "runs/a") == "/abs/data"
    # a run copied elsewhere (out_dir no longer matches): found from a directory above the checkpoint
    (tmp_path / "moved" / "x").mkdir(parents=True)
    (tmp_path / "moved" / "data" / "shapes").mkdir(parents=True)
    assert resolve_stored_path("data/shapes", str(tmp_path / "moved" / "x" / "c.pt"), "runs/a") == \
        str(tmp_path / "moved" / "data" / "shapes")
    # nothing exists: the path from where training ran, so the error names it
    assert resolve_stored_path("data/none", checkpoint, "runs/a") == str(tmp_path / "project" / "data" / "none")
