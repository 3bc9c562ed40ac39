"""Real-dataset converters on tiny fixtures in the official on-disk formats (tests/fixtures_raw.py).

Expected outputs come from each fixture's own drawing: masks through an independent nearest-exact index formula,
images through Pillow's bilinear resize, boxes through an explicit search, MOVi records through the protobuf library
and the `crc32c` package rather than the converter's own decoder and CRC.
"""

import os
import shutil
import subprocess
import sys

import crc32c
import numpy as np
import pytest
from PIL import Image

import fixtures_raw
import prepare_data
import tfrecord_reader
from errors import UserError
from helpers import ROOT, boxes_by_loop, check_statistics
from prepare_data import load_split


# ------------------------------------------------------------------------------------------------ oracles

def crop_window(height, width, crop_fraction=1.0):
    side = int(round(crop_fraction * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side


def crop_nearest(array, size=128):
    """Centre square crop, then nearest-exact: output pixel i reads source pixel floor((i + 0.5) * side / size)."""
    top, left, side = crop_window(*array.shape[-2:])
    source = np.minimum(np.floor((np.arange(size) + 0.5) * side / size).astype(int), side - 1)
    return array[..., top + source[:, None], left + source[None, :]]


def crop_bilinear(rgb, size=128):
    """Centre square crop, then Pillow's (antialiased when shrinking) bilinear resize."""
    top, left, side = crop_window(*rgb.shape[:2])
    return np.array(Image.fromarray(rgb[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR))


def renumber(labels, ignore=255):
    """Object labels present (all but 0 and `ignore`) -> 1..n in increasing order; ignore -> 255."""
    out = np.zeros(labels.shape, np.uint8)
    objects = [v for v in np.unique(labels) if v not in (0, ignore)]
    for number, value in enumerate(objects, start=1):
        out[labels == value] = number
    out[labels == ignore] = 255
    return out


def assert_image_close(converted, source_rgb):
    assert converted.shape == (128, 128, 3) and converted.dtype == np.uint8
    assert np.abs(converted.astype(int) - crop_bilinear(source_rgb)).max() <= 1


def convert(name, root, out, *flags, workers=1):
    prepare_data.main([name, "--root", str(root), "--out", str(out), "--workers", str(workers), *flags])
    return {entry[:-len(".lmdb")]: load_split(str(out / entry)) for entry in sorted(os.listdir(out))
            if entry.endswith(".lmdb")}


def check_meta(split, dataset, name, frames, max_objects):
    meta = split.meta
    assert meta["dataset"] == dataset and meta["split"] == name and meta["size"] == [128, 128]
    assert meta["frames"] == frames and meta["max_objects"] == max_objects and meta["ignore_label"] == 255
    assert meta["count"] == len(split) == meta["summary"]["kept"]
    assert set(meta["summary"]["filtered"]) == {"too_many_objects", "small_object"}


# ------------------------------------------------------------------------------------------------ TFRecord reading

def test_crc32c_numpy_matches_the_crc32c_package():
    rng = np.random.default_rng(0)
    chunk = tfrecord_reader._CRC32C_CHUNK
    for length in (0, 1, 7, 8, chunk - 1, chunk, chunk + 1, 3 * chunk, 5 * chunk + 1234, 300_001):
        data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        assert tfrecord_reader.crc32c_numpy(data) == crc32c.crc32c(data), length
        assert tfrecord_reader.crc32c_numpy(memoryview(data)[1:]) == crc32c.crc32c(data[1:]), length
    assert tfrecord_reader.crc32c_numpy(b"123456789") == 0xE3069283  # the CRC-32C check value


@pytest.mark.parametrize("packed", [True, False])
def test_example_decoder_matches_protobuf(packed):
    features = {"bytes": [b"", b"png\x00\x00", bytes(range(256))], "one_bytes": [b"x"],
                "floats": np.array([0.5, -1e30, np.inf, 3.1415927], np.float32),
                "ints": np.array([0, 1, -1, 300, 2 ** 63 - 1, -2 ** 63, -123456789012], np.int64),
                "empty_floats": np.zeros(0, np.float32), "instances/bboxes/ragged_row_lengths_0": np.array([3, 0, 2])}
    data = fixtures_raw.make_example(features, packed=packed)
    reference = fixtures_raw.example_class(packed)()
    reference.ParseFromString(data)
    decoded = tfrecord_reader.decode_example(data)
    assert set(decoded) == set(reference.features.feature) == set(features)
    for key, feature in reference.features.feature.items():
        values = list(getattr(feature, feature.WhichOneof("kind")).value)
        if feature.WhichOneof("kind") == "bytes_list":
            assert decoded[key] == values  # a list even for one element
        else:
            assert decoded[key].dtype == (np.float32 if feature.WhichOneof("kind") == "float_list" else np.int64)
            np.testing.assert_array_equal(decoded[key], np.array(values, decoded[key].dtype))
    assert decoded["ints"].tolist() == features["ints"].tolist()
    assert list(tfrecord_reader.decode_example(data, keys={"ints"})) == ["ints"]

    message = fixtures_raw.example_class(packed)()
    message.features.feature["no_kind"].SetInParent()
    assert tfrecord_reader.decode_example(message.SerializeToString()) == {"no_kind": []}
    with pytest.raises(tfrecord_reader.BadRecord, match="malformed"):
        tfrecord_reader.decode_example(data[:-3])


def test_tfrecord_framing_crc_and_truncation(tmp_path):
    payloads = [b"first", bytes(range(256)) * 40, b""]
    path = tmp_path / "shard.tfrecord-00000-of-00001"
    fixtures_raw.write_tfrecord(path, payloads)
    records, problem = tfrecord_reader.index_tfrecord(str(path))
    assert problem is None and [length for _, length in records] == [len(p) for p in payloads]
    for (offset, length), payload in zip(records, payloads):
        assert bytes(tfrecord_reader.read_tfrecord_record(str(path), offset, length)) == payload
    data = path.read_bytes()

    path.write_bytes(data[:-3])  # the last record's data CRC is cut
    assert tfrecord_reader.index_tfrecord(str(path))[1].startswith("truncated")
    path.write_bytes(data[:records[1][0] + 100])  # cut inside the second record
    records_cut, problem = tfrecord_reader.index_tfrecord(str(path))
    assert len(records_cut) == 1 and "truncated: record 1" in problem
    path.write_bytes(data[:records[1][0] - 5])  # cut inside the second header
    assert "truncated" in tfrecord_reader.index_tfrecord(str(path))[1]
    damaged = bytearray(data)
    damaged[records[1][0] - 12] ^= 0x01  # the second record's length
    path.write_bytes(bytes(damaged))
    assert "corrupt length of record 1" in tfrecord_reader.index_tfrecord(str(path))[1]
    damaged = bytearray(data)
    damaged[records[1][0] + 77] ^= 0x10  # one bit of the second record's data
    path.write_bytes(bytes(damaged))
    with pytest.raises(tfrecord_reader.BadRecord, match="CRC"):
        tfrecord_reader.read_tfrecord_record(str(path), *records[1])


# ------------------------------------------------------------------------------------------------ ClevrTex

CLEVRTEX_SCENES = {
    3: [(60, 30, 120, 90), (150, 100, 200, 160)],
    4999: [(100, 100, 160, 150)],
    5000: [(50, 20, 100, 80), (200, 50, 260, 120), (10, 10, 35, 50)],  # the third lies left of the 240x240 crop
    9999: [(50 + 45 * i, 40 + 80 * j, 80 + 45 * i, 70 + 80 * j) for j in range(2) for i in range(5)],  # 10 objects
    10000: [(20, 60, 70, 110), (60, 80, 140, 200), (100, 90, 130, 120), (270, 0, 320, 240)],  # cut, overlapping
    10001: [(100, 100, 150, 150)],
    49999: [(41, 1, 43, 3), (150, 150, 240, 239), (279, 200, 300, 210)],  # a 2x2 object, crop edges
}


@pytest.fixture(scope="module")
def clevrtex_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "clevrtex"
    truth = fixtures_raw.write_clevrtex(root, "full", CLEVRTEX_SCENES)
    truth_outd = fixtures_raw.write_clevrtex(root, "outd", {0: [(100, 50, 200, 150)], 1: [(40, 0, 280, 240)]})
    (root / "clevrtex_full" / "10" / "CLEVRTEX_full_010001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    return root, truth, truth_outd


def test_clevrtex_splits_masks_boxes_and_images(clevrtex_raw, tmp_path, capsys):
    root, truth, _ = clevrtex_raw
    splits = convert("clevrtex", root, tmp_path / "out", "--split", "test")
    expected_indices = {"train": [10000, 49999], "val": [5000, 9999], "test": [3, 4999]}  # 10001 is unreadable
    assert set(splits) == set(expected_indices)
    for name, indices in expected_indices.items():
        split = splits[name]
        check_meta(split, "clevrtex", name, None, 10)
        assert len(split) == len(indices)
        for i, index in enumerate(indices):
            sample = split[i]
            expected = crop_nearest(truth[index]["mask"])
            np.testing.assert_array_equal(sample["segment"], expected)
            np.testing.assert_array_equal(sample["bbox"], boxes_by_loop(expected, 10))
            assert_image_close(sample["image"], truth[index]["image"])
    # scene 5000: object 3 lies outside the crop, so its id is absent and its box is zero; ids are not renumbered
    val0 = splits["val"][0]
    assert set(np.unique(val0["segment"])) == {0, 1, 2} and not val0["bbox"][2].any()
    # object 1 of scene 5000 spans x 50..99, y 20..79; output column c reads x = 40 + floor((c + 0.5) * 1.875) and
    # row r reads y = floor((r + 0.5) * 1.875), so it covers columns 5..31 and rows 11..42
    np.testing.assert_allclose(val0["bbox"][0] * 128, [5, 11, 32, 43])
    assert set(np.unique(splits["val"][1]["segment"])) == set(range(11))  # ten objects, ids 1..10
    summary = splits["train"].meta["summary"]
    assert summary["skipped_count"] == 1 and "CLEVRTEX_full_010001.png" in summary["skipped"][0]
    assert summary["object_histogram"] == {"3": 1, "4": 1}
    assert "skipped CLEVRTEX_full_010001.png" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith((".partial", "-lock"))]


def test_clevrtex_variant_and_worker_count(clevrtex_raw, tmp_path):
    root, truth, truth_outd = clevrtex_raw
    outd = convert("clevrtex", root / "clevrtex_outd", tmp_path / "outd", "--variant", "outd")
    assert list(outd) == ["outd"] and len(outd["outd"]) == 2
    check_meta(outd["outd"], "clevrtex", "outd", None, 10)
    np.testing.assert_array_equal(outd["outd"][1]["segment"], crop_nearest(truth_outd[1]["mask"]))
    one = convert("clevrtex", root, tmp_path / "one", workers=1)
    two = convert("clevrtex", root, tmp_path / "two", workers=2)
    for name in ("train", "val"):
        for i in range(len(one[name])):
            for key in ("image", "segment", "bbox"):
                np.testing.assert_array_equal(one[name][i][key], two[name][i][key])


def test_nothing_readable_stops_and_leaves_no_partial_split(clevrtex_raw, tmp_path):
    root, _, _ = clevrtex_raw
    broken = tmp_path / "broken"
    shutil.copytree(root / "clevrtex_outd", broken / "clevrtex_outd")
    for path in (broken / "clevrtex_outd" / "0").glob("*_flat.png"):
        path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UserError, match="none of the 2 outd inputs of clevrtex.*could be read"):
        convert("clevrtex", broken, tmp_path / "out", "--variant", "outd")
    assert not os.path.exists(tmp_path / "out" / "outd.lmdb")
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".partial")]


# ------------------------------------------------------------------------------------------------ COCO

PERSON, CAR, DOG, ROAD, TREE = 1, 3, 18, 149, 184


def _thing(rect, category=PERSON, crowd=0):
    return {"rect": rect, "category_id": category, "iscrowd": crowd}


COCO_SPECS = {
    "train2017": [
        {"id": 1, "size": (160, 120), "segments": [
            _thing((0, 0, 160, 120), ROAD), _thing((0, 0, 15, 40), DOG),  # the dog lies left of the 120x120 crop
            _thing((30, 20, 70, 90)), _thing((80, 30, 140, 100), CAR), _thing((40, 95, 90, 115), crowd=1),
            _thing((120, 100, 160, 120), TREE)], "void": [(60, 0, 100, 10)]},
        {"id": 2, "size": (160, 120), "gray": True, "segments": [
            _thing((0, 0, 160, 120), TREE), _thing((25, 10, 60, 50), DOG), _thing((70, 60, 130, 110), CAR)]},
        {"id": 3, "size": (160, 120), "segments": [_thing((0, 0, 160, 120), ROAD)] + [
            _thing((25 + 25 * (k % 4), 5 + 40 * (k // 4), 45 + 25 * (k % 4), 30 + 40 * (k // 4))) for k in range(11)]},
        {"id": 4, "size": (160, 120), "segments": [_thing((30, 30, 90, 90)), _thing((100, 50, 102, 52), CAR)]},
        {"id": 5, "size": (160, 120), "segments": [_thing((30, 30, 90, 90))]},  # its PNG goes missing
        {"id": 6, "size": (120, 160), "segments": [_thing((10, 10, 110, 60), CAR), _thing((10, 70, 50, 150))]},
    ],
    "val2017": [
        {"id": 7, "size": (160, 120), "segments": [_thing((30, 30, 90, 90), DOG), _thing((95, 5, 135, 60))]},
        {"id": 8, "size": (160, 120), "segments": [_thing((30, 30, 90, 90))]},  # its JPEG is truncated
        {"id": 9, "size": (160, 120), "segments": [_thing((0, 0, 160, 120), TREE)] + [
            _thing((25 + 20 * (k % 5), 10 + 50 * (k // 5), 40 + 20 * (k % 5), 50 + 50 * (k // 5))) for k in range(10)]},
    ],
}


@pytest.fixture(scope="module")
def coco_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "coco"
    truth = fixtures_raw.write_coco(root, COCO_SPECS)
    os.remove(root / "annotations" / "panoptic_train2017" / "000000000005.png")
    jpeg = root / "val2017" / "000000000008.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:400])
    return root, truth


def test_coco_panoptic_conversion(coco_raw, tmp_path, capsys):
    root, truth = coco_raw
    splits = convert("coco", root, tmp_path / "out")
    kept = {"train": ["000000000001", "000000000002", "000000000006"], "val": ["000000000007", "000000000009"]}
    for name, stems in kept.items():
        check_meta(splits[name], "coco", name, None, 10)
        assert len(splits[name]) == len(stems)
        for i, stem in enumerate(stems):
            sample = splits[name][i]
            expected = renumber(crop_nearest(truth[stem]["labels"]))
            np.testing.assert_array_equal(sample["segment"], expected)
            np.testing.assert_array_equal(sample["bbox"], boxes_by_loop(expected, 10))
            decoded = np.array(Image.open(root / f"{name}2017" / f"{stem}.jpg").convert("RGB"))
            assert_image_close(sample["image"], decoded)
    first = splits["train"][0]["segment"]
    # things in segments_info order after the dog (outside the crop) is dropped: person 1, car 2; stuff 0;
    # crowd and void 255. Source (x, y) -> output ((x - 20) * 128 / 120, y * 128 / 120).
    assert first[60, 43] == 1 and first[70, 96] == 2 and first[5, 75] == 255 and first[112, 53] == 255
    assert first[118, 120] == 0 and set(np.unique(first)) == {0, 1, 2, 255}
    gray = splits["train"][1]["image"]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    assert len(np.unique(splits["val"][1]["segment"])) == 11 and splits["val"][1]["bbox"].all(-1).all()

    train, val = splits["train"].meta["summary"], splits["val"].meta["summary"]
    assert train["kept"] == 3 and train["filtered"] == {"too_many_objects": 1, "small_object": 1}
    assert train["skipped_count"] == 1 and "000000000005.png" in train["skipped"][0]
    assert "missing file" in train["skipped"][0]
    assert train["object_histogram"] == {"2": 3}
    assert val["skipped_count"] == 1 and "000000000008.jpg" in val["skipped"][0]
    assert "skipped train2017/000000000005.png: missing file" in capsys.readouterr().out


def test_coco_filter_thresholds_are_flags(coco_raw, tmp_path):
    root, _ = coco_raw
    splits = convert("coco", root, tmp_path / "out", "--max_objects", "11", "--min_box_area", "4")
    summary = splits["train"].meta["summary"]
    assert summary["kept"] == 5 and summary["filtered"] == {"too_many_objects": 0, "small_object": 0}
    assert splits["train"].meta["max_objects"] == 11 and splits["train"][0]["bbox"].shape == (11, 4)


# ------------------------------------------------------------------------------------------------ VOC

def _objects(*rects, cls=15):
    return [{"rect": rect, "class": cls} for rect in rects]


VOC2012 = {
    "2007_000032": {"size": (150, 100), "objects": _objects((30, 20, 70, 80), cls=1) + _objects((80, 10, 120, 60))
                    + [{"rect": (90, 60, 140, 95), "class": 7, "difficult": True}]},
    "2007_000039": {"size": (150, 100), "objects": _objects(
        *[(27 + 24 * (k % 4), 5 + 32 * (k // 4), 41 + 24 * (k % 4), 19 + 32 * (k // 4)) for k in range(11)])},
    "2008_000002": {"size": (150, 100), "objects": _objects((30, 30, 90, 90), (100, 20, 106, 26))},
    "2008_000003": {"size": (150, 100), "objects": _objects((0, 10, 20, 60), (30, 10, 70, 90), (80, 40, 120, 80))},
    "2009_000001": {"size": (100, 150), "objects": _objects((10, 10, 90, 60), cls=12)},
}
VOC2007 = {"000001": {"size": (150, 100), "objects": _objects((40, 20, 100, 80), cls=8)},
           "000002": {"size": (150, 100), "objects": _objects((30, 10, 60, 40), (70, 50, 110, 90), cls=3)}}


@pytest.fixture(scope="module")
def voc_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "voc"
    lists = {"train": ["2007_000032", "2007_000039", "2008_000002"], "val": ["2008_000003", "2009_000001"]}
    lists["trainval"] = lists["train"] + lists["val"]
    truth = fixtures_raw.write_voc(root, "2012", VOC2012, lists)
    truth.update(fixtures_raw.write_voc(root, "2007", VOC2007))
    return root, truth


def test_voc_object_masks_keep_void_and_filter(voc_raw, tmp_path):
    root, truth = voc_raw
    splits = convert("voc", root, tmp_path / "out")
    kept = {"train": ["2007_000032"], "val": ["2008_000003", "2009_000001"]}
    for name, stems in kept.items():
        check_meta(splits[name], "voc", name, None, 10)
        assert len(splits[name]) == len(stems)
        for i, stem in enumerate(stems):
            sample = splits[name][i]
            expected = renumber(crop_nearest(truth[stem]["object"]))
            np.testing.assert_array_equal(sample["segment"], expected)
            np.testing.assert_array_equal(sample["bbox"], boxes_by_loop(expected, 10))
            decoded = np.array(Image.open(root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{stem}.jpg"))
            assert_image_close(sample["image"], decoded)
    first = splits["train"][0]["segment"]
    assert set(np.unique(first)) == {0, 1, 2, 255}  # the difficult object is void, the bands stay 255
    assert (first == 255).sum() > 500
    # 2008_000003: object 1 lies left of the 100x100 crop; the other two become 1 and 2
    assert set(np.unique(splits["val"][0]["segment"])) == {0, 1, 2, 255}
    summary = splits["train"].meta["summary"]
    assert summary["filtered"] == {"too_many_objects": 1, "small_object": 1} and summary["kept"] == 1
    # every converter passes through the same writer: statistics without the void (255) pixels, and a preview
    for split in splits.values():
        check_statistics(split)
    assert (tmp_path / "out" / "preview.png").is_file()


def test_voc_class_masks_and_msf_split(voc_raw, tmp_path):
    root, truth = voc_raw
    classes = convert("voc", root / "VOCdevkit", tmp_path / "class", "--voc_masks", "class")
    expected = renumber(crop_nearest(truth["2008_000003"]["class"]))
    np.testing.assert_array_equal(classes["val"][0]["segment"], expected)
    assert set(np.unique(expected)) == {0, 1, 255}  # two objects of one class are one segment
    msf = convert("voc", root / "VOCdevkit" / "VOC2012", tmp_path / "msf", "--voc_split", "msf")
    assert len(msf["train"]) == 3 and msf["train"].meta["summary"]["filtered"]["too_many_objects"] == 1
    assert len(msf["val"]) == 2
    for i, stem in enumerate(["000001", "000002"]):
        np.testing.assert_array_equal(msf["val"][i]["segment"], renumber(crop_nearest(truth[stem]["object"])))


# ------------------------------------------------------------------------------------------------ MOVi

MOVI_C_VIDEOS = [  # (x, y, w, h, vx, vy) at the 256 render
    [(10, 10, 40, 30, 2, 1), (100, 120, 20, 20, -1, 0), (201, 51, 1, 1, 0, 0), (230, 5, 30, 30, 3, 0)],
    [(-40, 100, 30, 30, 4, 0), (60, 60, 80, 80, 0, 0), (70, 70, 20, 20, 1, 1)],
    [(0, 0, 256, 40, 0, 0), (128, 128, 9, 9, -2, -2)],
    [(50, 50, 50, 50, 1, 1), (150, 30, 60, 20, 0, 3), (20, 200, 10, 10, 0, 0)],
    [(30, 30, 100, 100, 0, 0)],
]


def dense_ltrb(boxes, frames=24, slots=10):
    """The expected (T, K, 4) ltrb boxes from the fixture's per-instance {frame: [ymin, xmin, ymax, xmax]}."""
    dense = np.zeros((frames, slots, 4), np.float32)
    for i, per_frame in enumerate(boxes[:slots]):
        for t, (ymin, xmin, ymax, xmax) in per_frame.items():
            dense[t, i] = [xmin, ymin, xmax, ymax]
    return dense


@pytest.fixture(scope="module")
def movi_c_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "movi"
    videos = [fixtures_raw.subsample_128(fixtures_raw.movi_video(i, rects)) for i, rects in enumerate(MOVI_C_VIDEOS)]
    payloads = [fixtures_raw.movi_example(video, "movi_c", i, flows=i in (0, 3)) for i, video in enumerate(videos)]
    fixtures_raw.write_movi(root / "movi_c" / "128x128" / "1.0.0", "movi_c",
                            {"train": [payloads[:2], payloads[2:3]], "validation": [payloads[3:4]],
                             "test": [payloads[4:]]})
    return root, videos


def test_movi_c_frames_masks_and_boxes(movi_c_raw, tmp_path):
    root, videos = movi_c_raw
    splits = convert("movi_c", root, tmp_path / "out", "--split", "test")
    expected = {"train": [0, 1, 2], "val": [3], "test": [4]}
    for name, indices in expected.items():
        split = splits[name]
        check_meta(split, "movi_c", name, 24, 10)
        assert len(split) == len(indices)
        for i, v in enumerate(indices):
            sample = split[i]
            assert sample["video"].shape == (24, 128, 128, 3) and sample["bbox"].shape == (24, 10, 4)
            np.testing.assert_array_equal(sample["video"], videos[v]["video"])  # 128 config: no resampling
            np.testing.assert_array_equal(sample["segment"], videos[v]["segment"])
            np.testing.assert_array_equal(sample["bbox"], dense_ltrb(videos[v]["boxes"]))
    first = splits["train"][0]
    # the 1x1 instance at (201, 51) of the 256 render has boxes in every frame but no pixel in the 128 subsample
    tiny = [i for i, per_frame in enumerate(videos[0]["boxes"]) if per_frame.get(0) == [51 / 256, 201 / 256,
                                                                                      52 / 256, 202 / 256]][0]
    assert first["bbox"][:, tiny].any(-1).all() and not (first["segment"] == tiny + 1).any()
    # the instance entering from the left (visible from frame 3) has zero boxes before
    entering = [i for i, per_frame in enumerate(videos[1]["boxes"]) if min(per_frame) == 3]
    assert len(entering) == 1 and not splits["train"][1]["bbox"][:3, entering[0]].any()
    assert splits["train"][1]["bbox"][3:, entering[0]].any(-1).all()
    assert splits["train"].meta["summary"]["dropped_instances"] == 0


def test_movi_d_256_slot_budget_and_version_root(tmp_path):
    rects = [(8 + 48 * (k % 5), 8 + 50 * (k // 5), 40 - k, 40 - k, (k % 3) - 1, 0) for k in range(22)]
    video = fixtures_raw.movi_video(7, rects)
    assert len(video["boxes"]) == 22
    version = tmp_path / "raw" / "movi_d" / "256x256" / "1.0.0"
    payload = fixtures_raw.movi_example(video, "movi_d", 0, flows=False)
    fixtures_raw.write_movi(version, "movi_d", {"train": [[payload]], "validation": [[payload]]})
    splits = convert("movi_d", version, tmp_path / "out", "--resolution", "256x256")
    sample = splits["train"][0]
    check_meta(splits["train"], "movi_d", "train", 24, 20)
    merged = np.where(video["segment"] > 20, 0, video["segment"])  # the two least visible join the background
    np.testing.assert_array_equal(sample["segment"], crop_nearest(merged))
    np.testing.assert_array_equal(sample["bbox"], dense_ltrb(video["boxes"], slots=20))
    for t in (0, 23):
        assert_image_close(sample["video"][t], video["video"][t])
    summary = splits["train"].meta["summary"]
    assert summary["dropped_instances"] == 2 and summary["samples_with_dropped_instances"] == 1


def test_movi_damaged_shards_are_reported_and_numpy_crc_agrees(movi_c_raw, tmp_path, monkeypatch, capsys):
    root, videos = movi_c_raw
    raw = tmp_path / "raw"
    shutil.copytree(root, raw)
    shard_dir = raw / "movi_c" / "128x128" / "1.0.0"
    first_shard = shard_dir / "movi_c-train.tfrecord-00000-of-00002"
    records, _ = tfrecord_reader.index_tfrecord(str(first_shard))
    damaged = bytearray(first_shard.read_bytes())
    damaged[records[1][0] + records[1][1] // 2] ^= 0x04
    first_shard.write_bytes(bytes(damaged))
    second_shard = shard_dir / "movi_c-train.tfrecord-00001-of-00002"
    second_size = second_shard.stat().st_size  # one record: 16 framing bytes + data
    second_shard.write_bytes(second_shard.read_bytes()[:-1000])
    validation = shard_dir / "movi_c-validation.tfrecord-00000-of-00001"
    whole_validation = validation.read_bytes()
    validation.write_bytes(whole_validation[:20])
    monkeypatch.setattr(tfrecord_reader, "_CRC32C_FUNCTION", tfrecord_reader.crc32c_numpy)

    with pytest.raises(UserError, match="none of the 1 val inputs of movi_c"):
        convert("movi_c", raw, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []  # a dataset is published whole: train waits for val
    assert "skipped movi_c-train.tfrecord-00000-of-00002#1" in capsys.readouterr().out
    validation.write_bytes(whole_validation)
    convert("movi_c", raw, tmp_path / "out")
    train = load_split(str(tmp_path / "out" / "train.lmdb"))
    assert len(train) == 1
    np.testing.assert_array_equal(train[0]["segment"], videos[0]["segment"])
    np.testing.assert_array_equal(train[0]["bbox"], dense_ltrb(videos[0]["boxes"]))
    skipped = train.meta["summary"]["skipped"]
    assert skipped == ["movi_c-train.tfrecord-00000-of-00002#1: data CRC mismatch (corrupt record)",
                       "movi_c-train.tfrecord-00001-of-00002: truncated: record 0 lacks 1000 of its "
                       f"{second_size} bytes"]


# ------------------------------------------------------------------------------------------------ missing data

@pytest.mark.parametrize("name, hint", [
    ("clevrtex", "https://www.robots.ox.ac.uk/~vgg/data/clevrtex/"),
    ("coco", "https://cocodataset.org/#download"),
    ("voc", "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"),
    ("movi_c", "gs://kubric-public/tfds/movi_c/128x128/1.0.0"),
    ("movi_d", "gs://kubric-public/tfds/movi_d/128x128/1.0.0"),
    ("movi_e", "gs://kubric-public/tfds/movi_e/128x128/1.0.0"),
])
def test_missing_root_names_the_layout_and_the_download(name, hint, tmp_path):
    with pytest.raises(UserError) as error:
        prepare_data.main([name, "--root", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    message = str(error.value)
    assert "does not exist" in message and "expected" in message and hint in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="does not hold the"):
        prepare_data.main([name, "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


def test_default_root_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "clevrtex"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: data/raw/clevrtex does not exist") and result.stderr.count("\n") == 1
