"""Image grids whose rows carry a text label in a left margin: the figures of both trainers and of evaluate.py."""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from files import atomic_write


GRID_PADDING = 2
IGNORE_ID = 255  # the datasets' "ignore" segment id (metrics.IGNORE), drawn white
PALETTE = torch.tensor([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                        [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
                        [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]]) / 255.0


def colour_segments(segments) -> torch.Tensor:
    """(..., H, W) ids (a tensor or a numpy array) -> (..., 3, H, W) colours in [0, 1]; id 0 black, 255 (ignore)
    white. Here rather than in figures.py so that prepare_data.py can draw its preview without importing the models."""
    ids = torch.as_tensor(segments).long().cpu()  # the palette lives on the CPU; figures are drawn there
    colours = PALETTE[ids.clamp(max=254) % len(PALETTE)]
    colours[ids == IGNORE_ID] = 1.0
    return colours.movedim(-1, -3)


def segments_over(images: torch.Tensor, segments) -> torch.Tensor:
    """(n,3,H,W) images in [0, 1] with their (n,H,W) segment ids coloured over them at half opacity, on the CPU."""
    return 0.5 * images.float().cpu() + 0.5 * colour_segments(segments)


def _wrap(text: str, font, width: int) -> list:
    """Greedy word wrap of `text` into lines at most `width` pixels wide (a longer word stays on its own line)."""
    lines = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def labelled_grid(rows: list, labels: list, margin: int = 96) -> Image.Image:
    """Rows of images, each (n,3,H,W) float in [0,1] (values outside are clipped), tiled one row per tensor with its
    label drawn in a white left margin `margin` pixels wide (PIL's default font, word-wrapped). Cell (r, c) has its
    top-left corner at (margin + p + c·(W+p), p + r·(H+p)) with p = GRID_PADDING; the padding is white."""
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    p = GRID_PADDING
    columns = max(r.shape[0] for r in rows)
    height, width = rows[0].shape[-2:]
    canvas = np.full((p + len(rows) * (height + p), margin + p + columns * (width + p), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        cells = (row.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        top = p + r * (height + p)
        for c, cell in enumerate(cells):
            left = margin + p + c * (width + p)
            canvas[top:top + height, left:left + width] = cell
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 2
    for r, label in enumerate(labels):
        lines = _wrap(label, font, margin - 6)
        top = p + r * (height + p) + max(0, (height - line_height * len(lines)) // 2)
        for i, line in enumerate(lines):
            draw.text((4, top + i * line_height), line, fill=(0, 0, 0), font=font)
    return picture


def save_labelled_grid(rows: list, labels: list, path: str, margin: int = 96) -> str:
    """`labelled_grid` written atomically as a PNG at `path`; returns `path`."""
    picture = labelled_grid(rows, labels, margin)
    atomic_write(path, lambda f: picture.save(f, format="PNG"), binary=True)
    return path
