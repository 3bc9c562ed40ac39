"""Stage 3: evaluate a trained OCL checkpoint — segmentation metrics, object separability, figures (protocol:
README, "Evaluation protocol").

    python evaluate.py CKPT [--split val] [--out DIR]
    python evaluate.py RUN --images DIR_OR_GLOB [--out DIR]     (segment your own images)

The metrics themselves (ARI, ARIfg, mIoU, mBO, mask entropy, separability) and their conventions live in
metrics.py, which needs no checkpoint; this script rebuilds models from checkpoints (checkpoints.py), runs them
over a split and writes the tables and figures.
"""

import argparse
import glob
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import api
import msf
from checkpoints import load_for_evaluation
from config import ranged
from data import eval_loader, load_split, split_path
from devices import setup_distributed
from errors import UserError, run_main
from figures import enlarged, save_figures, slot_rows
from files import atomic_write, atomic_write_text, strict_json
from grids import save_labelled_grid, segments_over
from metrics import (IGNORE, SIZE_GROUPS, ari, grid_segments, grid_shape, mean_percent, objects_by_size, score_batch,
                     segmentation_scores, segments_at, separability_batch)
from runs import describe_environment, progress_bar, read_environment, resolve_checkpoint, step_in_name

# ================================================================================================================
# Checkpoints and their data.

def run_name(path: str) -> str:
    """A checkpoint's label in tables and figure names: its run directory for `ckpt_*.pt` / `best.pt`, else the
    file name without `.pt`."""
    base = os.path.basename(path)
    if base == "best.pt" or (base.startswith("ckpt_") and base.endswith(".pt")):
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    return base.removesuffix(".pt")


def default_output(first: str, split: str) -> str:
    """The default --out, beside the first checkpoint and named after the split and that checkpoint: RUN/eval_val
    for a run's best.pt (what `evaluate.py RUN` evaluates), RUN/eval_val_step4 for its ckpt_0000004.pt (also the
    latest checkpoint of a run without best.pt), RUN/eval_val_NAME for another file NAME.pt."""
    path = first
    if os.path.isdir(first):
        best = os.path.join(first, "best.pt")
        path = best if os.path.isfile(best) else resolve_checkpoint(first)
    name = os.path.basename(path)
    step = step_in_name(name)
    suffix = "" if name == "best.pt" else f"_step{step}" if step is not None else "_" + name.removesuffix(".pt")
    return os.path.join(os.path.dirname(path) or ".", f"eval_{split}{suffix}")


def data_changed_note(state: dict, name: str, data_dir: str = "") -> str:
    """One sentence when the dataset a checkpoint is evaluated on is the one it trained on by path but holds other
    data now: its training split's fingerprint differs from the checkpoint's (the dataset was regenerated or
    re-pointed since). '' otherwise, when --data_dir names another dataset, or without fingerprints (older splits
    and checkpoints)."""
    trained, trained_dir = state["data"].get("fingerprint"), state["data"].get("data_dir")
    if not trained or not trained_dir or (data_dir and os.path.realpath(data_dir) != os.path.realpath(trained_dir)):
        return ""
    path = split_path(trained_dir, state["data"].get("train") or "train")
    try:
        now = load_split(path).meta.get("fingerprint")
    except UserError:  # the training split is gone: nothing to compare with
        return ""
    if not now or now == trained:
        return ""
    return (f"note: {name} was trained on other data than {trained_dir} holds now (training split fingerprint "
            f"{trained}, now {now}): the dataset was regenerated or re-pointed since training, so these scores do not "
            f"compare with the run's own validation")


def data_path(state: dict, split: str, data_dir: str = "") -> str:
    """The split a checkpoint is evaluated on: in `data_dir` if given, else in the directory it was trained on."""
    return split_path(data_dir or state["data"]["data_dir"], split)


# ================================================================================================================
# Evaluating OCL checkpoints.

@torch.no_grad()
def evaluate_ocl(model, loader, device, separability_of_guidance: bool = False, progress: str = "") -> dict:
    """Per-sample scores (numpy float64 arrays) of every metric over a loader, plus the separability of the
    guidance vectors (scale 1) when asked."""
    per_sample = {}
    bar = progress_bar(len(loader.dataset), 0, progress)
    for batch in loader:
        scores, _, batch = score_batch(model, batch, device, extended=True)
        truth = batch["segment"].long()
        flat_truth = truth.flatten(1).cpu()
        for name, segments in baseline_segments(truth.cpu(), model.config["num_slots"]).items():
            baseline = segmentation_scores(segments.flatten(1), flat_truth, extended=True)
            scores.update({f"baseline_{name}/{key}": value for key, value in baseline.items()})
        scores.update({f"objects_{group}": number for group, number in objects_by_size(flat_truth).items()})
        if separability_of_guidance and model.vae is not None and not model.video:
            vectors = model.guidance(batch["image"])["vectors"][0]
            scores.update(_guidance_separability(vectors, truth))
        for name, value in scores.items():
            per_sample.setdefault(name, []).append(torch.as_tensor(value, dtype=torch.float64).numpy())
        bar.update(truth.shape[0])
    bar.close()
    return {name: np.concatenate(values) for name, values in per_sample.items()}


def baseline_segments(truth: torch.Tensor, slots: int) -> dict:
    """Segmentations of the ground truth's shape (B, [T,] H, W) that ignore the images, scored beside each run:
    the whole image as one segment, and a fixed grid of as many cells as the model has slots (every frame of a
    video the same grid). A model whose scores do not clear the grid's has found places, not objects."""
    rows, cols = grid_shape(slots)
    grid = grid_segments(truth.shape[-2], truth.shape[-1], slots).expand(truth.shape)
    return {"one_segment": torch.zeros_like(truth), f"grid_{rows}x{cols}": grid}


def _segment_counts(truth: torch.Tensor) -> np.ndarray:
    """Number of ground-truth segments (background included, ignore excluded) of each image (b,H,W)."""
    counts = []
    for segment in truth.cpu():
        ids = torch.unique(segment)
        counts.append(int((ids != IGNORE).sum()))
    return np.array(counts)


def _guidance_separability(vectors: torch.Tensor, truth: torch.Tensor, prefix: str = "sep_") -> dict:
    result = separability_batch(vectors.flatten(1, 2).float().cpu().numpy(), _segment_counts(truth))
    return {prefix + "inter": result["inter"], prefix + "intra": result["intra"]}


# ================================================================================================================
# Object separability of a VAE (paper Table 4, Fig. 3).

REPRESENTATIONS = ("si_before", "si_after", "sv", "final")
REPRESENTATION_LABELS = {"si_before": "shared code before inter-scale fusion",
                         "si_after": "shared code after inter-scale fusion", "sv": "scale-specific code",
                         "final": "final X_n (guidance)"}



@torch.no_grad()
def vae_separability(vae, loader, device, max_images: int, figure_path: str = "") -> dict:
    """Object separability per scale and representation: for MSF the scale-invariant part before and after
    inter-scale fusion, the scale-variant part and the final X_n; for VQ / grouped the final vectors.

    Per image, KMeans with k = its number of ground-truth segments (background included) gives the paper's
    inter- and intra-cluster distances (Table 4). Their ratio alone rewards collapse: a VAE that uses few codes has
    tight clusters by construction (k clusters of k distinct codes have intra 0). Three columns make VAEs
    comparable: `object_ari`, the ARI (background included, in percent) of the KMeans clusters against the
    ground-truth segments at the token grid, which is scale-free and high only when the clusters follow objects;
    `tokens`, the distinct vectors per image; and, per codebook, the share of codes used over the images."""
    sums, figure = {}, None
    seen = 0
    books = vae.codebooks()
    code_counts = [torch.zeros(b.num_codes, dtype=torch.long) for b in books]
    bar = progress_bar(min(max_images, len(loader.dataset)), 0, "separability")
    for batch in loader:
        images, truth = batch["image"].to(device), batch["segment"].long()
        images, truth = images[:max_images - seen], truth[:max_images - seen]
        quantized = vae.quantize(images)
        for book, indices in quantized.assignments:
            code_counts[books.index(book)] += torch.bincount(indices.reshape(-1).cpu(), minlength=book.num_codes)
        ks = _segment_counts(truth)
        representations = {"final": quantized.guidance}
        representations.update({k: v for k, v in quantized.parts.items() if v})
        for name, per_scale in representations.items():
            for n, vectors in enumerate(per_scale):
                result = separability_batch(vectors.flatten(1, 2).float().cpu().numpy(), ks, return_labels=True)
                grid_truth = segments_at(truth, tuple(vectors.shape[1:3])).flatten(1)
                result["object_ari"] = 100 * ari(torch.as_tensor(result["labels"]), grid_truth).numpy()
                for which in ("inter", "intra", "object_ari", "distinct"):
                    sums.setdefault((name, n + 1, which), []).append(np.asarray(result[which], dtype=np.float64))
        if figure is None and figure_path:
            figure = (images[:8], {k: [v[:8] for v in per] for k, per in representations.items()})
        seen += images.shape[0]
        bar.update(images.shape[0])
        if seen >= max_images:
            break
    bar.close()
    table = {}
    for (name, scale, which), values in sums.items():
        values = np.concatenate(values)
        values = values[~np.isnan(values)]
        key = "tokens" if which == "distinct" else which
        table.setdefault(f"{name}_scale{scale}", {})[key] = float(values.mean()) if len(values) else math.nan
    for row in table.values():  # undefined when the clusters are single points (tiny code maps)
        row["ratio"] = row["inter"] / row["intra"] if row["intra"] > 1e-9 else math.nan
    usage = {f"codebook{i}": float((count > 0).float().mean()) for i, count in enumerate(code_counts)}
    if figure is not None:
        images, representations = figure
        size = tuple(images.shape[-2:])
        rows, labels = [images.float().cpu() * 0.5 + 0.5], ["input"]
        for name in [r for r in REPRESENTATIONS if r in representations]:
            for n, vectors in enumerate(representations[name]):
                rows.append(F.interpolate(msf.pca_colours(vectors), size=size, mode="nearest").cpu())
                labels.append(f"{REPRESENTATION_LABELS[name]}, scale {n + 1} (PCA)")
        save_labelled_grid(rows, labels, figure_path, margin=128)
    return {"table": table, "codes_used": usage}


# ================================================================================================================
# Segmenting your own images (--images): api.ObjectCentric.segment over image files, and the files it draws.

CONTACT_SHEET_COLUMNS = 8


def image_files(specs: list) -> list:
    """The files that --images names, in order and each once: a directory's files (hidden ones left out), the
    matches of a glob, or a file; a directory without files or a glob matching nothing is one sentence."""
    paths = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(spec, name) for name in os.listdir(spec)
                           if not name.startswith(".") and os.path.isfile(os.path.join(spec, name)))
            if not found:
                raise UserError(f"--images {spec} is a directory without files; put the images to segment there")
        else:
            found = [spec] if os.path.isfile(spec) else sorted(p for p in glob.glob(spec) if os.path.isfile(p))
            if not found:
                raise UserError(f"--images {spec} matches no file; give image files, a directory of them or a glob "
                                f"such as 'photos/*.jpg'")
        paths += [path for path in found if path not in paths]
    return paths


def _output_stems(paths: list) -> list:
    """Each file's name without its extension, made unique (photo.png and photo.jpg -> photo, photo_jpg)."""
    stems = []
    for path in paths:
        name = os.path.basename(path)
        stem = os.path.splitext(name)[0]
        stems.append(stem if stem not in stems else name.replace(".", "_"))
    return stems


def _save_array(path: str, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array), binary=True)


def segment_images(checkpoints: list, specs: list, out: str, device, batch_size: int) -> str:
    """Segment the image files `specs` names with one OCL image checkpoint and write, per image, into `out`
    (default RUN/segment): <stem>_overlay.png, <stem>_slots.png, <stem>_reconstruction.png where the method has a
    cheap one, <stem>_slots.npy (s, d) float32 and <stem>_masks.npy (s, H, W) float32; then contact_sheet.png of
    every image. Every file is read before anything is written. Returns `out`."""
    if len(checkpoints) != 1:
        raise UserError(f"--images segments with one checkpoint, got {len(checkpoints)}; run once per checkpoint")
    paths = image_files(specs)
    model = api.load(checkpoints[0], str(device))
    if not isinstance(model, api.ObjectCentric):
        raise UserError(f"{model.state['path']} is a VAE checkpoint; --images needs an OCL (train_ocl.py) checkpoint")
    if model.model.video:
        raise UserError(f"{model.state['path']} models videos, so it needs videos with first-frame boxes, not images; "
                        f"give an image checkpoint (the Python API's slots_and_masks takes videos)")
    images, notes = api.read_images(paths, model.resolution)
    print("\n".join(notes))
    first = checkpoints[0]
    out = out or os.path.join(first if os.path.isdir(first) else os.path.dirname(first) or ".", "segment")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory; give a directory for the segmentations")
    stems, sheet = _output_stems(paths), {"input": [], "overlay": []}
    for start in range(0, len(paths), batch_size):
        result = model.segment(images[start:start + batch_size])
        how = result["reconstruction_note"]
        shown = result["images"].cpu() * 0.5 + 0.5
        overlay = segments_over(shown, result["segments"])
        sheet["input"].append(shown), sheet["overlay"].append(overlay)
        for i, stem in enumerate(stems[start:start + batch_size]):
            base, one = os.path.join(out, stem), slice(i, i + 1)
            save_labelled_grid(enlarged([shown[one], overlay[one]]), [
                "input as the model saw it", f"segments (argmax over {result['masks'].shape[1]} slots) over the input"],
                base + "_overlay.png")
            masked, labels = slot_rows(shown[one], result["masks"][one].cpu().clamp(0, 1))
            save_labelled_grid(enlarged([shown[one]] + masked), ["input"] + labels, base + "_slots.png")
            if result["reconstruction"] is not None:
                save_labelled_grid(enlarged([shown[one], result["reconstruction"][one].cpu() * 0.5 + 0.5]),
                                   ["input", f"reconstruction: {how}"], base + "_reconstruction.png")
            _save_array(base + "_slots.npy", result["slots"][i].float().cpu().numpy())
            _save_array(base + "_masks.npy", result["masks"][i].float().cpu().numpy())
    inputs, overlays = torch.cat(sheet["input"]), torch.cat(sheet["overlay"])
    rows, labels = [], []
    for start in range(0, len(paths), CONTACT_SHEET_COLUMNS):
        end = min(start + CONTACT_SHEET_COLUMNS, len(paths))
        rows += [inputs[start:end], overlays[start:end]]
        labels += [f"images {start + 1}-{end}: input", f"images {start + 1}-{end}: segments over input"]
    save_labelled_grid(enlarged(rows), labels, os.path.join(out, "contact_sheet.png"))
    reconstructed = result["reconstruction"] is not None
    print(f"reconstruction: {how}" if reconstructed else how)
    made = "overlay, slots, reconstruction" if reconstructed else "overlay, slots"
    print(f"wrote {len(paths)} x <stem>_{{{made}}}.png and <stem>_{{slots,masks}}.npy, and contact_sheet.png "
          f"(images in the order above) under {out}")
    return out


# ================================================================================================================
# Command line.

def _format_table(header: list, rows: list) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


TABLE_KEYS = ("ari", "ari_fg", "miou", "mbo", "miou_fg", "mbo_fg", "mbo_small", "mbo_medium", "mbo_large", "bg_iou",
              "bg_slots", "mask_entropy")
PLAIN_MEANS = ("bg_slots",)  # averaged as they are; the other segmentation metrics are fractions shown in percent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="OCL or VAE checkpoints (files or run directories); several "
                        "OCL checkpoints (seeds) are aggregated as mean ± std")
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument("--out", default="", help="output directory (default: beside the first checkpoint, "
                        "RUN/eval_SPLIT for a run's best.pt, RUN/eval_SPLIT_stepN for its ckpt_N.pt)")
    parser.add_argument("--data_dir", default="", help="dataset directory (default: the one the run trained on)")
    parser.add_argument("--samples", type=ranged(int, "--samples", min=0), default=0,
                        help="evaluate the first N samples only (0 = all)")
    parser.add_argument("--batch_size", type=ranged(int, "--batch_size", min=1), default=16)
    parser.add_argument("--num_workers", type=ranged(int, "--num_workers", min=0), default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--separability", action="store_true", help="object separability of the guidance "
                        "vectors (VAE checkpoints: every scale and representation; OCL: its guidance at scale 1)")
    parser.add_argument("--compare", action="store_true", help="one table row per checkpoint instead of mean ± std")
    parser.add_argument("--figures", type=ranged(int, "--figures", min=0), default=8,
                        help="samples drawn in the figures (0 = none)")
    parser.add_argument("--overwrite", action="store_true", help="replace the metrics and figures of an earlier "
                        "evaluation in the output directory (refused without it)")
    parser.add_argument("--images", nargs="+", metavar="DIR_OR_GLOB", help="segment these image files (a directory, "
                        "a glob or files; any size, centre-cropped and resized to the run's resolution) with one OCL "
                        "checkpoint instead of evaluating a split; writes into --out (default RUN/segment)")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("evaluate.py runs in one process: start it with python, not torchrun")
    d = setup_distributed(args.device)
    if args.images:
        segment_images(args.checkpoints, args.images, args.out, d.device, args.batch_size)
        return
    out = args.out or default_output(args.checkpoints[0], args.split)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory; give a directory for the metrics and figures")
    if os.path.isfile(os.path.join(out, "metrics.json")) and not args.overwrite:
        raise UserError(f"{out} already holds the metrics of an earlier evaluation (metrics.json); pass --overwrite "
                        f"to replace them, or choose another --out")
    results = []
    for path in args.checkpoints:
        model, state = load_for_evaluation(path, d.device)
        name = run_name(state["path"])
        if state["kind"] == "vae" and not args.separability:
            raise UserError(f"{state['path']} is a VAE checkpoint: evaluate it with --separability "
                            f"(segmentation metrics need an OCL checkpoint)")
        split_path = data_path(state, args.split, args.data_dir)
        loader = eval_loader(split_path, args.batch_size, args.num_workers, d,
                             state["data"]["resolution"], args.samples)
        if state["kind"] == "ocl" and loader.dataset.dataset.is_video != state["video"]:
            raise UserError(f"{split_path} holds {'videos' if loader.dataset.dataset.is_video else 'images'} but "
                            f"{state['path']} models {'videos' if state['video'] else 'images'}; give a matching "
                            f"dataset with --data_dir")
        entry = {"checkpoint": state["path"], "name": name, "kind": state["kind"], "step": state["step"],
                 "split": split_path, "environment": read_environment(os.path.dirname(state["path"]))}
        note = data_changed_note(state, name, args.data_dir)
        if note:
            entry["data_note"] = note
            print(note)
        if state["kind"] == "vae":
            if loader.dataset.dataset.is_video:
                raise UserError("separability is measured on images; give an image dataset with --data_dir")
            figure = os.path.join(out, f"{name}_code_maps.png") if args.figures else ""
            entry["separability"] = vae_separability(model, loader, d.device, args.samples or len(loader.dataset),
                                                     figure)
        else:
            scores = evaluate_ocl(model, loader, d.device, args.separability, f"evaluate {name}")
            for key, values in scores.items():
                if key.startswith("baseline_"):  # baseline_NAME/metric: the no-model segmentations' scores
                    baseline, metric = key[len("baseline_"):].split("/")
                    entry.setdefault("baselines", {}).setdefault(baseline, {})[metric] = (
                        float(np.nanmean(values)) if metric in PLAIN_MEANS else mean_percent(values))
                    continue
                if key.startswith("objects_"):  # how many objects each size group's mBO averages over
                    entry[key] = int(values.sum())
                    continue
                plain = key.startswith("sep_") or key in PLAIN_MEANS
                entry[key] = float(np.nanmean(values)) if plain else mean_percent(values)
                entry[f"{key}_count"] = int(np.sum(~np.isnan(values)))
            if args.figures:
                figure_loader = eval_loader(split_path, args.figures if not state["video"] else 2, 0, d,
                                            state["data"]["resolution"], args.figures)
                save_figures(model, next(iter(figure_loader)), d.device, os.path.join(out, name))
        results.append(entry)
        del model
    report = _report(results, args.compare)
    print(report["text"])
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "metrics.json"), strict_json(report["json"], indent=2) + "\n")
    atomic_write_text(os.path.join(out, "table.md"), report["text"] + "\n")
    print(f"wrote {os.path.join(out, 'metrics.json')} and figures under {out}")


def _report(results: list, compare: bool) -> dict:
    """The printed table and metrics.json: one OCL run -> its metrics (percent); several -> mean, std and the
    runs; VAE runs -> the separability table."""
    vae_runs = [r for r in results if r["kind"] == "vae"]
    ocl_runs = [r for r in results if r["kind"] == "ocl"]
    lines, payload = [], {"runs": results}
    if ocl_runs:
        keys = [k for k in TABLE_KEYS if k in ocl_runs[0]] + [k for k in ("sep_inter", "sep_intra")
                                                                  if k in ocl_runs[0]]
        if compare or len(ocl_runs) == 1:
            rows = [[r["name"]] + [f"{r[k]:.2f}" for k in keys] for r in ocl_runs]
        else:
            stats = {k: (float(np.nanmean([r[k] for r in ocl_runs])), float(np.nanstd([r[k] for r in ocl_runs])))
                     for k in keys}
            rows = [[r["name"]] + [f"{r[k]:.2f}" for k in keys] for r in ocl_runs]
            rows.append([f"mean ± std ({len(ocl_runs)} runs)"] + [f"{m:.2f} ± {s:.2f}" for m, s in stats.values()])
            payload.update({k: m for k, (m, _) in stats.items()})
            payload.update({f"{k}_std": s for k, (_, s) in stats.items()})
        if len(ocl_runs) == 1:
            payload.update({k: ocl_runs[0][k] for k in keys})
        baselines = ocl_runs[0].get("baselines", {})  # the first run's split and slot count
        payload["baselines"] = baselines
        rows += [[f"no model: {name.replace('_', ' ')}"] + ["–" if values.get(k) is None else f"{values[k]:.2f}"
                                                              for k in keys] for name, values in baselines.items()]
        lines.append(_format_table(["run"] + keys, rows))
        lines.append("ari, ari_fg, miou, mbo: percent, background counted as a segment (README, 'Evaluation "
                     "protocol'); miou_fg, mbo_fg: background excluded (DINOSAUR's convention); mbo_small / medium / "
                     "large: mBO of the objects under 1 %, from 1 to under 5 %, and 5 % or more of the image (" +
                     ", ".join(f"{ocl_runs[0].get('objects_' + g, 0)} {g}" for g in SIZE_GROUPS) +
                     " objects in the first run); bg_iou: the "
                     "background's best IoU with one slot, %; bg_slots: slots holding >= 10 % of the background; "
                     "mask_entropy: entropy of the soft masks over slots, % of ln(slots), 100 = uniform; no model: "
                     "the same scores of the whole image as one segment and of a fixed grid of as many cells as the "
                     "first run has slots, on the same images (a run that does not clear the grid's found places, "
                     "not objects)" +
                     ("; sep_*: KMeans inter/intra-cluster distance of the scale-1 guidance" if "sep_inter" in keys
                      else ""))
    for run in vae_runs:
        separation = run["separability"]
        rows = [[name, f"{v['inter']:.4f}", f"{v['intra']:.4f}", f"{v['ratio']:.3f}", f"{v['object_ari']:.1f}",
                 f"{v['tokens']:.1f}"] for name, v in separation["table"].items()]
        used = ", ".join(f"{name} {100 * share:.0f}%" for name, share in separation["codes_used"].items())
        lines.append(f"separability of {run['name']} (step {run['step']}): bigger inter and smaller intra "
                     f"separate objects better, but the ratio also grows as fewer codes are used; object_ari "
                     f"(KMeans clusters vs ground-truth objects, %) compares VAEs; tokens: distinct vectors per "
                     f"image; codes used over these images: {used}")
        lines.append(_format_table(["representation", "inter", "intra", "inter/intra", "object_ari", "tokens"],
                                   rows))
    lines += [r["data_note"] for r in results if r.get("data_note")]
    lines.append("\n".join(f"{r['name']} trained with: {describe_environment(r.get('environment'))}"
                           for r in results))
    return {"text": "\n\n".join(lines), "json": payload}


if __name__ == "__main__":
    run_main(main)
