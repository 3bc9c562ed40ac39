"""The data every stage shares: the on-disk record format, LMDB splits, the torch Dataset, the step-indexed sampler
and the DataLoaders built on them.

prepare_data.py writes splits with `SplitWriter`; pretrain_vae.py, train_ocl.py, evaluate.py and study.py read
them through `load_split`, `OCLDataset`, `train_loader` and `eval_loader`.

Every split is one LMDB file (`train.lmdb`, `val.lmdb`). Each record is raw array bytes behind a small JSON header
(no pickle: a crafted database cannot execute code) that carries a CRC-32 of the bytes; a `__meta__` record describes
the split, with a fingerprint of all its records that checkpoints keep to know their data by. A split is written to
`<name>.partial` and renamed only when complete, so a half-written database is never mistaken for a finished one.
"""

import functools
import hashlib
import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import select
import struct
import sys
import threading
import time
import zlib

import lmdb
import numpy as np
import torch
import torch.nn.functional as F

from devices import Dist
from errors import UserError, sigterm_held
from files import exclusive_lock

FORMAT_NAME = "msf-lmdb"
FORMAT_VERSION = 1
META_KEY = b"__meta__"
# The datasets prepare_data.py makes, named here so that a missing split's error can give the command to create it.
SYNTHETIC_DATASETS = ("shapes", "shapes_video")
REAL_DATASETS = ("clevrtex", "coco", "voc", "movi_c", "movi_d", "movi_e")


# ================================================================================================================
# Record encoding: 4-byte little-endian header length, JSON header {name: [dtype, shape], "#crc32": CRC-32 of the
# array bytes}, then the arrays' bytes. Records written before the checksum have no "#crc32" and are read unchecked.

CHECKSUM_KEY = "#crc32"


def encode_record(arrays: dict) -> bytes:
    """Serialise a dict of numpy arrays without pickle."""
    header, blobs = {}, []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.kind not in "biuf":
            raise ValueError(f"array '{name}' has unsupported dtype {array.dtype}")
        if name == CHECKSUM_KEY:
            raise ValueError(f"array name {name!r} is reserved for the record's checksum")
        header[name] = [array.dtype.str, list(array.shape)]
        blobs.append(array.tobytes())
    crc = 0
    for blob in blobs:
        crc = zlib.crc32(blob, crc)
    header[CHECKSUM_KEY] = crc
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(header_bytes)) + header_bytes + b"".join(blobs)


def decode_record(value: bytes) -> dict:
    """Inverse of encode_record; arrays are read-only views of `value`."""
    (header_length,) = struct.unpack_from("<I", value, 0)
    header = json.loads(bytes(value[4:4 + header_length]))
    offset, arrays = 4 + header_length, {}
    crc = header.pop(CHECKSUM_KEY, None)
    if crc is not None and zlib.crc32(memoryview(value)[offset:]) != crc:
        raise ValueError("its bytes do not match the checksum written with them")
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
    split = os.path.basename(path)[:-len(".lmdb")] if path.endswith(".lmdb") else ""
    if split not in ("train", "val", ""):  # e.g. test: prepare_data writes it together with train/val
        return f"python prepare_data.py {name if name in REAL_DATASETS else 'NAME'} --split {split} --out NEW_DIR"
    if name in SYNTHETIC_DATASETS + REAL_DATASETS:
        return f"python prepare_data.py {name} --out {os.path.dirname(path) or '.'}"
    return "python prepare_data.py NAME --out DIR (see README, 'The pipeline')"


def _synthetic_kind(directory: str):
    """The synthetic dataset (shapes, shapes_video) whose splits `directory` holds, by their metadata or else by the
    directory's name; None for any other."""
    for name in ("train.lmdb", "val.lmdb"):
        sibling = os.path.join(directory, name)
        if os.path.isfile(sibling):
            try:
                with _open_env(sibling).begin() as txn:
                    raw = txn.get(META_KEY)
                kind = json.loads(raw).get("dataset") if raw else None
            except Exception:  # unreadable: its own error comes when it is read
                continue
            return kind if kind in SYNTHETIC_DATASETS else None
    name = os.path.basename(os.path.abspath(directory))
    return name if name in SYNTHETIC_DATASETS else None


def write_error(path: str, error: Exception) -> UserError:
    """A failed write of a dataset file (full disk, read-only target) as one sentence."""
    cause = getattr(error, "strerror", None) or str(error).split(": ")[-1]
    return UserError(f"could not write {path} ({cause}); the dataset there is unchanged: free space on that disk or "
                     f"choose a writable --out, then rerun")


class SplitWriter:
    """Write records to `<path>.partial`; `finish()` writes the metadata and flushes, `publish()` renames the file
    to `path` (`close()` does both). A failed write drops the partial file and ends in one sentence."""

    def __init__(self, path: str, commit_every: int = 64):
        self.path = path
        self.partial = path + ".partial"
        self.env, self.txn = None, None
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise UserError(f"{directory} is a file, not a directory; choose another --out")
        try:
            os.makedirs(directory, exist_ok=True)
            for stale in (self.partial, self.partial + "-lock"):
                if os.path.exists(stale):
                    os.remove(stale)
            self.env = lmdb.open(self.partial, subdir=False, map_size=1 << 40, readahead=False, meminit=False,
                                 map_async=True, writemap=False)
            self.txn = self.env.begin(write=True)
        except (OSError, lmdb.Error) as error:
            self.abort()
            raise write_error(self.partial, error) from None
        self.count = 0
        self.commit_every = commit_every
        self.digest = hashlib.sha256()
        self.statistics = SplitStatistics()

    def add(self, arrays: dict) -> int:
        """Append one sample; returns its index."""
        key, value = b"%08d" % self.count, encode_record(arrays)
        try:
            self.txn.put(key, value)
            if (self.count + 1) % self.commit_every == 0:
                self.txn.commit()
                self.txn = self.env.begin(write=True)
        except (OSError, lmdb.Error) as error:
            self.abort()
            raise write_error(self.partial, error) from None
        self.digest.update(key + value)
        self.statistics.add(arrays)
        self.count += 1
        return self.count - 1

    def finish(self, meta: dict) -> None:
        """Write the metadata record (with the records' fingerprint and statistics) last and flush the file to disk."""
        meta = dict(meta, format=FORMAT_NAME, format_version=FORMAT_VERSION, count=self.count,
                    fingerprint=self.digest.hexdigest()[:16], statistics=self.statistics.summary())
        try:
            self.txn.put(META_KEY, json.dumps(meta).encode())
            self.txn.commit()
            self.env.sync(True)
            self.env.close()
            self.env = None
        except (OSError, lmdb.Error) as error:
            self.abort()
            raise write_error(self.partial, error) from None

    def publish(self) -> None:
        """Give the finished file its final name (atomic: the old split is there until the new one takes it)."""
        try:
            os.replace(self.partial, self.path)
            for stale in (self.path + "-lock", self.partial + "-lock"):
                if os.path.exists(stale):
                    os.remove(stale)
        except OSError as error:
            raise write_error(self.path, error) from None

    def close(self, meta: dict) -> None:
        """finish() and publish(): one split on its own."""
        self.finish(meta)
        self.publish()

    def abort(self) -> None:
        """Drop the partial file (used when generation fails)."""
        try:
            if self.txn is not None and self.env is not None:
                self.txn.abort()
            if self.env is not None:
                self.env.close()
        finally:
            self.env = self.txn = None
            for stale in (self.partial, self.partial + "-lock"):
                try:
                    os.remove(stale)
                except OSError:  # never there, or the disk refuses: nothing to undo, and the first error matters
                    pass


AREA_PERCENTILES = (5, 25, 50, 75, 95)
PREVIEW_SAMPLES = 8


class SplitStatistics:
    """What the samples a SplitWriter adds hold, for the split's metadata and prepare_data.py's summary: objects per
    image, each object's area and the background's share, and the first PREVIEW_SAMPLES samples for a preview.
    Objects are the ground-truth ids other than 0 (background) and 255 (ignore); areas and the background share are
    fractions of all the image's pixels. Every frame of a video counts as an image (a video's preview is its first
    frame)."""

    def __init__(self):
        self.samples, self.size = 0, None
        self.objects, self.areas, self.background, self.examples = [], [], [], []

    def add(self, arrays: dict) -> None:
        segment = arrays.get("segment")
        if segment is None or segment.ndim not in (2, 3) or segment.dtype.kind != "u":
            return  # a record without an unsigned ground-truth segment (hand-made test records): nothing to count
        frames = segment.reshape(-1, *segment.shape[-2:])
        counts = np.stack([np.bincount(frame.ravel(), minlength=256) for frame in frames]).astype(np.float64)
        objects = np.concatenate([counts[:, 1:255], counts[:, 256:]], 1)  # ids past 255 of wider dtypes count too
        pixels = frames.shape[1] * frames.shape[2]
        self.samples += 1
        self.size = self.size or tuple(frames.shape[1:])
        self.objects.append((objects > 0).sum(1))
        self.areas.append(objects[objects > 0] / pixels)
        self.background.append(counts[:, 0] / pixels)
        picture = arrays.get("video", arrays.get("image"))
        if len(self.examples) < PREVIEW_SAMPLES and picture is not None \
                and picture.shape[-3:] == (*frames.shape[1:], 3):  # RGB of the segment's size
            self.examples.append((np.array(picture.reshape(-1, *picture.shape[-3:])[0]), np.array(frames[0])))

    def summary(self) -> dict:
        """{"samples", "images" (video frames counted), "resolution" [H, W], "objects_per_image" {min, mean, max},
        "object_area_percent" {p5, p25, p50, p75, p95} (None without objects), "background_percent_mean"}; without
        samples, the counts alone."""
        if not self.samples:
            return {"samples": 0, "images": 0}
        objects, areas = np.concatenate(self.objects), 100 * np.concatenate(self.areas)
        return {"samples": self.samples, "images": int(len(objects)), "resolution": list(self.size),
                "objects_per_image": {"min": int(objects.min()), "mean": float(objects.mean()),
                                      "max": int(objects.max())},
                "object_area_percent": {f"p{q}": float(np.percentile(areas, q)) for q in AREA_PERCENTILES}
                if len(areas) else None,
                "background_percent_mean": float(100 * np.concatenate(self.background).mean())}


class DatasetWriter:
    """The splits of one dataset directory (train and val), written side by side and published together when the
    `with` block ends: an error or Ctrl-C before drops every partial file and leaves the old dataset whole, so a
    directory never mixes two generations. (A split not yet renamed keeps its `.partial`, which readers refuse.)"""

    def __init__(self):
        self.writers, self.locks = [], {}

    def split(self, path: str, commit_every: int = 64) -> SplitWriter:
        """A writer for one split; finish() it inside the block, the block publishes it."""
        self._lock(os.path.dirname(os.path.abspath(path)))
        self.writers.append(SplitWriter(path, commit_every))
        return self.writers[-1]

    def _lock(self, directory: str) -> None:
        """Hold `directory/.prepare.lock` (flock) while writing there: a second prepare_data.py into the same
        directory would delete this one's partial files as stale."""
        if directory in self.locks or (os.path.exists(directory) and not os.path.isdir(directory)):
            return  # a file in the way: SplitWriter says so
        path = os.path.join(directory, ".prepare.lock")
        try:
            os.makedirs(directory, exist_ok=True)
            handle = exclusive_lock(path, f"another prepare_data.py is writing {directory} (it holds {path}); wait for "
                                          f"it to end or choose another --out")
        except OSError as error:
            raise write_error(path, error) from None
        self.locks[directory] = handle

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        try:
            if kind is not None:
                for writer in self.writers:
                    writer.abort()
                return False
            for writer in self.writers:
                writer.publish()
            return False
        finally:
            for directory, handle in self.locks.items():  # removed while still held, as the run lock is
                try:
                    os.remove(os.path.join(directory, ".prepare.lock"))
                except OSError:
                    pass
                handle.close()


_OPEN_ENVS = {}  # real path -> (pid, file identity, environment): LMDB allows one open per file and process


def _open_env(path: str):
    """Open `path` read-only once per process. An environment inherited through fork, or a file replaced on disk
    since it was opened, is closed and opened afresh."""
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
            extra = os.path.basename(path) not in ("train.lmdb", "val.lmdb")
            synthetic = _synthetic_kind(os.path.dirname(path) or ".") if extra else None
            if synthetic:
                raise UserError(f"dataset split {path} does not exist, and synthetic data ({synthetic}) has only train "
                                f"and val splits; evaluate --split val, or generate held-out data with another seed "
                                f"(`python prepare_data.py {synthetic} --seed 1 --out NEW_DIR`, plus the options this "
                                f"data was made with) and evaluate its val split with --data_dir NEW_DIR")
            note = "" if not extra else (
                f" in a new directory (it rewrites train/val too, so not in {os.path.dirname(path) or '.'}) and point "
                f"--data_dir at it")
            raise UserError(f"dataset split {path} does not exist; create it with `{_create_command(path)}`{note}")
        if os.path.exists(path + ".partial"):
            raise UserError(f"{path}.partial lies next to {path}: a regeneration of this dataset was interrupted, so "
                            f"its splits may come from different runs; regenerate it with `{_create_command(path)}`")
        if os.path.isdir(path):
            raise UserError(f"{path} is a directory, not a single-file LMDB split of this project; "
                            f"recreate it with `{_create_command(path)}`")
        try:
            with _open_env(path).begin() as txn:
                raw_meta = txn.get(META_KEY)
        except Exception as error:
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
        self.identity = _OPEN_ENVS[os.path.realpath(path)][1]

    def _env(self):
        """The split's environment. _open_env follows a file replaced on disk; if the new file holds other records
        (a regeneration while a run reads), the run would go on with other data, so that is refused."""
        env = _open_env(self.path)
        identity = _OPEN_ENVS[os.path.realpath(self.path)][1]
        if identity != self.identity:
            with env.begin() as txn:
                raw_meta = txn.get(META_KEY)
            meta = json.loads(raw_meta) if raw_meta else {}
            if (meta.get("fingerprint"), meta.get("count")) != (self.meta.get("fingerprint"), self.meta.get("count")):
                raise UserError(f"{self.path} was replaced by other data while this process read it (a regeneration "
                                f"with prepare_data.py?); rerun on one version of the dataset (a training run "
                                f"continues from its last checkpoint with --resume auto and --allow_changed data)")
            self.identity = identity
        return env

    def __len__(self) -> int:
        return self.meta["count"]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.path} with {len(self)} samples")
        try:
            with self._env().begin(buffers=False) as txn:
                value = txn.get(b"%08d" % index)
        except (lmdb.Error, ValueError, OSError) as error:  # a damaged page, or a file cut short since it was opened
            raise UserError(f"{self.path} cannot be read at sample {index} ({type(error).__name__}: {error}); the file "
                            f"is corrupt, recreate it with `{_create_command(self.path)}`") from None
        if value is None:
            raise UserError(f"{self.path} is missing sample {index} of {len(self)}; the file is corrupt, recreate it "
                            f"with `{_create_command(self.path)}`")
        try:
            return decode_record(value)
        except Exception as error:
            raise UserError(f"{self.path} sample {index} is corrupt ({error}); recreate it with "
                            f"`{_create_command(self.path)}`") from None


def check_resumed_data(state, dataset: "OCLDataset", config: dict) -> None:
    """Refuse to resume a checkpoint on training data other than its own: a path names data, the fingerprint
    written with the split identifies it, so a dataset regenerated in place (another seed or size) is caught.
    Checkpoints or splits from before fingerprints are not checked; `--allow_changed data` accepts new data."""
    saved = (state or {}).get("data", {}).get("fingerprint")
    if not saved or not dataset.fingerprint or saved == dataset.fingerprint:
        return
    if {"data", "data_dir", "train_split"} & set(config["allow_changed"]):
        return
    raise UserError(f"checkpoint {state['path']} was trained on other data than {dataset.split.path} holds now "
                    f"(fingerprint {saved}, now {dataset.fingerprint}: the dataset was regenerated or replaced); "
                    f"point data_dir at the data it was trained on, accept the new data with --allow_changed data, "
                    f"or start afresh in another --out_dir")


def split_path(data_dir: str, split: str) -> str:
    """The file of split `split` (train, val, ...) in a dataset directory."""
    return os.path.join(data_dir, f"{split}.lmdb")


def load_split(path: str) -> Split:
    """Open a split written by prepare_data.py: `len()`, `[i]` -> dict of arrays as stored (README, "Real
    datasets", lists the keys), `.meta`."""
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
        self.fingerprint = self.split.meta.get("fingerprint")  # None for splits written before fingerprints
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
        index, draw = key if isinstance(key, tuple) else (key, key)
        record = self.split[index]
        for needed in ("video" if self.is_video else "image", "segment"):
            if needed not in record:
                raise UserError(f"{self.split.path} sample {index} has no '{needed}' array (it holds "
                                f"{sorted(record)}); recreate the split with `{_create_command(self.split.path)}`")
        pixels = record["video"] if self.is_video else record["image"]
        segment = record["segment"]
        lead = (pixels.shape[0],) if self.is_video and pixels.ndim else ()
        if pixels.shape[:-3] != lead or pixels.shape[-1:] != (3,) or segment.shape != pixels.shape[:-1]:
            raise UserError(f"{self.split.path} sample {index} holds {'video' if self.is_video else 'image'} "
                            f"{tuple(pixels.shape)} and segment {tuple(segment.shape)}, not RGB "
                            f"{'(T,H,W,3)' if self.is_video else '(H,W,3)'} with a segment of the same size; "
                            f"recreate the split with `{_create_command(self.split.path)}`")
        bbox = record.get("bbox")
        if self.is_video:
            window = self._window(draw, pixels.shape[0])
            pixels, segment = pixels[window], segment[window]
            bbox = bbox[window] if bbox is not None else None
        pixels = torch.from_numpy(np.array(pixels)).movedim(-1, -3).float().sub_(127.5).div_(127.5)
        segment = torch.from_numpy(np.array(segment))
        if self.resolution != self.stored_resolution:
            pixels, segment = resize_sample(pixels, segment, self.resolution)
        sample = {"video" if self.is_video else "image": pixels, "segment": segment, "index": index}
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


def resize_pixels(pixels, size: int):
    """Resize (…,3,H,W) pixels to size x size, bilinear with antialiasing: how every stored image is resized, and
    api.read_images' images of any size."""
    lead = pixels.shape[:-3]
    return F.interpolate(pixels.reshape(-1, *pixels.shape[-3:]), size=(size, size), mode="bilinear",
                         antialias=True, align_corners=False).reshape(*lead, 3, size, size)


def resize_sample(pixels, segment, size: int):
    """Resize (…,3,H,W) pixels with antialiasing and (…,H,W) segments with nearest-exact to size x size."""
    pixels = resize_pixels(pixels, size)
    lead = pixels.shape[:-3]
    segment = F.interpolate(segment.reshape(-1, 1, *segment.shape[-2:]).float(), size=(size, size),
                            mode="nearest-exact").to(segment.dtype).reshape(*lead, size, size)
    return pixels, segment


def pad_boxes(bbox, max_objects: int, frames=None):
    """Zero-pad (K,4) or (T,K,4) boxes to max_objects so samples batch; missing boxes become all zeros."""
    shape = (max_objects, 4) if frames is None else (frames, max_objects, 4)
    padded = torch.zeros(shape, dtype=torch.float32)
    if bbox is not None:
        k = min(bbox.shape[-2], max_objects)
        padded[..., :k, :] = torch.from_numpy(np.array(bbox[..., :k, :], dtype=np.float32))
    return padded



# ================================================================================================================
# DataLoaders for the trainers (endless, step-indexed) and for validation / evaluation (finite, sharded).

def train_loader(path: str, global_batch: int, num_workers: int, seed: int, d: Dist, start_step: int = 0,
                 resolution: int = 0, num_frames: int = 6) -> torch.utils.data.DataLoader:
    """An endless loader whose order is a pure function of (seed, step): see StepSampler."""
    if global_batch % d.world_size:
        raise UserError(f"batch_size {global_batch} must be divisible by the {d.world_size} processes")
    dataset = OCLDataset(path, train=True, num_frames=num_frames, resolution=resolution, seed=seed)
    sampler = StepSampler(len(dataset), global_batch, seed, d.rank, d.world_size, start_step)
    # Its own generator keeps the loader from drawing on the global RNG, which resume restores exactly.
    return Loader(dataset, num_workers, batch_size=global_batch // d.world_size, sampler=sampler,
                  pin_memory=d.device.type == "cuda", persistent_workers=num_workers > 0, generator=torch.Generator())


def eval_loader(path: str, batch_size: int, num_workers: int, d: Dist, resolution: int = 0,
                max_samples: int = 0, persistent: bool = False) -> torch.utils.data.DataLoader:
    """A finite loader over this rank's share (every world_size-th sample) of the first `max_samples` samples;
    `persistent`: its workers stay between passes (a trainer's validation loader)."""
    dataset = OCLDataset(path, train=False, resolution=resolution)
    if len(dataset) == 0:
        raise UserError(f"split {path} holds no samples, so there is nothing to validate or evaluate; recreate it "
                        f"with `{_create_command(path)}` or name another split")
    count = len(dataset) if max_samples <= 0 else min(max_samples, len(dataset))
    subset = torch.utils.data.Subset(dataset, list(range(d.rank, count, d.world_size)))
    return Loader(subset, num_workers, batch_size=batch_size, shuffle=False, pin_memory=d.device.type == "cuda",
                  generator=torch.Generator(), persistent_workers=persistent and num_workers > 0)


class Loader(torch.utils.data.DataLoader):
    """torch's DataLoader with `num_workers` workers that start from a forkserver with the script's imports done
    (worker_context), with SIGTERM held (errors.sigterm_held, so a stop never leaves a worker half-started), and end
    when the process that made the loader ends, however it ends (end_with_process)."""

    def __init__(self, dataset, num_workers: int, **kwargs):
        super().__init__(dataset, num_workers=num_workers, multiprocessing_context=worker_context(num_workers),
                         worker_init_fn=functools.partial(end_with_process, os.getpid()), **kwargs)

    def __iter__(self):
        with sigterm_held():
            return super().__iter__()


def worker_context(num_workers: int):
    """Loader workers start from a forkserver, not by forking the trainer: a fork of a process that already runs
    gloo/OpenMP threads can copy a held lock into the worker, which then never starts (seen as a DDP run that
    hangs at its first validation). The forkserver imports the running script once (`_script_module`) and each
    worker forks with its imports done: Python's forkserver means to do that but is never told the script (3.11
    passes it no main_path), so every worker ran the trainer's imports again, about 4 s a worker on a busy 2-core
    CPU, at every validation."""
    if num_workers <= 0:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "data"] + _script_module())
    multiprocessing.forkserver.ensure_running()  # its imports overlap the trainer's set-up
    return context


def _script_module() -> list:
    """[the module name of the script this process runs] (`train_ocl` for `python train_ocl.py`), or [] when it runs
    none (python -m, an interactive session). The forkserver imports it by name, so from the directory the script is
    run in (the repository root) or PYTHONPATH; from elsewhere each worker imports the script itself, as before."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not path.endswith(".py") or getattr(main, "__spec__", None) is not None:
        return []
    name = os.path.basename(path)[:-len(".py")]
    return [name] if name.isidentifier() else []


def end_with_process(pid: int, worker_id: int) -> None:
    """The loaders' worker_init_fn: end this worker when process `pid` (the trainer or evaluation that made the
    loader) ends. A worker is a child of the forkserver, and torch's own check watches that parent, which waits for
    its workers: after a kill -9 of the trainer the workers, the forkserver and the resource tracker lived on
    without it. A worker that ends lets the forkserver and the resource tracker end too."""
    def watch():
        try:
            handle = os.pidfd_open(pid)  # readable once the process has ended
        except ProcessLookupError:  # already gone
            os._exit(0)
        except (AttributeError, OSError):  # no pidfd (not Linux, or a kernel before 5.3): look every second
            while _process_exists(pid):
                time.sleep(1.0)
            os._exit(0)
        select.select([handle], [], [])
        os._exit(0)

    threading.Thread(target=watch, name=f"end-with-{pid}", daemon=True).start()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, under another user
        return True
    return True


def training_loaders(config: dict, d: Dist, start_step: int) -> tuple:
    """A trainer's data: this rank's slice of the step-indexed training order (a resumed run sees what the
    uninterrupted one would), the validation loader at the training data's resolution, and the validation split's
    path: (loader, val, val_path)."""
    loader = train_loader(split_path(config["data_dir"], config["train_split"]), config["batch_size"],
                          config["num_workers"], config["seed"], d, start_step, config["resolution"],
                          config["num_frames"])
    val_path = split_path(config["data_dir"], config["val_split"])
    val = eval_loader(val_path, config["val_batch_size"], config["num_workers"], d, loader.dataset.resolution,
                      config["val_samples"], persistent=True)
    return loader, val, val_path
