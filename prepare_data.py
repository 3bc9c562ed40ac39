"""Datasets: generate the embedded synthetic data or convert a real dataset into the project's LMDB format.

    python prepare_data.py shapes       [--out data/shapes]       [--num_train N --num_val M --seed S]
    python prepare_data.py shapes_video [--out data/shapes_video] [--num_train N --num_val M --seed S]
    python prepare_data.py NAME --root RAW_DIR [--out data/NAME]   (NAME: clevrtex coco voc movi_c movi_d movi_e)

Every split is one LMDB file (`train.lmdb`, `val.lmdb`). Each record is raw array bytes behind a small JSON header
(no pickle: a crafted database cannot execute code); a `__meta__` record describes the split. A split is written
to `<name>.partial` and renamed only when complete, so a half-written database is never mistaken for a finished one.

The module is also the data library of the other stages: `load_split(path)` reads a split as numpy arrays and
`OCLDataset` serves normalised tensors to a DataLoader (safe with worker processes and DDP).
"""

import argparse
import json
import math
import os
import struct
import sys
from multiprocessing import Pool

import numpy as np

from common import UserError, run_main

FORMAT_NAME = "msf-lmdb"
FORMAT_VERSION = 1
META_KEY = b"__meta__"
RESOLUTION = 128
REAL_DATASETS = ("clevrtex", "coco", "voc", "movi_c", "movi_d", "movi_e")
SYNTHETIC_DATASETS = ("shapes", "shapes_video")


# ================================================================================================================
# Record encoding: 4-byte little-endian header length, JSON header {name: [dtype, shape]}, then the arrays' bytes.

def encode_record(arrays: dict) -> bytes:
    """Serialise a dict of numpy arrays without pickle."""
    header, blobs = {}, []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.kind not in "biuf":
            raise ValueError(f"array '{name}' has unsupported dtype {array.dtype}")
        header[name] = [array.dtype.str, list(array.shape)]
        blobs.append(array.tobytes())
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(header_bytes)) + header_bytes + b"".join(blobs)


def decode_record(value: bytes) -> dict:
    """Inverse of encode_record; arrays are read-only views of `value`."""
    (header_length,) = struct.unpack_from("<I", value, 0)
    header = json.loads(bytes(value[4:4 + header_length]))
    offset, arrays = 4 + header_length, {}
    for name, (dtype, shape) in header.items():
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        arrays[name] = np.frombuffer(value, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += count * dtype.itemsize
    if offset != len(value):
        raise ValueError(f"record has {len(value) - offset} trailing bytes")
    return arrays


# ================================================================================================================
# LMDB splits: atomic writer and lazy, fork-safe reader.

def _create_command(path: str) -> str:
    """The command that (re)creates the database at `path`, for error messages."""
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(directory.rstrip("/"))
    if name in SYNTHETIC_DATASETS:
        return f"python prepare_data.py {name} --out {os.path.dirname(path) or '.'}"
    if name in REAL_DATASETS:
        return f"python prepare_data.py {name} --out {os.path.dirname(path) or '.'}"
    return "python prepare_data.py NAME --out DIR (see README, 'Datasets')"


class SplitWriter:
    """Write records to `<path>.partial`, then rename to `path` when `close()` is called with the metadata."""

    def __init__(self, path: str, commit_every: int = 64):
        import lmdb

        self.path = path
        self.partial = path + ".partial"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        for stale in (self.partial, self.partial + "-lock"):
            if os.path.exists(stale):
                os.remove(stale)
        self.env = lmdb.open(self.partial, subdir=False, map_size=1 << 40, readahead=False, meminit=False,
                             map_async=True, writemap=False)
        self.count = 0
        self.commit_every = commit_every
        self.txn = self.env.begin(write=True)

    def add(self, arrays: dict) -> int:
        """Append one sample; returns its index."""
        self.txn.put(b"%08d" % self.count, encode_record(arrays))
        self.count += 1
        if self.count % self.commit_every == 0:
            self.txn.commit()
            self.txn = self.env.begin(write=True)
        return self.count - 1

    def close(self, meta: dict) -> None:
        """Write the metadata record last, flush, and publish the file under its final name."""
        meta = dict(meta, format=FORMAT_NAME, format_version=FORMAT_VERSION, count=self.count)
        self.txn.put(META_KEY, json.dumps(meta).encode())
        self.txn.commit()
        self.env.sync(True)
        self.env.close()
        for old in (self.path, self.path + "-lock"):
            if os.path.exists(old):
                os.remove(old)
        os.replace(self.partial, self.path)
        if os.path.exists(self.partial + "-lock"):
            os.remove(self.partial + "-lock")

    def abort(self) -> None:
        """Drop the partial file (used when generation fails)."""
        try:
            self.txn.abort()
            self.env.close()
        finally:
            for stale in (self.partial, self.partial + "-lock"):
                if os.path.exists(stale):
                    os.remove(stale)


_OPEN_ENVS = {}  # real path -> (pid, file identity, environment): LMDB allows one open per file and process


def _open_env(path: str):
    """Open `path` read-only once per process. An environment inherited through fork, or a file replaced on disk
    since it was opened, is closed and opened afresh."""
    import lmdb

    stat = os.stat(path)
    identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    key = os.path.realpath(path)
    cached = _OPEN_ENVS.get(key)
    if cached is not None and cached[:2] == (os.getpid(), identity):
        return cached[2]
    if cached is not None:
        cached[2].close()
    env = lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=False, meminit=False, max_readers=1024)
    # A truncated file would crash the process (SIGBUS) on the first read past its end; the meta page knows how
    # long the file must be, so check that before any read goes through the memory map.
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if stat.st_size < needed:
        env.close()
        raise ValueError(f"file is truncated: {stat.st_size} bytes, the database needs {needed}")
    _OPEN_ENVS[key] = (os.getpid(), identity, env)
    return env


class Split:
    """A read-only LMDB split: `len(split)`, `split[i]` -> dict of numpy arrays, `split.meta`.

    The LMDB environment is opened lazily in each process that reads (keyed by process id), so the object can be
    handed to DataLoader workers (fork or spawn) and DDP ranks without sharing a handle across processes.
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            if os.path.exists(path + ".partial"):
                raise UserError(f"{path} was never finished (only {path}.partial exists); rerun "
                                f"`{_create_command(path)}`")
            raise UserError(f"dataset split {path} does not exist; create it with `{_create_command(path)}`")
        if os.path.isdir(path):
            raise UserError(f"{path} is a directory, not a single-file LMDB split of this project; "
                            f"recreate it with `{_create_command(path)}`")
        try:
            with _open_env(path).begin() as txn:
                raw_meta = txn.get(META_KEY)
        except Exception as error:
            if isinstance(error, UserError):
                raise
            raise UserError(f"{path} is not a readable LMDB database ({type(error).__name__}: {error}); "
                            f"recreate it with `{_create_command(path)}`") from None
        if raw_meta is None:
            raise UserError(f"{path} has no metadata record, so it is half-written or not from this project; "
                            f"recreate it with `{_create_command(path)}`")
        try:
            meta = json.loads(raw_meta)
        except ValueError:
            raise UserError(f"{path} has a corrupt metadata record; recreate it with `{_create_command(path)}`") from None
        if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path} is format {meta.get('format')} version {meta.get('format_version')}, this code "
                            f"reads {FORMAT_NAME} version {FORMAT_VERSION}; recreate it with `{_create_command(path)}`")
        self.meta = meta

    def __len__(self) -> int:
        return self.meta["count"]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.path} with {len(self)} samples")
        with _open_env(self.path).begin(buffers=False) as txn:
            value = txn.get(b"%08d" % index)
        if value is None:
            raise UserError(f"{self.path} is missing sample {index} of {len(self)}; the file is corrupt, recreate it "
                            f"with `{_create_command(self.path)}`")
        try:
            return decode_record(value)
        except Exception as error:
            raise UserError(f"{self.path} sample {index} is corrupt ({error}); recreate it with "
                            f"`{_create_command(self.path)}`") from None


def load_split(path: str) -> Split:
    """Open a split written by this script (SPEC §7): `len()`, `[i]` -> dict of arrays as stored, `.meta`."""
    return Split(path)


# ================================================================================================================
# Torch dataset: normalised tensors, temporal windows for video, fixed-size boxes for batching.

class OCLDataset:
    """Serve one split to a DataLoader.

    Images: {"image": float32 (3,H,W) in [-1,1], "segment": uint8 (H,W), "bbox": float32 (K,4)}.
    Videos: {"video": float32 (T,3,H,W), "segment": uint8 (T,H,W), "bbox": float32 (T,K,4)}; training draws one of
    the non-overlapping `num_frames` windows at random, evaluation returns every frame.
    `resolution` other than the stored one resizes on the fly (images antialiased, masks nearest-exact), which is
    how the CPU demo trains at 64x64 from the 128x128 data.
    """

    def __init__(self, path: str, train: bool, num_frames: int = 6, resolution: int = 0, seed: int = 0):
        self.split = load_split(path)
        self.train = train
        self.num_frames = num_frames
        self.stored_resolution = int(self.split.meta["size"][0])
        self.resolution = resolution or self.stored_resolution
        self.max_objects = int(self.split.meta["max_objects"])
        self.is_video = bool(self.split.meta.get("frames"))
        self.seed = seed
        if self.is_video and train and self.split.meta["frames"] < num_frames:
            raise UserError(f"{path} has {self.split.meta['frames']} frames per video, fewer than num_frames={num_frames}")

    def __len__(self) -> int:
        return len(self.split)

    def _window(self, draw: int, total_frames: int) -> slice:
        if not self.train:
            return slice(0, total_frames)
        rng = np.random.default_rng([self.seed, draw])
        start = int(rng.integers(total_frames // self.num_frames)) * self.num_frames
        return slice(start, start + self.num_frames)

    def __getitem__(self, key) -> dict:
        """`key` is an index, or (index, draw) from StepSampler: `draw` seeds the random window, so resumed and
        DDP runs see the same windows as one uninterrupted run."""
        import torch

        index, draw = key if isinstance(key, tuple) else (key, key)
        record = self.split[index]
        pixels = record["video"] if self.is_video else record["image"]
        segment = record["segment"]
        bbox = record.get("bbox")
        if self.is_video:
            window = self._window(draw, pixels.shape[0])
            pixels, segment = pixels[window], segment[window]
            bbox = bbox[window] if bbox is not None else None
        pixels = torch.from_numpy(np.array(pixels)).movedim(-1, -3).float().sub_(127.5).div_(127.5)
        segment = torch.from_numpy(np.array(segment))
        if self.resolution != self.stored_resolution:
            pixels, segment = resize_sample(pixels, segment, self.resolution)
        sample = {"video" if self.is_video else "image": pixels, "segment": segment}
        sample["bbox"] = pad_boxes(bbox, self.max_objects, frames=pixels.shape[0] if self.is_video else None)
        return sample


class StepSampler:
    """Training order as a pure function of (seed, step): epochs are seeded permutations laid end to end, step s
    takes global positions [s*B, (s+1)*B) and rank r the r-th of `world_size` equal slices of them.

    So one process with batch B and W processes with batch B/W see the same samples, and `start_step` resumes
    mid-epoch exactly. Yields (index, position) pairs for OCLDataset.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        if num_samples <= 0:
            raise UserError("the training split is empty")
        assert global_batch % world_size == 0, "global batch must divide evenly across ranks"
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if getattr(self, "_epoch", None) != epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return int(self._order[offset])

    def __iter__(self):
        local = self.global_batch // self.world_size
        step = self.start_step
        while True:
            first = step * self.global_batch + self.rank * local
            for position in range(first, first + local):
                yield self._index(position), position
            step += 1


def resize_sample(pixels, segment, size: int):
    """Resize (…,3,H,W) pixels with antialiasing and (…,H,W) segments with nearest-exact to size x size."""
    import torch.nn.functional as F

    lead = pixels.shape[:-3]
    pixels = F.interpolate(pixels.reshape(-1, *pixels.shape[-3:]), size=(size, size), mode="bilinear",
                           antialias=True, align_corners=False).reshape(*lead, 3, size, size)
    segment = F.interpolate(segment.reshape(-1, 1, *segment.shape[-2:]).float(), size=(size, size),
                            mode="nearest-exact").to(segment.dtype).reshape(*lead, size, size)
    return pixels, segment


def pad_boxes(bbox, max_objects: int, frames=None):
    """Zero-pad (K,4) or (T,K,4) boxes to max_objects so samples batch; missing boxes become all zeros."""
    import torch

    shape = (max_objects, 4) if frames is None else (frames, max_objects, 4)
    padded = torch.zeros(shape, dtype=torch.float32)
    if bbox is not None:
        k = min(bbox.shape[-2], max_objects)
        padded[..., :k, :] = torch.from_numpy(np.array(bbox[..., :k, :], dtype=np.float32))
    return padded


# ================================================================================================================
# Embedded synthetic data: multi-object scenes whose objects span very different sizes (SPEC §4).
# Each sample is drawn from its own generator seeded by (seed, kind, split, index), so the output does not depend on
# how the work is split across processes.

SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross", "ring")
TEXTURE_KINDS = ("solid", "stripes", "checker", "dots", "waves")
MIN_RADIUS, MAX_RADIUS = 3.0, 32.0  # objects from ~6 px across to half the 128-px image
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


def sample_objects(rng, count: int) -> dict:
    """Draw `count` objects' static attributes (shape, size, pose, colours, texture)."""
    log_radius = rng.uniform(np.log(MIN_RADIUS), np.log(MAX_RADIUS), count)
    radius = np.exp(log_radius)
    return {
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


def sample_background(rng) -> np.ndarray:
    """A textured background (H,W,3) in [0,1]: a muted base colour modulated by one of four patterns."""
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
    contrast = rng.uniform(0.25, 0.6)
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


def generate_image(seed: int, split: str, index: int, min_objects: int, max_objects: int) -> dict:
    """One `shapes` sample: every object keeps at least 30% (and 12 px) of itself visible."""
    rng = np.random.default_rng([seed, 0, SPLIT_IDS[split], index])
    background = sample_background(rng)
    count = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(100):
        objects = sample_objects(rng, count)
        image, segment, full, visible = render(objects, background, rng)
        if _visible_enough(full, visible):
            break
    else:  # pathological draw: fall back to fewer objects rather than emit a hidden one
        objects = sample_objects(rng, 1)
        image, segment, full, visible = render(objects, background, rng)
    return {"image": image, "segment": segment, "bbox": boxes_from_segment(segment, max_objects)}


def _reflect(position, low, high):
    """Bounce a linearly moving coordinate between low and high (triangle wave)."""
    span = np.maximum(high - low, 1e-6)
    phase = np.mod(position - low, 2 * span)
    return low + span - np.abs(span - phase)


def generate_video(seed: int, split: str, index: int, min_objects: int, max_objects: int, frames: int) -> dict:
    """One `shapes_video` sample: objects move, bounce off the borders, turn, and grow or shrink over the clip."""
    rng = np.random.default_rng([seed, 1, SPLIT_IDS[split], index])
    background = sample_background(rng)
    count = int(rng.integers(min_objects, max_objects + 1))
    t = np.arange(frames)[:, None]
    for _ in range(100):
        objects = sample_objects(rng, count)
        speed, heading = rng.uniform(0.5, 2.5, count), rng.uniform(0, 2 * np.pi, count)
        growth = rng.uniform(-0.025, 0.025, count)  # log-scale change per frame: up to 1.8x over 24 frames
        spin = rng.uniform(-0.06, 0.06, count)
        radius = np.clip(objects["radius"][None] * np.exp(growth[None] * t), MIN_RADIUS * 0.8, MAX_RADIUS * 1.25)
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
    kind, seed, split, indices, min_objects, max_objects, frames = job
    if kind == "shapes":
        return [generate_image(seed, split, i, min_objects, max_objects) for i in indices]
    return [generate_video(seed, split, i, min_objects, max_objects, frames) for i in indices]


def write_synthetic(kind: str, out_dir: str, counts: dict, seed: int, min_objects: int, max_objects: int,
                    frames: int, workers: int, progress: bool = True) -> dict:
    """Generate every split of `shapes` / `shapes_video` in parallel and write them atomically."""
    from tqdm import tqdm

    if not 1 <= min_objects <= max_objects <= 254:
        raise UserError(f"need 1 <= min_objects <= max_objects <= 254, got {min_objects}, {max_objects}")
    paths = {}
    chunk = 8 if kind == "shapes" else 1
    with Pool(workers) if workers > 1 else _InlinePool() as pool:
        for split, count in counts.items():
            path = os.path.join(out_dir, f"{split}.lmdb")
            writer = SplitWriter(path)
            jobs = [(kind, seed, split, range(start, min(start + chunk, count)), min_objects, max_objects, frames)
                    for start in range(0, count, chunk)]
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
            writer.close({"dataset": kind, "split": split, "size": [RESOLUTION, RESOLUTION],
                          "frames": frames if kind == "shapes_video" else None, "max_objects": max_objects,
                          "min_objects": min_objects, "seed": seed, "ignore_label": 255})
            paths[split] = path
    return paths


class _InlinePool:
    """The subset of multiprocessing.Pool used above, run in this process (workers=1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, function, jobs):
        return map(function, jobs)


# ================================================================================================================
# Command line.

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=SYNTHETIC_DATASETS + REAL_DATASETS, help="dataset to generate or convert")
    parser.add_argument("--out", default=None, help="output directory (default data/NAME)")
    parser.add_argument("--root", default=None, help="raw dataset directory for real datasets (default data/raw/NAME)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data: generator seed")
    parser.add_argument("--num_train", type=int, default=None,
                        help="synthetic data: training samples (default 5000 images / 300 videos)")
    parser.add_argument("--num_val", type=int, default=None,
                        help="synthetic data: validation samples (default 500 images / 50 videos)")
    parser.add_argument("--min_objects", type=int, default=2, help="synthetic data: fewest objects per scene")
    parser.add_argument("--max_objects", type=int, default=6, help="synthetic data: most objects per scene")
    parser.add_argument("--frames", type=int, default=24, help="shapes_video: frames per video")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.join("data", args.name)

    if args.name in SYNTHETIC_DATASETS:
        video = args.name == "shapes_video"
        counts = {"train": args.num_train if args.num_train is not None else (300 if video else 5000),
                  "val": args.num_val if args.num_val is not None else (50 if video else 500)}
        if min(counts.values()) < 0:
            raise UserError("--num_train and --num_val must be >= 0")
        paths = write_synthetic(args.name, out_dir, counts, args.seed, args.min_objects, args.max_objects,
                                args.frames, args.workers, progress=sys.stderr.isatty() or not os.environ.get("CI"))
        for split, path in paths.items():
            print(f"wrote {path} ({counts[split]} {'videos' if video else 'images'})")
        return
    raise UserError(f"the {args.name} converter is not implemented yet")


if __name__ == "__main__":
    run_main(main)
