"""Synthetic data generator, LMDB storage, Dataset/DataLoader behaviour and bad-database errors."""

import hashlib
import json
import os
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

import data
import prepare_data
from data import OCLDataset, StepSampler, decode_record, encode_record, load_split
from errors import UserError
from helpers import ROOT, boxes_by_loop, check_statistics, hold_flock


# ------------------------------------------------------------------------------------------------ generator

def test_generator_is_deterministic_and_seed_dependent():
    a = prepare_data.generate_image(3, "train", 7, 2, 6)
    b = prepare_data.generate_image(3, "train", 7, 2, 6)
    c = prepare_data.generate_image(4, "train", 7, 2, 6)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])
    v1 = prepare_data.generate_video(0, "val", 1, 2, 4, 8)
    v2 = prepare_data.generate_video(0, "val", 1, 2, 4, 8)
    np.testing.assert_array_equal(v1["video"], v2["video"])
    np.testing.assert_array_equal(v1["segment"], v2["segment"])


def test_output_does_not_depend_on_worker_count(tmp_path):
    counts = {"train": 10, "val": 3}
    one = prepare_data.write_synthetic("shapes", str(tmp_path / "one"), counts, 1, 2, 5, 0, workers=1, progress=False)
    two = prepare_data.write_synthetic("shapes", str(tmp_path / "two"), counts, 1, 2, 5, 0, workers=2, progress=False)
    for split in counts:
        a, b = load_split(one[split]), load_split(two[split])
        assert len(a) == len(b) == counts[split]
        for i in range(len(a)):
            for key in ("image", "segment", "bbox"):
                np.testing.assert_array_equal(a[i][key], b[i][key])


def test_object_sizes_span_more_than_20x_and_every_object_is_visible():
    areas = []
    for index in range(300):
        sample = prepare_data.generate_image(0, "train", index, 2, 6)
        ids, counts = np.unique(sample["segment"], return_counts=True)
        objects = counts[ids > 0]
        assert len(objects) >= 1
        assert objects.min() >= prepare_data.MIN_VISIBLE_PIXELS
        areas.extend(objects.tolist())
    p5, p95 = np.percentile(areas, [5, 95])
    assert p95 / p5 > 20, (p5, p95)
    assert p95 > 0.05 * 128 * 128  # large objects really are large (> 5% of the image)
    assert p5 < 60  # and small ones are a few pixels across


def test_easy_style_draws_larger_flat_objects_on_flat_backgrounds():
    noise = 0.015 * 255  # the generator's sensor noise (std, in grey levels)
    areas = {"easy": [], "multiscale": []}
    for index in range(40):
        for style in areas:
            sample = prepare_data.generate_image(0, "train", index, 2, 5, prepare_data.STYLES[style])
            ids, counts = np.unique(sample["segment"], return_counts=True)
            areas[style].extend(counts[ids > 0].tolist())
            if style == "easy":  # every region, objects and background, is one colour up to the noise
                image = sample["image"].astype(float)
                for i in ids:
                    assert image[sample["segment"] == i].std(0).max() < 3 * noise, (index, i)
    # the smallest tenth is what changes most (radius 8 against 3 at the low end)
    assert np.percentile(areas["easy"], 10) > 3 * np.percentile(areas["multiscale"], 10)
    assert np.median(areas["easy"]) > 2 * np.median(areas["multiscale"])
    assert min(areas["easy"]) >= prepare_data.MIN_VISIBLE_PIXELS


def test_video_objects_move_and_change_scale():
    sample = prepare_data.generate_video(0, "train", 0, 3, 3, 24)
    assert sample["video"].shape == (24, 128, 128, 3) and sample["segment"].shape == (24, 128, 128)
    first, last = sample["segment"][0], sample["segment"][-1]
    assert not np.array_equal(first, last)
    for k in range(1, 4):  # every object is visible in the first frame so its box can seed a slot
        assert (first == k).sum() >= prepare_data.MIN_VISIBLE_PIXELS


def test_boxes_match_a_naive_search():
    sample = prepare_data.generate_video(2, "train", 5, 2, 5, 10)
    for t in range(10):
        np.testing.assert_allclose(sample["bbox"][t], boxes_by_loop(sample["segment"][t], 5))
    image = prepare_data.generate_image(2, "val", 3, 2, 6)
    np.testing.assert_allclose(image["bbox"], boxes_by_loop(image["segment"], 6))


@pytest.mark.parametrize("name, frames", [("shapes", None), ("shapes_video", 3)])
def test_prepare_data_writes_a_preview_and_a_summary_that_a_count_of_the_split_confirms(tmp_path, capsys, name,
                                                                                        frames):
    out = tmp_path / name
    prepare_data.main([name, "--out", str(out), "--num_train", "5", "--num_val", "3", "--workers", "1"]
                      + (["--frames", str(frames)] if frames else []))
    printed = capsys.readouterr().out
    with Image.open(out / "preview.png") as preview:  # 3 labelled rows of up to 8 samples, 128 px each
        assert preview.width > 5 * 128 and preview.height > 3 * 128
    for split, count in (("train", 5), ("val", 3)):
        stored = load_split(str(out / f"{split}.lmdb"))
        oracle = check_statistics(stored)
        assert len(stored) == count and len(oracle["objects"]) == count * (frames or 1)  # videos: every frame
        assert stored.meta["statistics"]["resolution"] == [128, 128]
        line = next(ln for ln in printed.splitlines() if ln.startswith(f"{name}/{split}: "))
        assert f"{np.mean(oracle['background']):.1f} % of the pixels" in line
        assert f"objects per image {min(oracle['objects'])} / {np.mean(oracle['objects']):.2f} / " in line
    assert f"wrote {out / 'preview.png'}" in printed


# ------------------------------------------------------------------------------------------------ storage

def test_record_round_trip_without_pickle():
    rng = np.random.default_rng(0)
    arrays = {"a": rng.integers(0, 255, (4, 5, 3), dtype=np.uint8), "b": rng.random((2, 3)).astype(np.float32),
              "c": np.arange(6, dtype=np.int64).reshape(3, 2), "empty": np.zeros((0, 4), np.float32),
              "flag": np.array([True, False])}
    decoded = decode_record(encode_record(arrays))
    assert list(decoded) == list(arrays)
    for key in arrays:
        assert decoded[key].dtype == arrays[key].dtype
        np.testing.assert_array_equal(decoded[key], arrays[key])
    with pytest.raises(ValueError):
        encode_record({"o": np.array([object()], dtype=object)})


def test_cli_writes_splits_load_split_reads_them(tmp_path):
    out = tmp_path / "shapes"
    result = subprocess.run([sys.executable, "prepare_data.py", "shapes", "--out", str(out), "--num_train", "12",
                             "--num_val", "4", "--seed", "0", "--workers", "1"], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, CI="true"))
    assert result.returncode == 0, result.stderr
    assert str(out / "train.lmdb") in result.stdout
    train = load_split(str(out / "train.lmdb"))
    assert len(train) == 12 and len(load_split(str(out / "val.lmdb"))) == 4
    sample = train[0]
    assert sample["image"].shape == (128, 128, 3) and sample["image"].dtype == np.uint8
    assert sample["segment"].shape == (128, 128) and sample["segment"].dtype == np.uint8
    assert sample["bbox"].shape == (6, 4) and sample["bbox"].dtype == np.float32
    for key in ("dataset", "count", "size", "frames", "max_objects", "format_version"):
        assert key in train.meta
    assert train.meta["count"] == 12 and train.meta["size"] == [128, 128] and train.meta["frames"] is None
    assert not any(name.endswith((".partial", "-lock")) for name in os.listdir(out))


# ------------------------------------------------------------------------------------------------ dataset

def test_image_dataset_tensors(shapes_dir):
    dataset = OCLDataset(os.path.join(shapes_dir, "train.lmdb"), train=True)
    raw = load_split(os.path.join(shapes_dir, "train.lmdb"))[3]
    sample = dataset[3]
    assert sample["image"].shape == (3, 128, 128) and sample["image"].dtype == torch.float32
    expected = (torch.from_numpy(raw["image"].astype(np.float32)).permute(2, 0, 1) - 127.5) / 127.5
    torch.testing.assert_close(sample["image"], expected)
    assert sample["image"].min() >= -1 and sample["image"].max() <= 1
    assert sample["segment"].dtype == torch.uint8 and sample["segment"].shape == (128, 128)
    assert sample["bbox"].shape == (4, 4)


def test_dataloader_with_worker_processes(shapes_dir):
    dataset = OCLDataset(os.path.join(shapes_dir, "val.lmdb"), train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    batches = list(loader)
    assert len(batches) == 4
    assert batches[0]["image"].shape == (4, 3, 128, 128) and batches[0]["segment"].shape == (4, 128, 128)
    direct = torch.stack([dataset[i]["image"] for i in range(4)])
    torch.testing.assert_close(batches[0]["image"], direct)


def test_video_windows(video_dir):
    path = os.path.join(video_dir, "train.lmdb")
    raw = load_split(path)[1]["video"]
    train = OCLDataset(path, train=True, num_frames=4)
    starts = set()
    for draw in range(30):
        clip = train[(1, draw)]
        assert clip["video"].shape == (4, 3, 128, 128) and clip["segment"].shape == (4, 128, 128)
        assert clip["bbox"].shape == (4, 3, 4)
        frames = ((clip["video"] * 127.5 + 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)).numpy()
        matches = [s for s in range(0, 12, 4) if np.array_equal(frames, raw[s:s + 4])]
        assert len(matches) == 1  # one of the non-overlapping windows
        starts.add(matches[0])
        torch.testing.assert_close(train[(1, draw)]["video"], clip["video"])  # the draw decides the window
    assert starts == {0, 4, 8}
    full = OCLDataset(path, train=False)[1]
    assert full["video"].shape == (12, 3, 128, 128) and full["bbox"].shape == (12, 3, 4)


def test_resolution_resizes_images_and_masks(shapes_dir):
    dataset = OCLDataset(os.path.join(shapes_dir, "val.lmdb"), train=False, resolution=64)
    sample = dataset[0]
    assert sample["image"].shape == (3, 64, 64) and sample["segment"].shape == (64, 64)
    raw = load_split(os.path.join(shapes_dir, "val.lmdb"))[0]["segment"]
    assert set(np.unique(sample["segment"].numpy())) <= set(np.unique(raw))  # nearest: no new ids


def test_step_sampler_splits_global_batches_and_resumes():
    def take(sampler, n):
        iterator = iter(sampler)
        return [next(iterator) for _ in range(n)]

    single = take(StepSampler(10, 4, seed=3), 4 * 7)  # 7 steps over an epoch boundary
    rank0 = take(StepSampler(10, 4, seed=3, rank=0, world_size=2), 2 * 7)
    rank1 = take(StepSampler(10, 4, seed=3, rank=1, world_size=2), 2 * 7)
    for step in range(7):
        assert single[4 * step:4 * step + 4] == rank0[2 * step:2 * step + 2] + rank1[2 * step:2 * step + 2]
    assert sorted(i for i, _ in single[:10]) == list(range(10))  # an epoch is a permutation
    assert take(StepSampler(10, 4, seed=3, start_step=5), 8) == single[20:28]


# ------------------------------------------------------------------------------------------------ bad databases

def test_missing_database_names_path_and_command(tmp_path):
    path = str(tmp_path / "shapes" / "train.lmdb")
    with pytest.raises(UserError, match="does not exist.*prepare_data.py shapes"):
        load_split(path)


def test_half_written_database_is_refused(tmp_path):
    directory = tmp_path / "shapes"
    writer = data.SplitWriter(str(directory / "train.lmdb"))
    writer.add({"image": np.zeros((2, 2, 3), np.uint8)})
    writer.txn.commit()
    writer.env.close()  # a crash before close(): only the .partial file exists
    with pytest.raises(UserError, match="never finished"):
        load_split(str(directory / "train.lmdb"))
    os.replace(str(directory / "train.lmdb.partial"), str(directory / "train.lmdb"))  # renamed by hand
    with pytest.raises(UserError, match="no metadata record"):
        load_split(str(directory / "train.lmdb"))


def test_corrupt_and_foreign_databases_are_refused(tmp_path, shapes_dir):
    garbage = tmp_path / "shapes" / "train.lmdb"
    garbage.parent.mkdir()
    garbage.write_bytes(os.urandom(10000))
    with pytest.raises(UserError, match="not a readable LMDB"):
        load_split(str(garbage))

    truncated = tmp_path / "cut.lmdb"
    with open(os.path.join(shapes_dir, "val.lmdb"), "rb") as f:
        stored = f.read()
    truncated.write_bytes(stored[: len(stored) // 3])
    with pytest.raises(UserError):
        split = load_split(str(truncated))
        for i in range(len(split)):
            split[i]

    old = tmp_path / "old.lmdb"
    env = lmdb.open(str(old), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"__meta__", json.dumps({"format": "msf-lmdb", "format_version": 0, "count": 0}).encode())
    env.close()
    with pytest.raises(UserError, match="version 0"):
        load_split(str(old))


def test_record_damage_is_reported_with_the_index(tmp_path):
    path = tmp_path / "d.lmdb"
    env = lmdb.open(str(path), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"00000000", b"\x05\x00\x00\x00{bad}")
        txn.put(b"__meta__", json.dumps({"format": "msf-lmdb", "format_version": 1, "count": 2, "size": [2, 2],
                                         "max_objects": 1}).encode())
    env.close()
    split = load_split(str(path))
    with pytest.raises(UserError, match="sample 0 is corrupt"):
        split[0]
    with pytest.raises(UserError, match="missing sample 1"):
        split[1]


def test_replacing_a_split_never_leaves_it_missing(tmp_path, monkeypatch):
    path = str(tmp_path / "shapes" / "val.lmdb")
    for value in (1, 2):
        seen = []
        real_replace = os.replace

        def replace(source, target):
            seen.append(os.path.exists(target))  # the old split is still there when the new one takes its name
            real_replace(source, target)

        monkeypatch.setattr(data.os, "replace", replace)
        writer = data.SplitWriter(path)
        writer.add({"image": np.full((2, 2, 3), value, np.uint8)})
        writer.close({"kind": "image"})
        monkeypatch.undo()
        assert seen == [value == 2]
    assert load_split(path)[0]["image"][0, 0, 0] == 2


def test_a_partial_next_to_a_finished_split_is_refused(tmp_path):
    directory = tmp_path / "shapes"
    for split in ("train", "val"):
        writer = data.SplitWriter(str(directory / f"{split}.lmdb"))
        writer.add({"image": np.zeros((2, 2, 3), np.uint8)})
        writer.close({"kind": "image"})
    (directory / "val.lmdb.partial").write_bytes(b"an interrupted regeneration")
    with pytest.raises(UserError, match=r"val.lmdb.partial lies next to .*interrupted.*regenerate it with "
                                        r"`python prepare_data.py shapes --out"):
        load_split(str(directory / "val.lmdb"))
    assert len(load_split(str(directory / "train.lmdb"))) == 1


def test_a_missing_test_split_hint_does_not_overwrite_train_and_val(tmp_path):
    with pytest.raises(UserError) as caught:
        load_split(str(tmp_path / "clevrtex" / "test.lmdb"))
    message = str(caught.value)
    assert "--split test --out NEW_DIR" in message and "rewrites train/val too" in message
    assert f"--out {tmp_path / 'clevrtex'}" not in message


def test_a_missing_test_split_of_synthetic_data_advises_what_synthetic_data_has(tmp_path, shapes_dir):
    with pytest.raises(UserError) as caught:
        load_split(os.path.join(shapes_dir, "test.lmdb"))
    message = str(caught.value)
    assert "synthetic data (shapes) has only train and val splits; evaluate --split val" in message
    assert "--split test" not in message and "python prepare_data.py shapes --seed 1 --out NEW_DIR" in message


def test_an_empty_out_is_refused_instead_of_meaning_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("", " "):
        with pytest.raises(UserError, match=r"--out is empty; give the directory to write the dataset to \(without "
                                            r"--out: data/shapes\)"):
            prepare_data.main(["shapes", "--out", out, "--num_train", "2", "--num_val", "1", "--workers", "1"])
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------------------------ regeneration

def make_shapes(out, seed, **kwargs):
    prepare_data.write_synthetic("shapes", str(out), {"train": 8, "val": 4}, seed=seed, min_objects=2,
                                 max_objects=3, frames=0, workers=1, progress=False, **kwargs)


def directory_bytes(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_an_interrupted_regeneration_leaves_the_old_dataset_whole(tmp_path, monkeypatch):
    out = tmp_path / "shapes"
    make_shapes(out, seed=0)
    before = directory_bytes(out)
    real_chunk = prepare_data._generate_chunk

    def interrupted_in_val(job):
        if job[2] == "val":  # train is written in full by now
            raise KeyboardInterrupt
        return real_chunk(job)

    monkeypatch.setattr(prepare_data, "_generate_chunk", interrupted_in_val)
    with pytest.raises(KeyboardInterrupt):
        make_shapes(out, seed=5)
    assert directory_bytes(out) == before  # no new train beside the old val, no partial or lock files
    assert len(load_split(str(out / "train.lmdb"))) == 8


class FullDiskAt:
    """lmdb.open whose environment for a file ending in `suffix` fails its flush as a full disk does."""

    def __init__(self, suffix):
        self.suffix, self.real = suffix, lmdb.open

    def __call__(self, path, **kwargs):
        env = self.real(path, **kwargs)
        return self.Env(env) if path.endswith(self.suffix) else env

    class Env:
        def __init__(self, env):
            self.env = env

        def __getattr__(self, name):
            return getattr(self.env, name)

        def sync(self, force=False):
            raise lmdb.Error(f"{self.env.path()}: No space left on device")


def test_a_full_disk_or_a_read_only_target_ends_in_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "shapes"
    make_shapes(out, seed=0)
    before = directory_bytes(out)
    monkeypatch.setattr(data.lmdb, "open", FullDiskAt("val.lmdb.partial"))
    with pytest.raises(UserError, match=r"could not write .*val.lmdb.partial \(No space left on device\); the "
                                        r"dataset there is unchanged"):
        prepare_data.main(["shapes", "--out", str(out), "--num_train", "8", "--num_val", "4", "--seed", "5",
                           "--workers", "1"])
    assert directory_bytes(out) == before
    monkeypatch.undo()

    def read_only(path, **kwargs):  # root ignores a directory's mode bits, so the refusal is simulated
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(data.lmdb, "open", read_only)
    with pytest.raises(UserError, match=r"could not write .*train.lmdb.partial \(Permission denied\)"):
        make_shapes(out, seed=5)
    assert directory_bytes(out) == before
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"file is a file, not a directory; choose another --out"):
        make_shapes(tmp_path / "file", seed=0)
    with pytest.raises(UserError, match=r"--frames must be at least 1, got 0"):
        prepare_data.main(["shapes_video", "--out", str(tmp_path / "v"), "--frames", "0", "--workers", "1"])


def test_damaged_record_bytes_are_caught_by_their_checksum(tmp_path):
    out = tmp_path / "shapes"
    make_shapes(out, seed=0)
    path = out / "val.lmdb"
    stored = bytearray(path.read_bytes())
    with lmdb.open(str(path), subdir=False, readonly=True, lock=False) as env, env.begin() as txn:
        record = bytes(txn.get(b"00000002"))
    start = stored.find(record[-5000:])  # inside the image bytes, which LMDB stores verbatim
    assert start > 0
    stored[start + 100] ^= 0xFF
    path.write_bytes(bytes(stored))
    split = load_split(str(path))
    split[1]
    with pytest.raises(UserError, match=r"val.lmdb sample 2 is corrupt \(its bytes do not match the checksum"):
        split[2]


def test_a_split_fingerprint_identifies_its_records(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        make_shapes(tmp_path / name, seed=seed)
    digest = hashlib.sha256()  # oracle: the hash of every record's key and bytes, in order
    with lmdb.open(str(tmp_path / "a" / "train.lmdb"), subdir=False, readonly=True, lock=False) as env:
        with env.begin() as txn:
            for key, value in txn.cursor():
                if key != b"__meta__":
                    digest.update(key + value)
    fingerprint = {name: load_split(str(tmp_path / name / "train.lmdb")).meta["fingerprint"] for name in "abc"}
    assert fingerprint["a"] == digest.hexdigest()[:16]
    assert fingerprint["a"] == fingerprint["b"] != fingerprint["c"]


def test_a_page_damaged_under_a_reader_and_grayscale_records_are_one_sentence(tmp_path):
    out = tmp_path / "shapes"
    make_shapes(out, seed=0)
    split = load_split(str(out / "val.lmdb"))
    with open(out / "val.lmdb", "r+b") as f:  # damaged while a run reads the split
        f.seek(2 * 4096 + 10)
        assert f.read(2) == b"\x02\x00"  # P_LEAF: a small split's one leaf page follows the two meta pages
        f.seek(2 * 4096 + 10)
        f.write(b"\xff\x00")
    with pytest.raises(UserError, match=r"val.lmdb cannot be read at sample 3 \(CorruptedError: .*\); the file is "
                                        r"corrupt, recreate it"):
        split[3]
    writer = data.SplitWriter(str(tmp_path / "gray" / "train.lmdb"))
    writer.add({"image": np.zeros((8, 8), np.uint8), "segment": np.zeros((8, 8), np.uint8)})
    writer.close({"size": [8, 8], "max_objects": 2, "frames": None})
    with pytest.raises(UserError, match=r"sample 0 holds image \(8, 8\) and segment \(8, 8\), not RGB \(H,W,3\)"):
        OCLDataset(str(tmp_path / "gray" / "train.lmdb"), train=False)[0]


def test_a_split_regenerated_while_it_is_read_is_refused(tmp_path):
    out = tmp_path / "shapes"
    make_shapes(out, seed=0)
    dataset = OCLDataset(str(out / "train.lmdb"), train=True)
    first = dataset[0]["image"]
    make_shapes(out, seed=0)  # the same records again: reading goes on
    assert torch.equal(dataset[0]["image"], first)
    make_shapes(out, seed=5)
    with pytest.raises(UserError, match=r"train.lmdb was replaced by other data while this process read it"):
        dataset[1]


def test_a_second_generation_into_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "shapes"
    out.mkdir()
    with hold_flock(out / ".prepare.lock"):
        (out / "train.lmdb.partial").write_bytes(b"the other generation's split")
        with pytest.raises(UserError, match=r"another prepare_data.py is writing .*shapes .*; wait for it"):
            make_shapes(out, seed=0)
        assert (out / "train.lmdb.partial").read_bytes() == b"the other generation's split"
    os.remove(out / "train.lmdb.partial")
    make_shapes(out, seed=0)
    assert sorted(os.listdir(out)) == ["preview.png", "train.lmdb", "val.lmdb"]
