"""Figures of an OCL model on a few samples: input, ground truth, prediction, guidance code maps and every slot's
mask, each row labelled. train_ocl.py draws them at every validation, evaluate.py for a finished run."""

import torch
import torch.nn.functional as F

import msf
from grids import colour_segments, save_labelled_grid, segments_over
from model import DiffusionDecoder, masks_to_segments

MIN_FIGURE_SIDE = 96  # pixels per picture in the figures, at least


def enlarged(rows: list, side: int = MIN_FIGURE_SIDE) -> list:
    """Rows of (n,3,H,W) pictures repeated pixel by pixel (nearest, an integer factor) until H reaches `side`, so
    32-pixel images stay readable; larger images are left as they are."""
    factor = -(-side // rows[0].shape[-2])
    return rows if factor <= 1 else [F.interpolate(row, scale_factor=factor, mode="nearest") for row in rows]


def slot_rows(images: torch.Tensor, soft: torch.Tensor) -> tuple:
    """(rows, labels), one row per slot: its soft mask (n,s,H,W) in [0, 1] applied to the (n,3,H,W) images in [0, 1],
    pixel = mask·input + (1-mask)·grey, so a slot that owns a region shows it and a uniform mask fades the image."""
    rows = [(images * soft[:, s, None] + 0.5 * (1 - soft[:, s, None])).cpu() for s in range(soft.shape[1])]
    return rows, [f"slot {s} mask (0-1)" for s in range(soft.shape[1])]


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
                segments_over(images, predicted)]
        labels = ["input", "ground truth", "prediction (argmax of masks)", "prediction over input"]
        if model.vae is not None:
            for scale, vectors in zip(model.scales, model.guidance(batch[key])["vectors"]):
                rows.append(F.interpolate(msf.pca_colours(vectors), size=size, mode="nearest").cpu())
                labels.append(f"guidance code map, scale {scale} (PCA)")
        if isinstance(model.decoder, DiffusionDecoder):
            slots, _ = model.slots(batch[key], 0.0)
            rows.append((model.reconstruct(batch[key], slots, steps=25) * 0.5 + 0.5).cpu())
            labels.append("reconstruction (DDIM from slots)")
        masked, slot_labels = slot_rows(images, soft)
        rows, labels = rows + masked, labels + slot_labels
        paths.append(save_labelled_grid(enlarged(rows), labels, prefix + ".png"))
    else:
        for v in range(images.shape[0]):
            t = slice(0, min(frames, images.shape[1]))
            frame_images, frame_pred = images[v, t], predicted[v, t]
            rows = [frame_images.cpu(), colour_segments(truth[v, t]).cpu(), colour_segments(frame_pred).cpu(),
                    segments_over(frame_images, frame_pred)]
            labels = ["frames", "ground truth", "prediction (argmax of masks)", "prediction over input"]
            masked, slot_labels = slot_rows(frame_images, soft[v, t])
            rows, labels = rows + masked, labels + slot_labels
            paths.append(save_labelled_grid(enlarged(rows), labels, f"{prefix}_video{v}.png"))
    model.train(was_training)
    return paths
