"""Writers of tiny raw datasets in the on-disk formats of the official downloads, for the converter tests.

Each writer follows the project's description of the real formats (ClevrTex folders with RGBA renders and 8-bit
palette `_flat.png` masks, COCO panoptic JSON with RGB-encoded PNGs, VOC palette PNGs with void bands, MOVi TFDS
TFRecord shards) and returns the ground truth it drew, so the tests derive expected outputs from the drawing, not from
the converter. MOVi records are serialized by the protobuf library from a runtime descriptor of tf.train.Example and
framed with the `crc32c` package, independently of the converter's own wire decoder and CRC.
"""

import io
import json
import struct
import zlib

import crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from PIL import Image

CLEVRTEX_SIZE = (320, 240)  # (width, height) of every ClevrTex render
# The generator's 14-colour mask palette starts black, red, (0,128,0), blue, yellow; the rest here are stand-ins.
CLEVRTEX_CMAP = [(0, 0, 0), (255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 0), (141, 211, 199), (190, 186, 218),
                 (251, 128, 114), (128, 177, 211), (253, 180, 98), (179, 222, 105), (252, 205, 229), (217, 217, 217),
                 (188, 128, 189)]


def _save_palette_png(path, indices: np.ndarray, palette: list) -> None:
    """An 8-bit 'P' PNG whose pixel values are `indices`; a full 256-entry palette keeps Pillow at 8 bits per pixel."""
    height, width = indices.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(indices, np.uint8).tobytes())
    image.putpalette([channel for colour in palette for channel in colour])
    image.save(path)


def _colour(k: int) -> tuple:
    """A distinct, saturated colour per object number."""
    return ((53 * k + 90) % 256, (97 * k + 30) % 256, (151 * k + 200) % 256)


# ------------------------------------------------------------------------------------------------ ClevrTex

def write_clevrtex(root, variant: str, scenes: dict) -> dict:
    """Write `scenes` {index: [(x0, y0, x1, y1) per object, later ones in front]} as ClevrTex scenes: 6 PNGs and a JSON
    in <root>/clevrtex_<variant>/<index // 1000>/CLEVRTEX_<variant>_<index:06d>*. Returns {index: {"image", "mask",
    "stem"}}: the (240, 320, 3) RGB render and its (240, 320) object indices (0 = background, k = k-th object)."""
    width, height = CLEVRTEX_SIZE
    palette = CLEVRTEX_CMAP * 4 + [(v, v, v) for v in range(256 - 4 * len(CLEVRTEX_CMAP))]
    truth = {}
    for index, rects in scenes.items():
        folder = root / f"clevrtex_{variant}" / str(index // 1000)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"CLEVRTEX_{variant}_{index:06d}"
        y, x = np.mgrid[0:height, 0:width]
        image = np.stack([40 + x * 100 // width, 60 + y * 80 // height, np.full_like(x, 90 + index % 50)], -1)
        mask = np.zeros((height, width), np.uint8)
        objects = []
        for k, (x0, y0, x1, y1) in enumerate(rects, start=1):
            mask[y0:y1, x0:x1] = k
            image[y0:y1, x0:x1] = _colour(k)
            objects.append({"shape": "cube", "rotation": 12.0 * k, "size": 1.5, "color": list(_colour(k)),
                            "material": "PoliigonBricks01", "index": k, "3d_coords": [0.1 * k, -0.2 * k, 0.7],
                            "pixel_coords": [(x0 + x1) / 2, (y0 + y1) / 2, 10.0]})
        image = image.astype(np.uint8)
        rgba = np.concatenate([image, np.full((height, width, 1), 255, np.uint8)], -1)  # Blender writes RGBA
        Image.fromarray(rgba, "RGBA").save(folder / f"{stem}.png")
        Image.fromarray(image // 2 + 60).save(folder / f"{stem}_albedo_0001.png")
        Image.fromarray((y * 255 // height).astype(np.uint8)).save(folder / f"{stem}_depth_0001.png")
        _save_palette_png(folder / f"{stem}_flat.png", mask, palette)
        Image.fromarray(np.stack([x % 256, y % 256, np.full_like(x, 128)], -1).astype(np.uint8)).save(
            folder / f"{stem}_normal_0001.png")
        Image.fromarray(np.where(mask > 0, 200, 30).astype(np.uint8)).save(folder / f"{stem}_shadow_0001.png")
        meta = {"num_objects": len(rects), "split": variant, "image_index": index, "image_filename": f"{stem}.png",
                "ground_material": "PoliigonWoodFloor", "directions": {"left": [-0.6, 0.8, 0.0]},
                "objects": objects, "relationships": {"left": [[] for _ in rects]},
                "mask_filename": f"{stem}_flat.png", "normal_filename": f"{stem}_normal_0001.png",
                "albedo_filename": f"{stem}_albedo_0001.png", "depth_filename": f"{stem}_depth_0001.png",
                "shadow_filename": f"{stem}_shadow_0001.png"}
        (folder / f"{stem}.json").write_text(json.dumps(meta))
        truth[index] = {"image": image, "mask": mask, "stem": stem}
    return truth


# ------------------------------------------------------------------------------------------------ COCO

COCO_CATEGORIES = [
    {"supercategory": "person", "isthing": 1, "id": 1, "name": "person", "color": [220, 20, 60]},
    {"supercategory": "vehicle", "isthing": 1, "id": 3, "name": "car", "color": [0, 0, 142]},
    {"supercategory": "animal", "isthing": 1, "id": 18, "name": "dog", "color": [255, 179, 240]},
    {"supercategory": "outdoor", "isthing": 0, "id": 149, "name": "road", "color": [128, 64, 128]},
    {"supercategory": "plant", "isthing": 0, "id": 184, "name": "tree-merged", "color": [107, 142, 35]},
]
_COCO_THINGS = {c["id"] for c in COCO_CATEGORIES if c["isthing"]}


def write_coco(root, splits: dict, seed: int = 0) -> dict:
    """Write COCO 2017 panoptic: <root>/<split>2017/*.jpg, annotations/panoptic_<split>2017.json and
    annotations/panoptic_<split>2017/*.png with segment id = R + 256 G + 256^2 B (0 = void).

    `splits` maps "train2017"/"val2017" to image specs {"id", "size": (w, h), "gray": bool, "segments": [{"rect",
    "category_id", "iscrowd"}, painted in order], "void": [rects painted with id 0]}. Returns {file stem: {"image":
    the RGB pixels before JPEG coding, "labels": (h, w) uint8 with non-crowd things numbered 1.. in segments_info
    order, stuff 0, crowd and void 255, "segments": the segments_info}}."""
    rng = np.random.default_rng(seed)
    truth = {}
    annotations_dir = root / "annotations"
    for split, specs in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        png_dir = annotations_dir / f"panoptic_{split}"
        png_dir.mkdir(parents=True, exist_ok=True)
        document = {"info": {"description": "fixture"}, "licenses": [], "images": [], "annotations": [],
                    "categories": COCO_CATEGORIES}
        for spec in specs:
            width, height = spec["size"]
            stem = f"{spec['id']:012d}"
            ids = np.zeros((height, width), np.int64)
            labels = np.full((height, width), 255, np.uint8)
            image = np.zeros((height, width, 3), np.uint8)
            image[:] = (30, 30, 30)
            segment_ids = rng.choice(np.arange(1, 1 << 24), size=len(spec["segments"]), replace=False)
            thing_number = 0
            for segment, segment_id in zip(spec["segments"], segment_ids):
                x0, y0, x1, y1 = segment["rect"]
                ids[y0:y1, x0:x1] = segment_id
                image[y0:y1, x0:x1] = _colour(int(segment_id) % 97)
                if segment["iscrowd"]:
                    labels[y0:y1, x0:x1] = 255
                elif segment["category_id"] in _COCO_THINGS:
                    thing_number += 1
                    labels[y0:y1, x0:x1] = thing_number
                else:
                    labels[y0:y1, x0:x1] = 0
            for x0, y0, x1, y1 in spec.get("void", []):
                ids[y0:y1, x0:x1] = 0
                labels[y0:y1, x0:x1] = 255
            segments_info = []
            for segment, segment_id in zip(spec["segments"], segment_ids):
                ys, xs = np.nonzero(ids == segment_id)
                if not len(ys):
                    continue
                segments_info.append({"id": int(segment_id), "category_id": segment["category_id"],
                                      "iscrowd": int(segment["iscrowd"]),
                                      "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                               int(ys.max() - ys.min() + 1)],
                                      "area": int(len(ys))})
            encoded = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
            Image.fromarray(encoded, "RGB").save(png_dir / f"{stem}.png")
            if spec.get("gray"):
                image = np.repeat(image.mean(-1, keepdims=True).astype(np.uint8), 3, -1)
                Image.fromarray(image[..., 0], "L").save(root / split / f"{stem}.jpg", quality=95)
            else:
                Image.fromarray(image, "RGB").save(root / split / f"{stem}.jpg", quality=95)
            document["images"].append({"license": 1, "file_name": f"{stem}.jpg", "coco_url": "", "height": height,
                                       "width": width, "date_captured": "2013-11-14 16:28:13", "flickr_url": "",
                                       "id": spec["id"]})
            document["annotations"].append({"image_id": spec["id"], "file_name": f"{stem}.png",
                                            "segments_info": segments_info})
            truth[stem] = {"image": image, "labels": labels, "segments": segments_info}
        (annotations_dir / f"panoptic_{split}.json").write_text(json.dumps(document))
    return truth


# ------------------------------------------------------------------------------------------------ VOC

def voc_palette() -> list:
    """The standard VOC colour map: bits of the index interleaved into R, G, B from the top bit down."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.append((r, g, b))
    return palette


def write_voc(root, year: str, images: dict, lists: dict = None, band: int = 2) -> dict:
    """Write VOCdevkit/VOC<year>/{JPEGImages, SegmentationObject, SegmentationClass, ImageSets/Segmentation}.

    `images` maps an id such as 2007_000032 to {"size": (w, h), "objects": [{"rect", "class", "difficult"}]}; each
    object is painted in order with a `band`-pixel void (255) ring on its border, a difficult object is void
    entirely. Returns {id: {"image", "object": (h, w) uint8 instance indices, "class": (h, w) uint8 class ids}}."""
    base = root / "VOCdevkit" / f"VOC{year}"
    for folder in ("JPEGImages", "SegmentationObject", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    truth = {}
    for stem, spec in images.items():
        width, height = spec["size"]
        instance = np.zeros((height, width), np.uint8)
        semantic = np.zeros((height, width), np.uint8)
        image = np.zeros((height, width, 3), np.uint8)
        image[:] = (110, 120, 100)
        number = 0
        for obj in spec["objects"]:
            x0, y0, x1, y1 = obj["rect"]
            image[y0:y1, x0:x1] = _colour(obj["class"] * 7 + x0)
            if obj.get("difficult"):
                instance[y0:y1, x0:x1] = semantic[y0:y1, x0:x1] = 255
                continue
            number += 1
            instance[y0:y1, x0:x1] = semantic[y0:y1, x0:x1] = 255
            instance[y0 + band:y1 - band, x0 + band:x1 - band] = number
            semantic[y0 + band:y1 - band, x0 + band:x1 - band] = obj["class"]
        Image.fromarray(image).save(base / "JPEGImages" / f"{stem}.jpg", quality=95)
        _save_palette_png(base / "SegmentationObject" / f"{stem}.png", instance, palette)
        _save_palette_png(base / "SegmentationClass" / f"{stem}.png", semantic, palette)
        (base / "Annotations" / f"{stem}.xml").write_text(f"<annotation><filename>{stem}.jpg</filename></annotation>")
        truth[stem] = {"image": image, "object": instance, "class": semantic}
    for name, stems in (lists or {}).items():
        (base / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{s}\n" for s in stems))
    return truth


# ------------------------------------------------------------------------------------------------ TFRecord

def example_class(packed: bool = True):
    """tf.train.Example (tensorflow/core/example/{example,feature}.proto) built from a runtime FileDescriptorProto.

    packed=False declares the numeric lists `[packed = false]`, so the same message is written in the unpacked
    wire encoding that a decoder must also accept."""
    FieldProto = descriptor_pb2.FieldDescriptorProto
    file_proto = descriptor_pb2.FileDescriptorProto(name="fixture_example.proto", package="tensorflow",
                                                    syntax="proto3")

    def add_message(name, fields, oneof=None):
        message = file_proto.message_type.add(name=name)
        if oneof:
            message.oneof_decl.add(name=oneof)
        for number, field_name, field_type, label, type_name in fields:
            field = message.field.add(name=field_name, number=number, type=field_type, label=label)
            if type_name:
                field.type_name = type_name
            if oneof:
                field.oneof_index = 0
            if field_type in (FieldProto.TYPE_FLOAT, FieldProto.TYPE_INT64):
                field.options.packed = packed
        return message

    repeated, optional = FieldProto.LABEL_REPEATED, FieldProto.LABEL_OPTIONAL
    add_message("BytesList", [(1, "value", FieldProto.TYPE_BYTES, repeated, None)])
    add_message("FloatList", [(1, "value", FieldProto.TYPE_FLOAT, repeated, None)])
    add_message("Int64List", [(1, "value", FieldProto.TYPE_INT64, repeated, None)])
    add_message("Feature", [(1, "bytes_list", FieldProto.TYPE_MESSAGE, optional, ".tensorflow.BytesList"),
                            (2, "float_list", FieldProto.TYPE_MESSAGE, optional, ".tensorflow.FloatList"),
                            (3, "int64_list", FieldProto.TYPE_MESSAGE, optional, ".tensorflow.Int64List")],
                oneof="kind")
    features = add_message("Features", [(1, "feature", FieldProto.TYPE_MESSAGE, repeated,
                                         ".tensorflow.Features.FeatureEntry")])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=FieldProto.TYPE_STRING, label=optional)
    entry.field.add(name="value", number=2, type=FieldProto.TYPE_MESSAGE, label=optional,
                    type_name=".tensorflow.Feature")
    add_message("Example", [(1, "features", FieldProto.TYPE_MESSAGE, optional, ".tensorflow.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def make_example(features: dict, packed: bool = True) -> bytes:
    """Serialize {key: list of bytes | float array | int array} as a tf.train.Example with the protobuf library."""
    message = example_class(packed)()
    for key, values in features.items():
        feature = message.features.feature[key]
        if isinstance(values, (list, tuple)) and all(isinstance(v, bytes) for v in values):
            feature.bytes_list.value.extend(values)
            feature.bytes_list.SetInParent()
        elif np.asarray(values).dtype.kind == "f":
            feature.float_list.value.extend(np.asarray(values, np.float32).ravel().tolist())
            feature.float_list.SetInParent()
        else:
            feature.int64_list.value.extend(np.asarray(values, np.int64).ravel().tolist())
            feature.int64_list.SetInParent()
    return message.SerializeToString()


def masked_crc(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecord(path, payloads) -> None:
    """TFRecord framing: uint64 length | masked CRC-32C of the length | data | masked CRC-32C of the data."""
    with open(path, "wb") as f:
        for data in payloads:
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data)))


# ------------------------------------------------------------------------------------------------ MOVi

def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one): filter-0 rows of big-endian samples, zlib-compressed."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def movi_video(seed: int, rects: list, frames: int = 24, render: int = 256) -> dict:
    """Render moving rectangles as Kubric does its scenes: at 256x256, keep instances visible in some frame, sort them
    by total visible pixels (descending) and number them 1..n, and box each frame where an instance has pixels as
    [ymin/H, xmin/W, (ymax+1)/H, (xmax+1)/W].

    `rects` are (x, y, w, h, vx, vy) at the render size, painted in order (later in front), moving by (vx, vy) per
    frame. Returns {"video" (T,R,R,3), "segment" (T,R,R), "boxes": per instance {frame: yxyx}, "visibility" (n,T)}."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:render, 0:render]
    background = np.stack([xx * 200 // render, yy * 200 // render, np.full_like(xx, 70)], -1).astype(np.uint8)
    provisional = np.zeros((frames, render, render), np.int64)
    video = np.repeat(background[None], frames, 0)
    colours = rng.integers(0, 256, (len(rects), 3))
    for t in range(frames):
        for k, (x, y, w, h, vx, vy) in enumerate(rects, start=1):
            x0, y0 = int(round(x + vx * t)), int(round(y + vy * t))
            x0c, y0c, x1c, y1c = max(x0, 0), max(y0, 0), min(x0 + w, render), min(y0 + h, render)
            if x1c > x0c and y1c > y0c:
                provisional[t, y0c:y1c, x0c:x1c] = k
                video[t, y0c:y1c, x0c:x1c] = colours[k - 1]
    totals = np.bincount(provisional.ravel(), minlength=len(rects) + 1)[1:]
    order = [k + 1 for k in np.argsort(-totals, kind="stable") if totals[k] > 0]
    relabel = np.zeros(len(rects) + 1, np.int64)
    relabel[order] = np.arange(1, len(order) + 1)
    segment = relabel[provisional].astype(np.uint8)
    boxes, visibility = [], np.zeros((len(order), frames), np.int64)
    for i in range(1, len(order) + 1):
        per_frame = {}
        for t in range(frames):
            ys, xs = np.nonzero(segment[t] == i)
            visibility[i - 1, t] = len(ys)
            if len(ys):
                per_frame[t] = [ys.min() / render, xs.min() / render, (ys.max() + 1) / render, (xs.max() + 1) / render]
        boxes.append(per_frame)
    return {"video": video, "segment": segment, "boxes": boxes, "visibility": visibility}


def subsample_128(video: dict) -> dict:
    """The 128x128 TFDS config from a 256 render: masks by nearest neighbour arr[0::2, 0::2], RGB by 2x2 average;
    boxes and visibility stay those of the 256 render."""
    frames = video["video"].astype(np.float64)
    t, h, w, _ = frames.shape
    averaged = np.round(frames.reshape(t, h // 2, 2, w // 2, 2, 3).mean((2, 4))).astype(np.uint8)
    return dict(video, video=averaged, segment=video["segment"][:, 0::2, 0::2])


def movi_example(video: dict, name: str, index: int, flows: bool = True) -> bytes:
    """Serialize one scene with the MOVi keys TFDS writes (flattened with '/', ragged boxes as flat values plus row
    lengths); the fields the converter does not read are filled with plausible values of the right type and length."""
    frames, height, width, _ = video["video"].shape
    n = len(video["boxes"])
    rng = np.random.default_rng(index)
    row_lengths = [len(per_frame) for per_frame in video["boxes"]]
    features = {
        "video": [_png(frame) for frame in video["video"]],
        "segmentations": [_png(mask) for mask in video["segment"]],
        "depth": [_png((np.arange(height * width, dtype=np.uint16).reshape(height, width) * 3)) for _ in range(frames)],
        "normal": [_png16_rgb(np.full((height, width, 3), 30000 + t, np.uint16)) for t in range(frames)],
        "object_coordinates": [_png16_rgb(np.full((height, width, 3), 1000 * t, np.uint16)) for t in range(frames)],
        "metadata/video_name": [str(1000 + index).encode()],
        "metadata/width": [width], "metadata/height": [height], "metadata/num_frames": [frames],
        "metadata/num_instances": [n],
        "metadata/depth_range": np.array([8.5, 31.25], np.float32),
        "metadata/forward_flow_range": np.array([-12.0, 14.5], np.float32),
        "metadata/backward_flow_range": np.array([-13.0, 11.0], np.float32),
        "background": [b"clear_sky"],
        "camera/focal_length": np.array([35.0], np.float32), "camera/sensor_width": np.array([32.0], np.float32),
        "camera/field_of_view": np.array([0.857], np.float32),
        "camera/positions": rng.normal(size=frames * 3).astype(np.float32),
        "camera/quaternions": rng.normal(size=frames * 4).astype(np.float32),
        "instances/mass": rng.random(n).astype(np.float32), "instances/friction": rng.random(n).astype(np.float32),
        "instances/restitution": rng.random(n).astype(np.float32), "instances/scale": rng.random(n).astype(np.float32),
        "instances/asset_id": [f"asset_{k}".encode() for k in range(n)],
        "instances/category": rng.integers(0, 17, n),
        "instances/positions": rng.normal(size=n * frames * 3).astype(np.float32),
        "instances/velocities": rng.normal(size=n * frames * 3).astype(np.float32),
        "instances/angular_velocities": rng.normal(size=n * frames * 3).astype(np.float32),
        "instances/quaternions": rng.normal(size=n * frames * 4).astype(np.float32),
        "instances/bboxes_3d": rng.normal(size=n * frames * 24).astype(np.float32),
        "instances/image_positions": rng.random(n * frames * 2).astype(np.float32),
        "instances/visibility": video["visibility"].ravel(),
        "instances/bboxes/ragged_flat_values": np.array(
            [value for per_frame in video["boxes"] for t in sorted(per_frame) for value in per_frame[t]], np.float32),
        "instances/bboxes/ragged_row_lengths_0": np.array(row_lengths, np.int64),
        "instances/bbox_frames/ragged_flat_values": np.array(
            [t for per_frame in video["boxes"] for t in sorted(per_frame)], np.int64),
        "instances/bbox_frames/ragged_row_lengths_0": np.array(row_lengths, np.int64),
        "events/collisions/instances": np.array([1, 65535, 1, 2], np.int64),
        "events/collisions/frame": np.array([3, 9], np.int64),
        "events/collisions/force": np.array([1.5, 20.0], np.float32),
        "events/collisions/position": rng.normal(size=6).astype(np.float32),
        "events/collisions/contact_normal": rng.normal(size=6).astype(np.float32),
        "events/collisions/image_position": rng.random(4).astype(np.float32),
    }
    if name in ("movi_d", "movi_e"):
        features["instances/is_dynamic"] = (np.arange(n) < 2).astype(np.int64)
    if flows:  # uint16 codes per pixel and (row, col): the bulk of a real record, which the converter must skip
        features["forward_flow"] = rng.integers(0, 65536, frames * height * width * 2)
        features["backward_flow"] = rng.integers(0, 65536, frames * height * width * 2)
    return make_example(features)


def write_movi(directory, name: str, shards: dict) -> None:
    """Write TFDS shards <directory>/<name>-<split>.tfrecord-<i:05d>-of-<n:05d> (directory = <data_dir>/<name>/
    <resolution>/1.0.0) plus the two TFDS metadata files; `shards` maps a split to a list of lists of payloads."""
    directory.mkdir(parents=True, exist_ok=True)
    split_info = []
    for split, payload_lists in shards.items():
        for i, payloads in enumerate(payload_lists):
            write_tfrecord(directory / f"{name}-{split}.tfrecord-{i:05d}-of-{len(payload_lists):05d}", payloads)
        split_info.append({"name": split, "shardLengths": [str(len(p)) for p in payload_lists]})
    (directory / "dataset_info.json").write_text(json.dumps({"name": name, "version": "1.0.0", "splits": split_info}))
    (directory / "features.json").write_text(json.dumps({"type": "tensorflow_datasets.core.features.FeaturesDict"}))
