"""Figures: the shared labelled-grid helper's layout (cells, white padding, text in every row's margin), OCL figures
with one labelled row per content and masks on one common 0-1 scale, and labelled VAE figures."""

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import figures
import pretrain_vae
from checkpoints import load_for_evaluation
from data import eval_loader, split_path
from devices import setup_distributed
from grids import GRID_PADDING, labelled_grid, save_labelled_grid
from helpers import save_vae


def test_labelled_grid_places_cells_and_labels(tmp_path):
    torch.manual_seed(0)
    rows = [torch.rand(3, 3, 20, 24), torch.rand(2, 3, 20, 24)]  # a short row leaves its last cell white
    path = save_labelled_grid(rows, ["input", "a rather long label that wraps"], str(tmp_path / "g.png"), margin=60)
    picture = np.asarray(Image.open(path).convert("RGB"))
    p = GRID_PADDING
    assert picture.shape == (p + 2 * (20 + p), 60 + p + 3 * (24 + p), 3)
    for r, row in enumerate(rows):
        top = p + r * (20 + p)
        for c in range(3):
            left = 60 + p + c * (24 + p)
            cell = picture[top:top + 20, left:left + 24]
            if c < row.shape[0]:
                expected = np.rint(row[c].permute(1, 2, 0).numpy() * 255)
                assert np.abs(cell.astype(float) - expected).max() <= 1
            else:
                assert (cell == 255).all()
        margin = picture[top:top + 20, :60]
        assert (margin < 128).any(), f"no text in row {r}'s margin"
    assert (picture[:p] == 255).all() and (picture[:, 60:60 + p] == 255).all()
    with pytest.raises(ValueError, match="labels"):
        labelled_grid(rows, ["one"])


class UniformModel(torch.nn.Module):
    """A stand-in OCL model whose attention is uniform over its slots (what an untrained model gives)."""
    video, vae, decoder, scales = False, None, None, [1]

    def __init__(self, slots: int):
        super().__init__()
        self.slots = slots

    def forward(self, batch):
        b = batch["image"].shape[0]
        return None, None, torch.full((b, self.slots, 4, 4), 1.0 / self.slots)


def test_uniform_attention_shows_as_uniform_mask_rows(tmp_path, monkeypatch):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    batch = {"image": images, "segment": torch.zeros(2, 16, 16, dtype=torch.long)}
    captured = {}
    real = figures.save_labelled_grid

    def spy(rows, labels, path, margin=96):
        captured.update(rows=rows, labels=labels)
        return real(rows, labels, path, margin)

    monkeypatch.setattr(figures, "save_labelled_grid", spy)
    (path,) = figures.save_figures(UniformModel(5), batch, torch.device("cpu"), str(tmp_path / "fig"))
    assert captured["labels"] == ["input", "ground truth", "prediction (argmax of masks)", "prediction over input"] + \
        [f"slot {s} mask (0-1)" for s in range(5)]
    # Oracle: every slot owns 1/5 of every pixel, so each slot row is the same faded image 0.2·x + 0.8·grey, each
    # pixel shown as a 6x6 block (16-pixel images are enlarged to 96 so they stay readable).
    shown = images * 0.5 + 0.5
    expected = (shown * 0.2 + 0.5 * 0.8).repeat_interleave(6, -1).repeat_interleave(6, -2)
    for row in captured["rows"][4:]:
        assert torch.allclose(row, expected, atol=1e-6)
    picture = np.asarray(Image.open(path).convert("RGB")).astype(float)
    p = GRID_PADDING
    top = p + 4 * (96 + p)
    cell = picture[top:top + 96, 96 + p:96 + p + 96]
    assert np.abs(cell - np.rint(expected[0].permute(1, 2, 0).numpy() * 255)).max() <= 1


def test_vae_figures_are_labelled(tmp_path, monkeypatch, shapes_dir):
    captured = []
    real = pretrain_vae.save_labelled_grid
    monkeypatch.setattr(pretrain_vae, "save_labelled_grid",
                        lambda rows, labels, path, margin=96: captured.append(labels) or real(rows, labels, path))
    vae = load_for_evaluation(save_vae(tmp_path / "vae.pt", "msf", 8), torch.device("cpu"))[0]
    pretrain_vae.save_figure(vae, torch.rand(2, 3, 32, 32) * 2 - 1, str(tmp_path / "f.png"))
    assert captured[-1] == ["input"] + [f"reconstruction, scale {n}" for n in (1, 2, 3)] + \
        [f"code map, scale {n} (PCA)" for n in (1, 2, 3)]
    assert (tmp_path / "f.png").exists()


def test_separability_figure_rows_are_labelled(tmp_path, monkeypatch, shapes_dir):
    captured = []
    monkeypatch.setattr(evaluate, "save_labelled_grid", lambda rows, labels, path, margin=96: captured.append(
        (len(rows), labels)))
    vae = load_for_evaluation(save_vae(tmp_path / "vae.pt", "msf", 8), torch.device("cpu"))[0]
    d = setup_distributed("cpu")
    loader = eval_loader(split_path(shapes_dir, "val"), 4, 0, d, 32, 4)
    evaluate.vae_separability(vae, loader, torch.device("cpu"), 4, str(tmp_path / "sep.png"))
    count, labels = captured[-1]
    assert count == len(labels) == 13 and labels[0] == "input"
    assert "shared code before inter-scale fusion, scale 2 (PCA)" in labels
    assert "scale-specific code, scale 3 (PCA)" in labels and labels[-1] == "final X_n (guidance), scale 3 (PCA)"
