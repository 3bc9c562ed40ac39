"""Datasets: generate the embedded synthetic data or convert a real dataset into the project's LMDB format.

    python prepare_data.py shapes       [--out data/shapes]       [--num_train N --num_val M --seed S]
    python prepare_data.py shapes_video [--out data/shapes_video] [--num_train N --num_val M --seed S]
    python prepare_data.py NAME --root RAW_DIR [--out data/NAME]   (NAME: clevrtex coco voc movi_c movi_d movi_e)

The real datasets' expected layouts, flags and conventions are in README.md, "Real datasets".

Every split is one LMDB file (`train.lmdb`, `val.lmdb`) in the record format of data.py, which also reads it back
(`load_split`, re-exported here for scripts that import it from this module).
"""

import argparse
import glob
import io
import json
import os
import re
import signal
import sys
from functools import partial
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from config import ranged
from data import AREA_PERCENTILES, REAL_DATASETS, SYNTHETIC_DATASETS, DatasetWriter, resize_sample
from data import load_split  # noqa: F401 -- re-exported: users' scripts read splits with prepare_data.load_split
from errors import UserError, run_main
from grids import colour_segments, save_labelled_grid, segments_over
from tfrecord_reader import BadRecord, decode_example, index_tfrecord, read_tfrecord_record

RESOLUTION = 128


# ================================================================================================================
# Embedded synthetic data: multi-object scenes whose objects span very different sizes.
# Each sample is drawn from its own generator seeded by (seed, kind, split, index), so the output does not depend on
# how the work is split across processes.

SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross", "ring")
TEXTURE_KINDS = ("solid", "stripes", "checker", "dots", "waves")
MIN_RADIUS, MAX_RADIUS = 3.0, 32.0  # objects from ~6 px across to half the 128-px image
# A style sets the objects' size range (radius in px at 128x128), whether objects carry a texture and whether the
# background varies. `multiscale` is the default `shapes`; `easy` (large flat-colour objects on flat backgrounds) is
# where Slot Attention binds within minutes on a CPU, the first rung of the binding ladder (README, "Results").
STYLES = {
    "multiscale": {"min_radius": MIN_RADIUS, "max_radius": MAX_RADIUS, "textured": True, "flat_background": False},
    "easy": {"min_radius": 8.0, "max_radius": 40.0, "textured": False, "flat_background": True},
    # `easy` with objects from radius 4: a factor 10 in size, a third of the objects under 1 % of the image
    "multisize": {"min_radius": 4.0, "max_radius": 40.0, "textured": False, "flat_background": True},
}
FLAT_STYLES = ("easy", "multisize")  # at most 5 objects unless --max_objects says otherwise
MIN_VISIBLE_PIXELS = 12
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB in [0,1] for arrays of equal shape."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, -1) for c in
                      ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0)  # (6, ..., 3)
    return np.take_along_axis(table, i[None, ..., None], 0)[0]


def _random_colours(rng, n, saturation=(0.45, 1.0), value=(0.35, 1.0)):
    return _hsv_to_rgb(rng.random(n), rng.uniform(*saturation, n), rng.uniform(*value, n))  # (n, 3)


def sample_objects(rng, count: int, style: dict = STYLES["multiscale"]) -> dict:
    """Draw `count` objects' static attributes (shape, size, pose, colours, texture). Every style draws the same
    random numbers in the same order, so a style changes the scenes' look but not which scenes are drawn."""
    log_radius = rng.uniform(np.log(style["min_radius"]), np.log(style["max_radius"]), count)
    radius = np.exp(log_radius)
    objects = {
        "shape": rng.integers(len(SHAPE_KINDS), size=count),
        "radius": radius,
        "aspect": rng.uniform(0.7, 1.0, count),
        "angle": rng.uniform(0, 2 * np.pi, count),
        "center": np.stack([rng.uniform(radius * 0.3, RESOLUTION - radius * 0.3),
                            rng.uniform(radius * 0.3, RESOLUTION - radius * 0.3)], -1),  # (K, 2) as (x, y)
        "colour": _random_colours(rng, count),
        "colour2": _random_colours(rng, count),
        "texture": rng.integers(len(TEXTURE_KINDS), size=count),
        "texture_freq": rng.uniform(2.0, 4.5, count),
        "texture_angle": rng.uniform(0, np.pi, count),
        "texture_phase": rng.uniform(0, 2 * np.pi, (count, 2)),
    }
    if not style["textured"]:
        objects["texture"] = np.zeros(count, dtype=int)  # TEXTURE_KINDS[0]: solid
    return objects


def _object_frame(objects: dict, grid_x, grid_y):
    """Pixel coordinates in each object's frame, in units of its radius: (K,H,W) u, v."""
    dx = grid_x[None] - objects["center"][:, 0, None, None]
    dy = grid_y[None] - objects["center"][:, 1, None, None]
    cos, sin = np.cos(objects["angle"])[:, None, None], np.sin(objects["angle"])[:, None, None]
    radius = objects["radius"][:, None, None]
    u = (cos * dx + sin * dy) / radius
    v = (-sin * dx + cos * dy) / (radius * objects["aspect"][:, None, None])
    return u, v


def _shape_masks(kinds, u, v):
    """Inside-tests of each object's shape in its own frame: (K,H,W) bool."""
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    tests = {
        "circle": lambda: r <= 1.0,
        "square": lambda: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
        "triangle": lambda: (v <= 0.5) & (np.sqrt(3) * u - v <= 1.0) & (-np.sqrt(3) * u - v <= 1.0),
        "star": lambda: r <= 0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 3,
        "cross": lambda: ((np.abs(u) <= 0.33) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 0.95)),
        "ring": lambda: (r <= 1.0) & (r >= 0.55),
    }
    masks = np.zeros(u.shape, dtype=bool)
    for kind_index in np.unique(kinds):
        selected = kinds == kind_index
        masks[selected] = tests[SHAPE_KINDS[kind_index]]()[selected]
    return masks


def _texture_weights(objects: dict, u, v):
    """Per-pixel blend weight between each object's two colours, (K,H,W) in [0,1], fixed to the object frame."""
    freq = objects["texture_freq"][:, None, None]
    angle = objects["texture_angle"][:, None, None]
    phase = objects["texture_phase"]
    along = u * np.cos(angle) + v * np.sin(angle)
    across = -u * np.sin(angle) + v * np.cos(angle)
    weights = np.zeros(u.shape)
    for texture_index in np.unique(objects["texture"]):
        selected = objects["texture"] == texture_index
        kind = TEXTURE_KINDS[texture_index]
        if kind == "solid":
            continue
        a, b, f = along[selected], across[selected], freq[selected]
        if kind == "stripes":
            w = (np.sin(np.pi * f * a + phase[selected, 0, None, None]) > 0).astype(float)
        elif kind == "checker":
            w = (np.sin(np.pi * f * a) * np.sin(np.pi * f * b) > 0).astype(float)
        elif kind == "dots":
            fa, fb = (f * a / 2) % 1.0 - 0.5, (f * b / 2) % 1.0 - 0.5
            w = (fa ** 2 + fb ** 2 < 0.09).astype(float)
        else:  # waves: smooth marbling
            w = 0.5 + 0.5 * np.sin(np.pi * f * a + 1.5 * np.sin(np.pi * f * b + phase[selected, 1, None, None]))
        weights[selected] = w
    return weights


def sample_background(rng, flat: bool = False) -> np.ndarray:
    """A textured background (H,W,3) in [0,1]: a muted base colour modulated by one of four patterns; `flat`: the
    two colours' even mix, with no pattern."""
    y, x = np.mgrid[0:RESOLUTION, 0:RESOLUTION] / RESOLUTION
    base = _random_colours(rng, 1, saturation=(0.1, 0.5), value=(0.3, 0.8))[0]
    other = _random_colours(rng, 1, saturation=(0.1, 0.5), value=(0.3, 0.8))[0]
    kind = rng.integers(4)
    if kind == 0:  # smooth noise from a few random low-frequency waves
        field = np.zeros_like(x)
        for _ in range(4):
            fx, fy, phase = rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(0, 2 * np.pi)
            field += np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        w = 0.5 + field / 8
    elif kind == 1:  # soft stripes
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 8)
        w = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)))
    elif kind == 2:  # large checker
        freq = rng.uniform(2, 5)
        w = (np.sin(np.pi * freq * x) * np.sin(np.pi * freq * y) > 0).astype(float)
    else:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        w = np.clip(0.5 + (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle), 0, 1)
    contrast = 0.0 if flat else 1.0  # drawn either way, so both styles consume the same random numbers
    contrast *= rng.uniform(0.25, 0.6)
    w = 0.5 + contrast * (w - 0.5)
    return base * (1 - w[..., None]) + other * w[..., None]


_GRID_Y, _GRID_X = np.mgrid[0:RESOLUTION, 0:RESOLUTION].astype(np.float64) + 0.5


def render(objects: dict, background: np.ndarray, rng):
    """Paint objects back to front over the background; returns image (H,W,3) uint8, segment (H,W) uint8 with
    object k at id k+1 (0 = background), and each object's full and visible pixel counts."""
    u, v = _object_frame(objects, _GRID_X, _GRID_Y)
    masks = _shape_masks(objects["shape"], u, v)  # (K,H,W)
    weights = _texture_weights(objects, u, v)[..., None]
    colours = objects["colour"][:, None, None] * (1 - weights) + objects["colour2"][:, None, None] * weights
    # Later objects are in front: the owner of a pixel is the last object covering it.
    count = masks.shape[0]
    covered = masks.any(0)
    owner = count - 1 - np.argmax(masks[::-1], axis=0)
    segment = np.where(covered, owner + 1, 0).astype(np.uint8)
    image = np.where(covered[..., None], np.take_along_axis(colours, owner[None, ..., None], 0)[0], background)
    image = image + rng.normal(0, 0.015, image.shape)  # mild sensor noise so flat areas are not exactly flat
    image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    visible = np.bincount(segment.ravel(), minlength=count + 1)[1:]
    return image, segment, masks.sum((1, 2)), visible


def boxes_from_segment(segment: np.ndarray, max_objects: int) -> np.ndarray:
    """Normalised ltrb boxes of segment ids 1..max_objects over the last two axes; zeros where an id is absent."""
    height, width = segment.shape[-2:]
    ids = np.arange(1, max_objects + 1).reshape((-1,) + (1,) * segment.ndim)
    present = segment[None] == ids  # (K, ..., H, W)
    rows, cols = present.any(-1), present.any(-2)  # (K, ..., H), (K, ..., W)
    has = rows.any(-1)
    top = np.argmax(rows, -1)
    bottom = height - np.argmax(rows[..., ::-1], -1)
    left = np.argmax(cols, -1)
    right = width - np.argmax(cols[..., ::-1], -1)
    boxes = np.stack([left / width, top / height, right / width, bottom / height], -1) * has[..., None]
    return np.moveaxis(boxes, 0, -2).astype(np.float32)  # (..., K, 4)


def _visible_enough(full, visible) -> bool:
    return bool(np.all(visible >= np.maximum(MIN_VISIBLE_PIXELS, 0.3 * full)))


def generate_image(seed: int, split: str, index: int, min_objects: int, max_objects: int,
                   style: dict = STYLES["multiscale"]) -> dict:
    """One `shapes` sample: every object keeps at least 30% (and 12 px) of itself visible."""
    rng = np.random.default_rng([seed, 0, SPLIT_IDS[split], index])
    background = sample_background(rng, style["flat_background"])
    count = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(100):
        objects = sample_objects(rng, count, style)
        image, segment, full, visible = render(objects, background, rng)
        if _visible_enough(full, visible):
            break
    else:  # pathological draw: fall back to fewer objects rather than emit a hidden one
        objects = sample_objects(rng, 1, style)
        image, segment, full, visible = render(objects, background, rng)
    return {"image": image, "segment": segment, "bbox": boxes_from_segment(segment, max_objects)}


def _reflect(position, low, high):
    """Bounce a linearly moving coordinate between low and high (triangle wave)."""
    span = np.maximum(high - low, 1e-6)
    phase = np.mod(position - low, 2 * span)
    return low + span - np.abs(span - phase)


def generate_video(seed: int, split: str, index: int, min_objects: int, max_objects: int, frames: int,
                   style: dict = STYLES["multiscale"]) -> dict:
    """One `shapes_video` sample: objects move, bounce off the borders, turn, and grow or shrink over the clip."""
    rng = np.random.default_rng([seed, 1, SPLIT_IDS[split], index])
    background = sample_background(rng, style["flat_background"])
    count = int(rng.integers(min_objects, max_objects + 1))
    t = np.arange(frames)[:, None]
    for _ in range(100):
        objects = sample_objects(rng, count, style)
        speed, heading = rng.uniform(0.5, 2.5, count), rng.uniform(0, 2 * np.pi, count)
        growth = rng.uniform(-0.025, 0.025, count)  # log-scale change per frame: up to 1.8x over 24 frames
        spin = rng.uniform(-0.06, 0.06, count)
        radius = np.clip(objects["radius"][None] * np.exp(growth[None] * t), style["min_radius"] * 0.8,
                         style["max_radius"] * 1.25)
        x = _reflect(objects["center"][None, :, 0] + speed * np.cos(heading) * t, 0.0, RESOLUTION - 1.0)
        y = _reflect(objects["center"][None, :, 1] + speed * np.sin(heading) * t, 0.0, RESOLUTION - 1.0)
        angle = objects["angle"][None] + spin[None] * t
        frame_objects = [dict(objects, radius=radius[f], angle=angle[f], center=np.stack([x[f], y[f]], -1))
                         for f in range(frames)]
        first = render(frame_objects[0], background, rng)
        if _visible_enough(first[2], first[3]):  # first-frame boxes seed the slots: every object must show
            break
    rendered = [first] + [render(objects_t, background, rng) for objects_t in frame_objects[1:]]
    video = np.stack([r[0] for r in rendered])
    segment = np.stack([r[1] for r in rendered])
    return {"video": video, "segment": segment, "bbox": boxes_from_segment(segment, max_objects)}


def _generate_chunk(job):
    kind, seed, split, indices, min_objects, max_objects, frames, style = job
    if kind == "shapes":
        return [generate_image(seed, split, i, min_objects, max_objects, style) for i in indices]
    return [generate_video(seed, split, i, min_objects, max_objects, frames, style) for i in indices]


def write_synthetic(kind: str, out_dir: str, counts: dict, seed: int, min_objects: int, max_objects: int,
                    frames: int, workers: int, progress: bool = True, style: dict = STYLES["multiscale"]) -> dict:
    """Generate every split of `shapes` / `shapes_video` in parallel and write them atomically, as a whole (the
    splits are published together once all are written)."""
    if not 1 <= min_objects <= max_objects <= 254:
        raise UserError(f"need 1 <= min_objects <= max_objects <= 254, got {min_objects}, {max_objects}")
    if kind == "shapes_video" and frames < 1:
        raise UserError(f"--frames must be at least 1, got {frames}")
    paths, writers = {}, {}
    chunk = 8 if kind == "shapes" else 1
    with DatasetWriter() as dataset, Pool(workers, initializer=_init_worker) if workers > 1 else _InlinePool() as pool:
        for split, count in counts.items():
            path = os.path.join(out_dir, f"{split}.lmdb")
            writer = writers[split] = dataset.split(path)
            jobs = [(kind, seed, split, range(start, min(start + chunk, count)), min_objects, max_objects, frames,
                     style) for start in range(0, count, chunk)]
            try:
                with tqdm(total=count, desc=f"{kind}/{split}", unit="video" if kind != "shapes" else "img",
                          disable=not progress, dynamic_ncols=True) as bar:
                    for samples in pool.imap(_generate_chunk, jobs):
                        for sample in samples:
                            writer.add(sample)
                        bar.update(len(samples))
            except BaseException:
                writer.abort()
                raise
            writer.finish({"dataset": kind, "split": split, "size": [RESOLUTION, RESOLUTION],
                          "frames": frames if kind == "shapes_video" else None, "max_objects": max_objects,
                          "min_objects": min_objects, "seed": seed, "ignore_label": 255, "style": style})
            paths[split] = path
    describe_dataset(kind, out_dir, writers)
    return paths


class _InlinePool:
    """The subset of multiprocessing.Pool used above, run in this process (workers=1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, function, jobs, chunksize=1):
        return map(function, jobs)


# ================================================================================================================
# Real datasets: ClevrTex, COCO 2017 panoptic, Pascal VOC 2012 and MOVi-C/D/E, read from the layout their own downloads
# give (README, "Real datasets"). A lister checks the layout in the main process and describes each split's items; a
# converter decodes, crops and resizes one item in a worker. An input that cannot be read raises BadInput and is
# reported by name and skipped, so a damaged file never becomes a silently wrong sample.

IGNORE_LABEL = 255
MOVI_FRAMES = 24
DEFAULT_MAX_OBJECTS = {"shapes": 6, "shapes_video": 6, "clevrtex": 10, "coco": 10, "voc": 10, "movi_c": 10,
                       "movi_d": 20, "movi_e": 20}  # MOVi: the slot budget; Kubric scenes have up to 10 / 23 objects
CLEVRTEX_VARIANTS = ("full", "outd", "camo", "pbg", "vbg", "grassbg")
FILTER_REASONS = ("too_many_objects", "small_object")
DOWNLOAD_HINTS = {
    "clevrtex": "download clevrtex_full (and any OOD set such as clevrtex_outd) from "
                "https://www.robots.ox.ac.uk/~vgg/data/clevrtex/ and unpack it there",
    "coco": "download the 2017 train/val images and the 2017 panoptic annotations from "
            "https://cocodataset.org/#download, then unzip annotations/panoptic_train2017.zip and "
            "panoptic_val2017.zip in place",
    "voc": "download VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (and for "
           "--voc_split msf the VOC2007 trainval tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2007/) and "
           "untar it there",
    "movi": "copy it with `mkdir -p ROOT/{name}/{resolution} && gsutil -m cp -r "
            "gs://kubric-public/tfds/{name}/{resolution}/1.0.0 ROOT/{name}/{resolution}/`",
}


class BadInput(Exception):
    """An input file that cannot be read or contradicts its format: the item is reported by name and skipped."""


def _layout_error(name: str, root: str, expected: str, resolution: str = "128x128") -> UserError:
    hint = DOWNLOAD_HINTS["movi" if name.startswith("movi") else name].format(name=name, resolution=resolution)
    problem = "does not hold the" if os.path.isdir(root) else "does not exist; expected the"
    return UserError(f"{root} {problem} {name} layout ({expected}); {hint}, or point --root at it")


# ------------------------------------------------------------------------------------------------ pixels

def read_rgb(path: str) -> np.ndarray:
    """Decode an image file to (H,W,3) uint8; grayscale, palette and RGBA files are converted to RGB."""
    if not os.path.exists(path):
        raise BadInput(f"missing file {path}")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:  # what Pillow raises for unknown, broken or truncated files
        raise BadInput(f"cannot decode {path} ({error})") from None


def read_index_png(path: str) -> np.ndarray:
    """The pixel indices (H,W) uint8 of an 8-bit palette ('P') or grayscale PNG, never its palette colours."""
    if not os.path.exists(path):
        raise BadInput(f"missing file {path}")
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L"):
                raise BadInput(f"{path} is a mode-{mask.mode} image, expected 8-bit palette indices")
            return np.array(mask)
    except (OSError, SyntaxError, ValueError) as error:
        raise BadInput(f"cannot decode {path} ({error})") from None


def decode_png(blob: bytes, channels: int) -> np.ndarray:
    """One encoded video frame as (H,W,3) uint8 (channels=3) or its single channel (H,W) as stored (channels=1)."""
    try:
        with Image.open(io.BytesIO(blob)) as frame:
            array = np.array(frame.convert("RGB") if channels == 3 else frame)
    except (OSError, SyntaxError, ValueError) as error:
        raise BadInput(f"undecodable frame ({error})") from None
    if channels == 1 and array.ndim != 2:
        raise BadInput(f"segmentation frame has shape {array.shape}, expected one channel")
    return array


def _check_same_size(image: np.ndarray, mask: np.ndarray, mask_path: str) -> None:
    if image.shape[:2] != mask.shape[:2]:
        raise BadInput(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                       f"{image.shape[1]}x{image.shape[0]}")


def square_crop_resize(pixels: np.ndarray, segment: np.ndarray, size: int, crop_fraction: float = 1.0):
    """Centre-crop (…,H,W,3) uint8 pixels and (…,H,W) ids to a square of side crop_fraction·min(H,W), then
    resize to size x size with resize_sample (pixels antialiased bilinear, ids nearest-exact).

    Returns the uint8 pixels, the ids in their own dtype, and the crop (top, left, side) in source pixels."""
    height, width = segment.shape[-2:]
    side = max(1, int(round(crop_fraction * min(height, width))))
    top, left = (height - side) // 2, (width - side) // 2
    pixels = pixels[..., top:top + side, left:left + side, :]
    segment = segment[..., top:top + side, left:left + side]
    if side != size:
        # ids go through float32 inside resize_sample: exact below 2^24, which holds for every label used here
        resized_pixels, resized_segment = resize_sample(
            torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, -3).float(),
            torch.from_numpy(np.ascontiguousarray(segment)), size)
        pixels = resized_pixels.round_().clamp_(0, 255).to(torch.uint8).movedim(-3, -1).numpy()
        segment = resized_segment.numpy()
    return np.ascontiguousarray(pixels), np.ascontiguousarray(segment), (top, left, side)


def renumber_objects(labels: np.ndarray, ignore: int):
    """Map the object labels present (all but 0 and `ignore`) to 1..n in increasing order and `ignore` to 255.

    Returns the uint8 segment and n; the segment is None when n > 254 objects cannot be stored in uint8."""
    present = np.unique(labels)
    objects = present[(present != 0) & (present != ignore)]
    if len(objects) > IGNORE_LABEL - 1:
        return None, len(objects)
    segment = np.zeros(labels.shape, np.uint8)
    is_object = np.isin(labels, objects)
    segment[is_object] = np.searchsorted(objects, labels[is_object]) + 1
    segment[labels == ignore] = IGNORE_LABEL
    return segment, len(objects)


def filter_reason(segment: np.ndarray, count: int, max_objects: int, min_box_area: float):
    """Why the COCO/VOC filter drops an image (the first rule that applies), or None to keep it."""
    if count > max_objects:
        return "too_many_objects"
    height, width = segment.shape
    boxes = boxes_from_segment(segment, count) * np.array([width, height, width, height], np.float32)  # (n, 4) px
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if np.any(areas < min_box_area):
        return "small_object"
    return None


def _finish_image(image: np.ndarray, labels: np.ndarray, ignore: int, settings: dict):
    """Crop and resize, renumber the objects that survived the crop to 1..n, apply the COCO/VOC filter."""
    image, labels, _ = square_crop_resize(image, labels, settings["size"], settings["crop_fraction"])
    segment, count = renumber_objects(labels, ignore)
    reason = "too_many_objects" if segment is None else filter_reason(
        segment, count, settings["max_objects"], settings["min_box_area"])
    if reason is not None:
        return ("filtered", reason)
    return ("kept", {"image": image, "segment": segment, "bbox": boxes_from_segment(segment, settings["max_objects"])},
            count, 0)


# ------------------------------------------------------------------------------------------------ ClevrTex

def list_clevrtex(root: str, options: dict) -> dict:
    """Scenes of one ClevrTex variant; `full` splits by scene index as the official loader does (test 0-4,999,
    val 5,000-9,999, train 10,000-49,999), other variants are one evaluation split named after the variant."""
    variant = options["variant"]
    prefix = f"CLEVRTEX_{variant}_"
    pattern = os.path.join("*", prefix + "[0-9]" * 6 + ".png")  # the rendered image only, not its _flat/_depth passes
    images = []
    for folder in (os.path.join(root, f"clevrtex_{variant}"), root):
        images = glob.glob(os.path.join(folder, pattern))
        if images:
            break
    if not images:
        raise _layout_error("clevrtex", root, f"clevrtex_{variant}/<index // 1000>/{prefix}<index:06d>.png with "
                                              f"{prefix}<index:06d>_flat.png beside each image")
    scenes = sorted((int(os.path.basename(path)[len(prefix):len(prefix) + 6]), path) for path in images)
    items = [(index, {"name": os.path.basename(path), "image": path, "mask": path[:-len(".png")] + "_flat.png"})
             for index, path in scenes]
    if variant != "full":
        return {variant: [item for _, item in items]}
    splits = {"train": [item for index, item in items if index >= 10000],
              "val": [item for index, item in items if 5000 <= index < 10000]}
    if options["test"]:
        splits["test"] = [item for index, item in items if index < 5000]
    return splits


def convert_clevrtex_item(item: dict, settings: dict):
    """Object ids are the `_flat.png` palette indices (0 = background, i = the i-th object of the scene JSON)."""
    image = read_rgb(item["image"])  # the release's PNGs may carry an alpha channel
    mask = read_index_png(item["mask"])
    _check_same_size(image, mask, item["mask"])
    if mask.max() > settings["max_objects"]:
        raise BadInput(f"{item['mask']} has object index {mask.max()}, more than max_objects={settings['max_objects']}")
    image, segment, _ = square_crop_resize(image, mask, settings["size"], settings["crop_fraction"])
    count = int(np.count_nonzero(np.bincount(segment.ravel(), minlength=settings["max_objects"] + 1)[1:]))
    return ("kept", {"image": image, "segment": segment, "bbox": boxes_from_segment(segment, settings["max_objects"])},
            count, 0)


# ------------------------------------------------------------------------------------------------ COCO

def list_coco(root: str, options: dict) -> dict:
    """One item per panoptic annotation of train2017 / val2017, in the order of the annotation JSON."""
    if options["test"]:
        raise UserError("COCO panoptic has no labelled test split; drop --split test")
    splits = {}
    for split, coco_split in (("train", "train2017"), ("val", "val2017")):
        json_path = os.path.join(root, "annotations", f"panoptic_{coco_split}.json")
        png_dir = os.path.join(root, "annotations", f"panoptic_{coco_split}")
        image_dir = os.path.join(root, coco_split)
        expected = (f"{coco_split}/*.jpg, annotations/panoptic_{coco_split}.json and the PNG folder "
                    f"annotations/panoptic_{coco_split}/")
        if not (os.path.isfile(json_path) and os.path.isdir(png_dir) and os.path.isdir(image_dir)):
            raise _layout_error("coco", root, expected)
        items = []
        try:
            with open(json_path) as f:
                panoptic = json.load(f)
            is_thing = {category["id"]: bool(category["isthing"]) for category in panoptic["categories"]}
            images = {image["id"]: image["file_name"] for image in panoptic["images"]}
            for annotation in panoptic["annotations"]:
                name = annotation["file_name"]
                item = {"name": f"{coco_split}/{name}", "panoptic": os.path.join(png_dir, name)}
                unknown = [s["category_id"] for s in annotation["segments_info"] if s["category_id"] not in is_thing]
                if annotation["image_id"] not in images:
                    item["error"] = f"image id {annotation['image_id']} is not listed in {json_path}"
                elif unknown:
                    item["error"] = f"unknown category ids {unknown} in {json_path}"
                else:
                    item["image"] = os.path.join(image_dir, images[annotation["image_id"]])
                    item["segments"] = [(s["id"], is_thing[s["category_id"]], bool(s.get("iscrowd", 0)))
                                        for s in annotation["segments_info"]]
                items.append(item)
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{json_path} is not a COCO panoptic annotation file ({type(error).__name__}: {error}); "
                            f"{DOWNLOAD_HINTS['coco']}") from None
        splits[split] = items
    return splits


def convert_coco_item(item: dict, settings: dict):
    """Things become objects numbered in segments_info order, stuff becomes background 0, void (id 0), crowd
    segments and ids missing from segments_info become ignore 255."""
    image = read_rgb(item["image"])  # some COCO JPEGs are grayscale
    encoded = read_rgb(item["panoptic"]).astype(np.int32)
    _check_same_size(image, encoded, item["panoptic"])
    ids = encoded[..., 0] + 256 * encoded[..., 1] + 256 * 256 * encoded[..., 2]  # panopticapi's rgb2id, (H, W)
    present, inverse = np.unique(ids, return_inverse=True)
    position = {int(segment_id): i for i, segment_id in enumerate(present)}
    lookup = np.full(len(present), -1, np.int32)  # -1 = ignore until renumbering
    things = 0
    for segment_id, is_thing, is_crowd in item["segments"]:
        if is_crowd:
            continue
        if is_thing:
            things += 1
        if segment_id in position:
            lookup[position[segment_id]] = things if is_thing else 0
    labels = lookup[inverse].reshape(ids.shape)  # (H, W) int32
    return _finish_image(image, labels, -1, settings)


# ------------------------------------------------------------------------------------------------ VOC

def _find_vocdevkit(root: str, year: str):
    """The VOC<year> folder under root, accepting root = the folder itself, VOCdevkit, or VOCdevkit's parent."""
    for candidate in (os.path.join(root, "VOCdevkit", f"VOC{year}"), os.path.join(root, f"VOC{year}"),
                      os.path.join(os.path.dirname(os.path.abspath(root)), f"VOC{year}"), root):
        if os.path.isdir(os.path.join(candidate, "JPEGImages")) and os.path.basename(
                os.path.abspath(candidate)) == f"VOC{year}":
            return candidate
    return None


def list_voc(root: str, options: dict) -> dict:
    """VOC 2012 train/val lists by default; `msf` split: every VOC2012 mask for train, every VOC2007 mask for val."""
    mask_folder = "SegmentationObject" if options["voc_masks"] == "object" else "SegmentationClass"
    if options["test"]:
        raise UserError("VOC has no labelled test split; drop --split test")
    voc2012 = _find_vocdevkit(root, "2012")
    if voc2012 is None or not os.path.isdir(os.path.join(voc2012, mask_folder)):
        raise _layout_error("voc", root, f"VOCdevkit/VOC2012/{{JPEGImages,{mask_folder},ImageSets/Segmentation}}")

    def item(folder, stem):
        return {"name": f"{os.path.basename(folder)}/{stem}",
                "image": os.path.join(folder, "JPEGImages", stem + ".jpg"),
                "mask": os.path.join(folder, mask_folder, stem + ".png")}

    def masks_in(folder):
        return sorted(os.path.basename(p)[:-len(".png")] for p in glob.glob(os.path.join(folder, mask_folder, "*.png")))

    if options["voc_split"] == "msf":
        voc2007 = _find_vocdevkit(root, "2007")
        if voc2007 is None or not os.path.isdir(os.path.join(voc2007, mask_folder)):
            raise _layout_error("voc", root, f"VOCdevkit/VOC2007/{{JPEGImages,{mask_folder}}} beside VOC2012 for "
                                             f"--voc_split msf")
        return {"train": [item(voc2012, stem) for stem in masks_in(voc2012)],
                "val": [item(voc2007, stem) for stem in masks_in(voc2007)]}
    splits = {}
    for split in ("train", "val"):
        list_path = os.path.join(voc2012, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(list_path):
            raise _layout_error("voc", root, f"VOCdevkit/VOC2012/ImageSets/Segmentation/{split}.txt")
        with open(list_path) as f:
            splits[split] = [item(voc2012, line.strip()) for line in f if line.strip()]
    return splits


def convert_voc_item(item: dict, settings: dict):
    """Mask palette indices are the labels: 0 background, 1..N objects (or classes), 255 void stays ignore."""
    image = read_rgb(item["image"])
    mask = read_index_png(item["mask"])
    _check_same_size(image, mask, item["mask"])
    return _finish_image(image, mask, IGNORE_LABEL, settings)


# ------------------------------------------------------------------------------------------------ MOVi

MOVI_KEYS = ("video", "segmentations", "metadata/num_instances",
             "instances/bboxes/ragged_flat_values", "instances/bboxes/ragged_row_lengths_0",
             "instances/bbox_frames/ragged_flat_values", "instances/bbox_frames/ragged_row_lengths_0")
_MOVI_SHARD = re.compile(r"^(?P<name>movi_[a-z])-(?P<split>train|validation|test)\.tfrecord-\d{5}-of-\d{5}$")


def _version_key(directory: str):
    return tuple(int(part) if part.isdigit() else 0 for part in os.path.basename(directory).split("."))


def find_movi_shards(root: str, name: str, resolution: str) -> dict:
    """{TFDS split: sorted shard paths} from the TFDS folder <data_dir>/<name>/<resolution>/<version>/; root may be
    any of those levels. With several versions the newest is used."""
    for levels in ((name, resolution, "*"), (resolution, "*"), ("*",), ()):
        found = [p for p in glob.glob(os.path.join(root, *levels, f"{name}-*.tfrecord-*"))
                 if _MOVI_SHARD.match(os.path.basename(p)) and _MOVI_SHARD.match(os.path.basename(p))["name"] == name]
        if found:
            directory = max({os.path.dirname(p) for p in found}, key=_version_key)
            shards = {}
            for path in sorted(p for p in found if os.path.dirname(p) == directory):
                shards.setdefault(_MOVI_SHARD.match(os.path.basename(path))["split"], []).append(path)
            return shards
    return {}


def list_movi(root: str, options: dict) -> dict:
    """One item per TFRecord record (located by reading the record headers), so workers share even small shard lists;
    a shard whose framing breaks keeps the records before the break and is reported."""
    name, resolution = options["name"], options["resolution"]
    shards = find_movi_shards(root, name, resolution)
    wanted = {"train": "train", "val": "validation"}
    if options["test"]:
        wanted["test"] = "test"
    if not all(shards.get(tfds_split) for tfds_split in wanted.values()):
        raise _layout_error(name, root, f"{name}/{resolution}/1.0.0/{name}-{{{','.join(wanted.values())}}}"
                                        f".tfrecord-NNNNN-of-NNNNN", resolution)
    splits = {}
    for split, tfds_split in wanted.items():
        items = []
        for path in shards[tfds_split]:
            records, problem = index_tfrecord(path)
            items.extend({"name": f"{os.path.basename(path)}#{i}", "path": path, "offset": offset, "length": length}
                         for i, (offset, length) in enumerate(records))
            if problem is not None:
                items.append({"name": os.path.basename(path), "error": problem})
        splits[split] = items
    return splits


def _feature_ints(features: dict, key: str) -> np.ndarray:
    value = features.get(key)
    if value is None:
        raise BadInput(f"the record has no '{key}'")
    if isinstance(value, list) and not value:
        return np.zeros(0, np.int64)
    if not isinstance(value, np.ndarray) or value.dtype != np.int64:
        raise BadInput(f"'{key}' is not an int64 list")
    return value


def movi_boxes(features: dict, frames: int) -> np.ndarray:
    """Dense (T, n, 4) normalised ltrb boxes from the ragged per-instance [ymin, xmin, ymax, xmax] boxes and their
    frame indices; zero where an instance has no box in a frame."""
    counts = _feature_ints(features, "instances/bboxes/ragged_row_lengths_0")  # (n,) boxes per instance
    frame_counts = _feature_ints(features, "instances/bbox_frames/ragged_row_lengths_0")
    frame_ids = _feature_ints(features, "instances/bbox_frames/ragged_flat_values")  # (sum counts,)
    flat = features.get("instances/bboxes/ragged_flat_values")
    flat = np.zeros(0, np.float32) if isinstance(flat, list) and not flat else flat
    if not isinstance(flat, np.ndarray) or flat.dtype != np.float32:
        raise BadInput("'instances/bboxes/ragged_flat_values' is missing or not a float list")
    if (not np.array_equal(counts, frame_counts) or np.any(counts < 0) or len(frame_ids) != counts.sum()
            or len(flat) != 4 * counts.sum()):
        raise BadInput("the ragged box lists disagree in length")
    if len(frame_ids) and (frame_ids.min() < 0 or frame_ids.max() >= frames):
        raise BadInput(f"a box frame index lies outside 0..{frames - 1}")
    instance = np.repeat(np.arange(len(counts)), counts)
    dense = np.zeros((frames, len(counts), 4), np.float32)
    dense[frame_ids, instance] = flat.reshape(-1, 4)[:, [1, 0, 3, 2]]  # yxyx -> ltrb
    return dense


def crop_boxes(boxes: np.ndarray, height: int, width: int, crop) -> np.ndarray:
    """Normalised ltrb boxes of a (height, width) frame re-expressed in the square crop (top, left, side)."""
    top, left, side = crop
    if (top, left, side) == (0, 0, height) and height == width:
        return boxes
    scale = np.array([width, height, width, height], np.float32)
    offset = np.array([left, top, left, top], np.float32)
    cropped = np.clip((boxes * scale - offset) / side, 0.0, 1.0)
    empty = (cropped[..., 2] <= cropped[..., 0]) | (cropped[..., 3] <= cropped[..., 1])
    cropped[empty] = 0.0
    return cropped.astype(np.float32)


def convert_movi_item(item: dict, settings: dict):
    """Segment ids as stored (0 background, k = instance k, sorted by visibility by Kubric); ids beyond the slot
    budget K merge into the background; boxes come from the record, not from the (possibly subsampled) masks."""
    features = decode_example(read_tfrecord_record(item["path"], item["offset"], item["length"]), MOVI_KEYS)
    video_blobs, mask_blobs = features.get("video"), features.get("segmentations")
    if not (isinstance(video_blobs, list) and isinstance(mask_blobs, list) and video_blobs and mask_blobs):
        raise BadInput("the record has no 'video' or 'segmentations' PNG frames")
    frames = [decode_png(blob, 3) for blob in video_blobs]
    masks = [decode_png(blob, 1) for blob in mask_blobs]
    if len(frames) != MOVI_FRAMES or len(masks) != MOVI_FRAMES:
        raise BadInput(f"{len(frames)} video / {len(masks)} segmentation frames, expected {MOVI_FRAMES}")
    if len({frame.shape[:2] for frame in frames} | {mask.shape for mask in masks}) != 1:
        raise BadInput("frames differ in size")
    video, segment = np.stack(frames), np.stack(masks)  # (T, H, W, 3), (T, H, W)
    boxes = movi_boxes(features, MOVI_FRAMES)  # (T, n, 4)
    instances = boxes.shape[1]
    declared = features.get("metadata/num_instances")
    if declared is not None and len(declared) and int(declared[0]) != instances:
        raise BadInput(f"metadata/num_instances is {int(declared[0])} but {instances} instances have boxes")
    budget = settings["max_objects"]
    segment = np.where(segment > budget, 0, segment).astype(np.uint8)
    dense = np.zeros((MOVI_FRAMES, budget, 4), np.float32)  # (T, K, 4)
    dense[:, :min(instances, budget)] = boxes[:, :budget]
    height, width = segment.shape[1:]
    video, segment, crop = square_crop_resize(video, segment, settings["size"], settings["crop_fraction"])
    dense = crop_boxes(dense, height, width, crop)
    count = int(np.count_nonzero(np.bincount(segment.ravel(), minlength=budget + 1)[1:]))
    return ("kept", {"video": video, "segment": segment, "bbox": dense}, count, max(0, instances - budget))


# ------------------------------------------------------------------------------------------------ driver

LISTERS = {"clevrtex": list_clevrtex, "coco": list_coco, "voc": list_voc, "movi": list_movi}
CONVERTERS = {"clevrtex": convert_clevrtex_item, "coco": convert_coco_item, "voc": convert_voc_item,
              "movi": convert_movi_item}


def _convert_item(kind: str, settings: dict, item: dict):
    """One item in a worker: ("kept", sample, objects, dropped instances) | ("filtered", reason) | ("bad", report)."""
    try:
        if "error" in item:
            raise BadInput(item["error"])
        return CONVERTERS[kind](item, settings)
    except (BadInput, BadRecord) as error:
        return ("bad", f"{item['name']}: {error}")


def _init_worker():
    torch.set_num_threads(1)  # one process per core already
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: one message, no traces


def _summary_line(name: str, split: str, summary: dict) -> str:
    filtered = ", ".join(f"{reason} {count}" for reason, count in summary["filtered"].items())
    histogram = " ".join(f"{objects}:{count}" for objects, count in summary["object_histogram"].items())
    line = (f"{name}/{split}: kept {summary['kept']}, filtered {sum(summary['filtered'].values())} ({filtered}), "
            f"skipped {summary['skipped_count']} unreadable; objects per sample {{{histogram}}}")
    if summary.get("dropped_instances"):
        line += (f"; {summary['dropped_instances']} instances beyond the slot budget merged into the background "
                 f"in {summary['samples_with_dropped_instances']} videos")
    return line


def convert_real(name: str, root: str, out_dir: str, options: dict, workers: int, progress: bool = True) -> dict:
    """Convert every split of a real dataset in parallel and write each atomically; returns {split: (path, summary)}."""
    kind = "movi" if name.startswith("movi") else name
    max_objects = options["max_objects"]
    if not 1 <= max_objects <= IGNORE_LABEL - 1:
        raise UserError(f"--max_objects must be between 1 and {IGNORE_LABEL - 1}, got {max_objects}")
    if not 0 < options["crop_fraction"] <= 1:
        raise UserError(f"--crop_fraction must be in (0, 1], got {options['crop_fraction']}")
    splits = LISTERS[kind](root, dict(options, name=name))  # all layouts checked before any conversion starts
    for split, items in splits.items():
        if not items:
            raise _layout_error(name, root, f"at least one {split} item", options.get("resolution", "128x128"))
    settings = {"size": RESOLUTION, "max_objects": max_objects, "min_box_area": options["min_box_area"],
                "crop_fraction": options["crop_fraction"]}
    unit = "video" if kind == "movi" else "img"
    results, writers = {}, {}
    with DatasetWriter() as dataset, Pool(workers, initializer=_init_worker) if workers > 1 else _InlinePool() as pool:
        for split, items in splits.items():
            path = os.path.join(out_dir, f"{split}.lmdb")
            summary = {"kept": 0, "filtered": {reason: 0 for reason in FILTER_REASONS}, "object_histogram": {},
                       "skipped_count": 0, "skipped": []}
            if kind == "movi":
                summary.update(dropped_instances=0, samples_with_dropped_instances=0)
            histogram = {}
            writer = writers[split] = dataset.split(path, commit_every=8 if kind == "movi" else 64)
            try:
                with tqdm(total=len(items), desc=f"{name}/{split}", unit=unit, disable=not progress,
                          dynamic_ncols=True) as bar:
                    work = partial(_convert_item, kind, settings)
                    for result in pool.imap(work, items, chunksize=1 if kind == "movi" else 4):
                        if result[0] == "kept":
                            _, sample, objects, dropped = result
                            writer.add(sample)
                            summary["kept"] += 1
                            histogram[objects] = histogram.get(objects, 0) + 1
                            if dropped:
                                summary["dropped_instances"] += dropped
                                summary["samples_with_dropped_instances"] += 1
                        elif result[0] == "filtered":
                            summary["filtered"][result[1]] += 1
                        else:
                            summary["skipped_count"] += 1
                            if len(summary["skipped"]) < 1000:  # the metadata keeps the first 1000, stdout all
                                summary["skipped"].append(result[1])
                            bar.write(f"skipped {result[1]}")
                        bar.update(1)
                summary["object_histogram"] = {str(k): histogram[k] for k in sorted(histogram)}
                if summary["kept"] == 0:
                    if summary["skipped_count"] == len(items):
                        raise UserError(f"none of the {len(items)} {split} inputs of {name} under {root} could be "
                                        f"read (first: {summary['skipped'][0]}); check or re-download the dataset")
                    raise UserError(f"no {split} sample of {name} is left ({_summary_line(name, split, summary)}); "
                                    f"relax --max_objects or --min_box_area")
            except BaseException:
                writer.abort()
                raise
            writer.finish({"dataset": name, "split": split, "size": [RESOLUTION, RESOLUTION],
                          "frames": MOVI_FRAMES if kind == "movi" else None, "max_objects": max_objects,
                          "ignore_label": IGNORE_LABEL, "source": os.path.abspath(root),
                          "options": {key: value for key, value in options.items() if key != "max_objects"},
                          "summary": summary})
            print(_summary_line(name, split, summary))
            results[split] = (path, summary)
    describe_dataset(name, out_dir, writers)
    return results


# ================================================================================================================
# What a written dataset holds: every split's statistics (data.SplitStatistics, also in the split's metadata) on the
# console, and preview.png beside the splits, so the data can be checked before anything trains on it.

def statistics_line(name: str, split: str, statistics: dict) -> str:
    """One line of a split's `statistics` (its metadata's): count, resolution, objects per image, object areas and
    the background's share."""
    if not statistics.get("images"):
        return f"{name}/{split}: no samples"
    samples, images = statistics["samples"], statistics["images"]
    what = f"{samples} videos ({images} frames, each counted as an image)" if images > samples else f"{samples} images"
    objects, areas = statistics["objects_per_image"], statistics["object_area_percent"]
    area = (" / ".join(f"{areas[f'p{q}']:.2f}" for q in AREA_PERCENTILES) + " % of the image (" +
            "/".join(str(q) for q in AREA_PERCENTILES) + "th percentiles)") if areas else "no objects"
    return (f"{name}/{split}: {what} at {statistics['resolution'][0]}x{statistics['resolution'][1]}; objects per "
            f"image {objects['min']} / {objects['mean']:.2f} / {objects['max']} (min / mean / max); object area "
            f"{area}; background {statistics['background_percent_mean']:.1f} % of the pixels (mean)")


def describe_dataset(name: str, out_dir: str, writers: dict) -> str:
    """After a dataset is published: print each split's statistics line and draw out_dir/preview.png, up to
    data.PREVIEW_SAMPLES training samples (else the first split's; a video's first frame) with their ground-truth
    segments coloured. Returns the preview's path, "" when no sample could be drawn."""
    for split, writer in writers.items():
        print(statistics_line(name, split, writer.statistics.summary()))
    shown = [(split, writer.statistics) for split, writer in writers.items() if writer.statistics.examples]
    if not shown:
        return ""
    split, statistics = next(((s, w) for s, w in shown if s == "train"), shown[0])
    images = torch.from_numpy(np.stack([image for image, _ in statistics.examples])).permute(0, 3, 1, 2) / 255.0
    segments = np.stack([segment for _, segment in statistics.examples])
    first = "first frames of the " if statistics.summary()["images"] > statistics.samples else ""
    rows = [images, colour_segments(segments), segments_over(images, segments)]
    labels = [f"{first}{split} samples 0-{len(segments) - 1}", "ground truth (black: background, white: ignore)",
              "ground truth over the image"]
    path = save_labelled_grid(rows, labels, os.path.join(out_dir, "preview.png"))
    print(f"wrote {path}")
    return path


# ================================================================================================================
# Command line.

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=SYNTHETIC_DATASETS + REAL_DATASETS, help="dataset to generate or convert")
    parser.add_argument("--out", default=None, help="output directory (default data/NAME)")
    parser.add_argument("--root", default=None, help="raw dataset directory for real datasets (default data/raw/NAME)")
    parser.add_argument("--seed", type=ranged(int, "--seed", min=0), default=0, help="synthetic data: generator seed")
    parser.add_argument("--num_train", type=ranged(int, "--num_train", min=0), default=None,
                        help="synthetic data: training samples (default 5000 images / 300 videos)")
    parser.add_argument("--num_val", type=ranged(int, "--num_val", min=0), default=None,
                        help="synthetic data: validation samples (default 500 images / 50 videos)")
    parser.add_argument("--min_objects", type=ranged(int, "--min_objects", min=1, max=254), default=2,
                        help="synthetic data: fewest objects per scene")
    parser.add_argument("--max_objects", type=ranged(int, "--max_objects", min=1, max=254), default=None,
                        help="synthetic data: most objects per scene (default 6); real data: the K box slots per "
                             "sample, for COCO/VOC also the filter's object limit, for MOVi the slot budget beyond "
                             "which instances merge into the background (default 10; MOVi-D/E 20)")
    parser.add_argument("--frames", type=ranged(int, "--frames", min=1), default=24,
                        help="shapes_video: frames per video")
    parser.add_argument("--style", choices=tuple(STYLES), default="multiscale",
                        help="synthetic data: multiscale (objects of radius 3-32 px at 128x128, textured, on textured "
                             "backgrounds), easy (radius 8-40, flat colours on flat backgrounds, at most 5 objects "
                             "unless --max_objects says otherwise) or multisize (easy with radius 4-40)")
    parser.add_argument("--min_radius", type=ranged(float, "--min_radius", above=0.0, max=RESOLUTION / 2),
                        default=None, help="synthetic data: override the style's smallest object radius (px at 128x128)")
    parser.add_argument("--max_radius", type=ranged(float, "--max_radius", above=0.0, max=RESOLUTION / 2),
                        default=None, help="synthetic data: override the style's largest object radius (px at 128x128)")
    parser.add_argument("--object_texture", choices=("yes", "no"), default=None,
                        help="synthetic data: override whether objects carry textures")
    parser.add_argument("--background_texture", choices=("yes", "no"), default=None,
                        help="synthetic data: override whether backgrounds carry patterns")
    parser.add_argument("--workers", type=ranged(int, "--workers", min=1), default=min(4, os.cpu_count() or 1),
                        help="worker processes")
    parser.add_argument("--min_box_area", type=ranged(float, "--min_box_area", min=0.0), default=16.0,
                        help="COCO/VOC: drop images with an object whose bounding box covers fewer pixels at 128x128")
    parser.add_argument("--crop_fraction", type=ranged(float, "--crop_fraction", above=0.0, max=1.0), default=1.0,
                        help="real data: side of the centre square crop as a fraction of the shorter image side "
                             "(0.8 is the official ClevrTex loader's 192-pixel crop)")
    parser.add_argument("--variant", choices=CLEVRTEX_VARIANTS, default="full",
                        help="ClevrTex: which set; variants other than full become one evaluation split VARIANT.lmdb")
    parser.add_argument("--split", choices=("test",), default=None,
                        help="ClevrTex full / MOVi: also write test.lmdb (ClevrTex scenes 0-4999, MOVi's test shards)")
    parser.add_argument("--voc_masks", choices=("object", "class"), default="object",
                        help="VOC: SegmentationObject instance masks or SegmentationClass masks")
    parser.add_argument("--voc_split", choices=("official", "msf"), default="official",
                        help="VOC: 2012 train/val lists, or msf (the official MSF code): all 2012 masks train, "
                             "VOC2007 val")
    parser.add_argument("--resolution", choices=("128x128", "256x256"), default="128x128",
                        help="MOVi: which TFDS config to read (256x256 is resized to 128)")
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.strip():  # '' would mean data/NAME, replacing that dataset
        raise UserError(f"--out is empty; give the directory to write the dataset to (without --out: data/{args.name})")
    out_dir = args.out or os.path.join("data", args.name)
    default_max = 5 if args.style in FLAT_STYLES and args.name in SYNTHETIC_DATASETS else DEFAULT_MAX_OBJECTS[args.name]
    max_objects = args.max_objects if args.max_objects is not None else default_max
    progress = sys.stderr.isatty() or not os.environ.get("CI")

    if args.name in SYNTHETIC_DATASETS:
        video = args.name == "shapes_video"
        counts = {"train": args.num_train if args.num_train is not None else (300 if video else 5000),
                  "val": args.num_val if args.num_val is not None else (50 if video else 500)}
        style = dict(STYLES[args.style])
        for key in ("min_radius", "max_radius"):
            if getattr(args, key) is not None:
                style[key] = getattr(args, key)
        if args.object_texture is not None:
            style["textured"] = args.object_texture == "yes"
        if args.background_texture is not None:
            style["flat_background"] = args.background_texture == "no"
        if not 0 < style["min_radius"] <= style["max_radius"] <= RESOLUTION / 2:
            raise UserError(f"need 0 < min_radius <= max_radius <= {RESOLUTION // 2} (px at {RESOLUTION}x"
                            f"{RESOLUTION}), got {style['min_radius']}, {style['max_radius']}")
        paths = write_synthetic(args.name, out_dir, counts, args.seed, args.min_objects, max_objects,
                                args.frames, args.workers, progress=progress, style=style)
        for split, path in paths.items():
            print(f"wrote {path} ({counts[split]} {'videos' if video else 'images'})")
        return
    options = {"max_objects": max_objects, "min_box_area": args.min_box_area, "crop_fraction": args.crop_fraction,
               "variant": args.variant, "test": args.split == "test", "voc_masks": args.voc_masks,
               "voc_split": args.voc_split, "resolution": args.resolution}
    root = args.root or os.path.join("data", "raw", args.name)
    results = convert_real(args.name, root, out_dir, options, args.workers, progress=progress)
    for split, (path, summary) in results.items():
        print(f"wrote {path} ({summary['kept']} {'videos' if args.name.startswith('movi') else 'images'})")


if __name__ == "__main__":
    run_main(main)
