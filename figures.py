"""Figures of an OCL model on a few samples: input, ground truth, prediction, guidance code maps and every slot's
mask, each row labelled. train_ocl.py draws them at every validation, evaluate.py for a finished run."""

import torch
import torch.nn.functional as F

import msf
from grids import save_labelled_grid
from metrics import IGNORE
from model import DiffusionDecoder, masks_to_segments

MIN_FIGURE_SIDE = 96  # pixels per picture in the figures, at least
PALETTE = torch.tensor([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                        [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
                        [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]]) / 255.0


def colour_segments(segments: torch.Tensor) -> torch.Tensor:
    """(..., H, W) ids -> (..., 3, H, W) colours in [0, 1]; id 0 black, 255 (ignore) white."""
    ids = segments.long().cpu()  # the palette lives on the CPU; figures are drawn there
    colours = PALETTE[ids.clamp(max=254) % len(PALETTE)]
    colours[ids == IGNORE] = 1.0
    return colours.movedim(-1, -3)


def enlarged(rows: list, side: int = MIN_FIGURE_SIDE) -> list:
    """Rows of (n,3,H,W) pictures repeated pixel by pixel (nearest, an integer factor) until H reaches `side`, so
    32-pixel images stay readable; larger images are left as they are."""
    factor = -(-side // rows[0].shape[-2])
    return rows if factor <= 1 else [F.interpolate(row, scale_factor=factor, mode="nearest") for row in rows]


@torch.no_grad()
def save_figures(model, batch: dict, device, prefix: str, frames: int = 8) -> list:
    """PNG grids of a few validation samples for an OCL model, every row labelled in a left margin; returns the
    paths written.

    Images, one column per sample: input, ground truth, prediction, prediction over the input, the guidance code
    map of every guidance scale (PCA colours of the frozen VAE's vectors), [SlotDiffusion: the reconstruction
    sampled from the slots], then every slot's mask applied to the input: pixel = mask·input + (1-mask)·grey,
    the mask on one common scale (0 to 1, attention summing to 1 over slots), so a slot that owns a region shows it
    and near-uniform attention shows as a uniformly faded image in every slot row. Videos: one grid per video, one
    column per frame."""
    was_training = model.training
    model.eval()
    batch = {k: v.to(device) for k, v in batch.items()}
    _, _, masks = model(batch)
    key = "video" if model.video else "image"
    images = batch[key].float() * 0.5 + 0.5
    size = tuple(images.shape[-2:])
    truth = batch["segment"].long()
    predicted = masks_to_segments(masks, size)
    soft = F.interpolate(masks.flatten(0, -4).float(), size=size, mode="bilinear", align_corners=False)
    soft = soft.view(*masks.shape[:-2], *size).clamp(0, 1)  # (b, [T,] s, H, W), not rescaled per slot
    paths = []
    if not model.video:
        rows = [images.cpu(), colour_segments(truth).cpu(), colour_segments(predicted).cpu(),
                (0.5 * images + 0.5 * colour_segments(predicted).to(images.device)).cpu()]
        labels = ["input", "ground truth", "prediction (argmax of masks)", "prediction over input"]
        if model.vae is not None:
            for scale, vectors in zip(model.scales, model.guidance(batch[key])["vectors"]):
                rows.append(F.interpolate(msf.pca_colours(vectors), size=size, mode="nearest").cpu())
                labels.append(f"guidance code map, scale {scale} (PCA)")
        if isinstance(model.decoder, DiffusionDecoder):
            slots, _ = model.slots(batch[key], 0.0)
            rows.append((model.reconstruct(batch[key], slots, steps=25) * 0.5 + 0.5).cpu())
            labels.append("reconstruction (DDIM from slots)")
        for s in range(soft.shape[1]):
            rows.append((images * soft[:, s, None] + 0.5 * (1 - soft[:, s, None])).cpu())
            labels.append(f"slot {s} mask (0-1)")
        paths.append(save_labelled_grid(enlarged(rows), labels, prefix + ".png"))
    else:
        for v in range(images.shape[0]):
            t = slice(0, min(frames, images.shape[1]))
            frame_images, frame_pred = images[v, t], predicted[v, t]
            rows = [frame_images.cpu(), colour_segments(truth[v, t]).cpu(), colour_segments(frame_pred).cpu(),
                    (0.5 * frame_images + 0.5 * colour_segments(frame_pred).to(images.device)).cpu()]
            labels = ["frames", "ground truth", "prediction (argmax of masks)", "prediction over input"]
            for s in range(soft.shape[2]):
                m = soft[v, t, s, None]
                rows.append((frame_images * m + 0.5 * (1 - m)).cpu())
                labels.append(f"slot {s} mask (0-1)")
            paths.append(save_labelled_grid(enlarged(rows), labels, f"{prefix}_video{v}.png"))
    model.train(was_training)
    return paths
