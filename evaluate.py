"""Stage 3: evaluate a trained OCL checkpoint — segmentation metrics, object separability, figures (protocol:
README, "Evaluation protocol").

    python evaluate.py CKPT [--split val] [--out DIR]

The metric functions need no checkpoint and are importable on their own:
  ari(pred, true, foreground_only=False)     adjusted Rand index (ARI, and ARIfg with foreground_only=True)
  miou(pred, true, ignore_background=False)  mean IoU under the Hungarian matching of segments
  mbo(pred, true, ignore_background=False)   mean best overlap
  separability(vectors, k)                   KMeans inter/intra-cluster distances of guidance vectors (Table 4)

`pred` and `true` are int64 tensors (B, N) of segment ids, one row per image; a video is one row with time
flattened into N, so it gets one score, and a slot keeps one identity across all its frames. `true` uses 0 for
background and 255 for ignore; `pred` ids may be any integers (slot indices, usually). Every metric returns a
float64 tensor (B,) of fractions in [0, 1] (ARI in [-1, 1]); `mean_percent` turns it into a table entry.

Conventions (the paper's metrics cover objects *and* background; README, "Evaluation protocol"):
  - background (id 0) is a segment like any other in ARI, mIoU and mBO; ARIfg drops the pixels whose true id is
    background — the prediction is never filtered, so a slot that covers background and an object still counts;
  - pixels with true id 255 drop out of every metric, for both `pred` and `true`;
  - a sample with no pixel (ARI) or no ground-truth segment (mIoU, mBO) left to score gets NaN and is skipped by
    `mean_percent`, rather than counted as a perfect 1 (OCLF's ARI counts it as 1: `empty_foreground=1.0`);
  - all counting is exact (integer pixel counts) and the arithmetic is float64.
"""

import argparse
import contextlib
import math
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

import msf
from common import (UserError, atomic_write_text, autocast, load_checkpoint, load_weights, progress_bar,
                    resolve_stored_path, run_main, save_labelled_grid, setup_distributed, strict_json)
from data import eval_loader, split_path
from model import build_model, masks_to_segments

BACKGROUND = 0
IGNORE = 255


# ================================================================================================================
# Contingency tables: one bincount for the whole batch.

def _check_segments(pred: torch.Tensor, true: torch.Tensor) -> None:
    """Reject inputs the metrics cannot mean anything for, with a sentence saying what is expected."""
    if pred.shape != true.shape or pred.dim() != 2:
        raise ValueError(f"pred and true must both be (B, N) tensors of segment ids (flatten H, W and time into "
                         f"N); got {tuple(pred.shape)} and {tuple(true.shape)}")
    if pred.dtype.is_floating_point or pred.dtype.is_complex or true.dtype.is_floating_point or \
            true.dtype.is_complex:
        raise ValueError(f"pred and true must be integer segment ids (argmax over slots first); got {pred.dtype} "
                         f"and {true.dtype}")


def contingency(pred: torch.Tensor, true: torch.Tensor, drop_background: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample pixel counts of every (true segment, predicted segment) pair over the scored pixels.

    Returns `counts` (B, T, P) float64 and `true_ids` (T,): row t of a sample counts its pixels whose true id is
    `true_ids[t]`, column p those whose predicted id is the p-th distinct `pred` id of the batch. Ids are made
    compact over the whole batch, so a segment absent from a sample has an all-zero row (or column) there.
    Ignore pixels (and background pixels when `drop_background`) are left out of the counts.
    """
    _check_segments(pred, true)
    pred, true = pred.long(), true.long()
    scored = true != IGNORE
    if drop_background:
        scored &= true != BACKGROUND
    true_ids, true_index = torch.unique(true, return_inverse=True)  # (T,), (B, N)
    pred_ids, pred_index = torch.unique(pred, return_inverse=True)  # (P,), (B, N)
    batch, num_true, num_pred = pred.shape[0], len(true_ids), len(pred_ids)
    sample = torch.arange(batch, device=pred.device)[:, None].expand_as(pred)  # (B, N)
    pair = (sample * num_true + true_index) * num_pred + pred_index  # (B, N), one id per (b, t, p)
    counts = torch.bincount(pair[scored], minlength=batch * num_true * num_pred)
    return counts.view(batch, num_true, num_pred).double(), true_ids


# ================================================================================================================
# Adjusted Rand index.

def ari(pred: torch.Tensor, true: torch.Tensor, foreground_only: bool = False,
        empty_foreground: float = float("nan")) -> torch.Tensor:
    """Adjusted Rand index per sample, (B,) float64; ARIfg with `foreground_only=True`.

    Hubert & Arabie's ARI of the two partitions of the scored pixels, written with sklearn's pair confusion
    counts (ordered pairs of distinct pixels), and equal to `sklearn.metrics.adjusted_rand_score` on every
    sample with at least one scored pixel. ARI is 0 in expectation for a random prediction and can be negative.
    Edge cases:
      - identical partitions score 1.0, including the degenerate ones where ARI's formula is 0/0 — every pixel in
        one true and one predicted segment (e.g. ARIfg of an image with a single object that one slot covers), or
        a single scored pixel. sklearn returns 1.0 there, and so does OCLF (`ocl.metrics.utils.
        adjusted_rand_index` replaces a zero denominator by 1, which happens only for identical partitions);
      - one true segment but several predicted ones (or the reverse) scores 0.0, as in sklearn;
      - a sample with no scored pixel (all ignore; for ARIfg also no foreground) gets `empty_foreground`: NaN by
        default, so the mean skips it. OCLF's 0/0 rule gives such a sample 1.0 and counts it in the
        mean (sklearn also returns 1.0 for empty input); pass `empty_foreground=1.0` to reproduce its numbers.
    Background (true id 0) is one segment; `foreground_only` drops the pixels whose *true* id is background, and
    predicted ids are never filtered. Ignore pixels (true id 255) never count.
    """
    counts, _ = contingency(pred, true, drop_background=foreground_only)  # (B, T, P)
    num_pixels = counts.sum((1, 2))
    sum_squares = counts.square().sum((1, 2))
    true_squares = counts.sum(2).square().sum(1)
    pred_squares = counts.sum(1).square().sum(1)
    # Ordered pixel pairs: same segment in both, in true only, in pred only, in neither. All are exact integers
    # below 2^53 in float64 (N^2 for N up to ~9e7 pixels); only the products below round.
    same_both = sum_squares - num_pixels
    same_true_only = true_squares - sum_squares
    same_pred_only = pred_squares - sum_squares
    same_neither = num_pixels.square() - true_squares - pred_squares + sum_squares
    numerator = 2 * (same_both * same_neither - same_true_only * same_pred_only)
    denominator = ((same_both + same_true_only) * (same_true_only + same_neither)
                   + (same_both + same_pred_only) * (same_pred_only + same_neither))
    identical = (same_true_only == 0) & (same_pred_only == 0)  # the only way the denominator can be 0
    score = torch.where(identical, torch.ones_like(numerator), numerator / torch.where(identical, 1.0, denominator))
    return torch.where(num_pixels > 0, score, torch.full_like(score, empty_foreground))


# ================================================================================================================
# IoU-based metrics: mIoU (Hungarian matching) and mBO (best overlap).

def _iou_table(pred: torch.Tensor, true: torch.Tensor, ignore_background: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU of every (true, predicted) segment pair (B, T, P), which true segments are scored (B, T) and which
    predicted segments occur (B, P). IoU of an empty union is 0."""
    counts, true_ids = contingency(pred, true)  # background pixels always kept: predictions are never filtered
    true_area = counts.sum(2)  # (B, T)
    pred_area = counts.sum(1)  # (B, P)
    union = true_area[:, :, None] + pred_area[:, None, :] - counts  # (B, T, P)
    iou = torch.where(union > 0, counts / union.clamp(min=1), torch.zeros_like(counts))
    scored = true_area > 0
    if ignore_background:
        scored &= (true_ids != BACKGROUND)[None]
    return iou, scored, pred_area > 0


def miou(pred: torch.Tensor, true: torch.Tensor, ignore_background: bool = False) -> torch.Tensor:
    """Mean IoU per sample under the Hungarian matching, (B,) float64.

    True segments present in the sample are matched one-to-one with predicted segments so that the total IoU
    is maximal (OCLF's `UnsupervisedMaskIoUMetric(matching="hungarian")`); a true segment left without a partner
    (more true segments than predicted ones) scores 0, and the mean runs over the true segments present. A
    predicted segment is the set of scored pixels carrying its id. With `ignore_background` the background
    segment is neither matched nor averaged, but its pixels stay in the predicted segments, so a slot that
    spills onto background loses IoU (as in OCLF). NaN where no true segment is left to score.
    """
    iou, scored, predicted = _iou_table(pred, true, ignore_background)
    scores = []
    for sample_iou, sample_scored, sample_predicted in zip(iou.cpu().numpy(), scored.cpu().numpy(),
                                                           predicted.cpu().numpy()):
        table = sample_iou[sample_scored][:, sample_predicted]  # (true segments, predicted segments)
        if table.shape[0] == 0:
            scores.append(math.nan)
            continue
        rows, cols = linear_sum_assignment(table, maximize=True)
        scores.append(table[rows, cols].sum() / table.shape[0])
    return torch.tensor(scores, dtype=torch.float64, device=pred.device)


def mbo(pred: torch.Tensor, true: torch.Tensor, ignore_background: bool = False) -> torch.Tensor:
    """Mean best overlap per sample, (B,) float64: for every true segment present the best IoU with any
    predicted segment (several true segments may pick the same one), averaged over the true segments.

    Same segment and background conventions as `miou` (OCLF's `AverageBestOverlapMetric`); NaN where no true
    segment is left to score.
    """
    iou, scored, _ = _iou_table(pred, true, ignore_background)
    if iou.shape[2] == 0:  # no pixel at all: N == 0
        return torch.full(scored.shape[:1], math.nan, dtype=torch.float64, device=iou.device)
    best = iou.max(2).values  # (B, T)
    num_scored = scored.sum(1)
    total = torch.where(scored, best, torch.zeros_like(best)).sum(1)
    return torch.where(num_scored > 0, total / num_scored.clamp(min=1), torch.full_like(total, math.nan))


def mask_entropy(masks: torch.Tensor) -> torch.Tensor:
    """How undecided the soft slot masks (B, [T,] S, h, w) are: per sample (B,) float64, the entropy over the S slots
    at each position, averaged over positions (and frames), as a fraction of ln S. 1 = every position shared
    equally by all slots (nothing bound); 0 = every position owned by one slot."""
    p = masks.detach().double().movedim(-3, -1)  # (B, [T,] h, w, S)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1) / math.log(p.shape[-1])
    return entropy.flatten(1).mean(1).cpu()


def mean_percent(values) -> float:
    """Mean over the scored samples in percent (NaN entries are skipped); NaN if no sample was scored."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    scored = values[~np.isnan(values)]
    return float(scored.mean() * 100) if len(scored) else math.nan


# ================================================================================================================
# Object separability of the guidance (paper Sect. 4.3, Table 4).

def separability(vectors, k: int, seed: int = 0, return_labels: bool = False) -> dict:
    """KMeans inter- and intra-cluster distances of one image's guidance vectors (P, c), e.g. 32x32 super-pixels.

    `k` is the number of ground-truth segments in the image, background included. Returns
      inter: mean Euclidean distance over all pairs of cluster centroids — larger is better;
      intra: mean Euclidean distance of each vector to its own cluster's centroid — smaller is better;
      k:     the number of clusters used;
      distinct: the number of distinct vectors (codes) in the image;
      labels: with `return_labels`, the (P,) cluster of every vector.
    These are the quantities Table 4's column headers describe ("Inter-Cluster ↑", "Intra-Cluster ↓"); its caption
    swaps the two definitions, which the arrows and the values (inter > intra everywhere) rule out. Discrete
    codes repeat, so `k` is clipped to the number of distinct vectors; with one cluster `inter` is NaN, and with
    `k < 1` (nothing to cluster, e.g. an all-ignore image) both are NaN. KMeans: k-means++, 10 restarts, seeded.
    """
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().cpu().numpy()
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"vectors must be a non-empty (P, c) array of one image's guidance; got {vectors.shape}")
    # Discrete codes repeat: clustering the distinct vectors weighted by their counts is the same objective on far
    # fewer points (a 32x32 code map has a few dozen distinct codes), so a whole split clusters in seconds.
    distinct, inverse, counts = np.unique(vectors, axis=0, return_inverse=True, return_counts=True)
    k = min(int(k), len(distinct))
    if k < 1:
        return {"inter": math.nan, "intra": math.nan, "k": 0, "distinct": len(distinct),
                **({"labels": np.zeros(len(vectors), dtype=np.int64)} if return_labels else {})}
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(distinct, sample_weight=counts)
    centroids = kmeans.cluster_centers_  # (k, c)
    distances = np.linalg.norm(distinct - centroids[kmeans.labels_], axis=1)
    intra = float((distances * counts).sum() / counts.sum())
    pairs = np.triu_indices(k, 1)
    inter = np.linalg.norm(centroids[:, None] - centroids[None], axis=2)[pairs].mean() if k > 1 else math.nan
    result = {"inter": float(inter), "intra": float(intra), "k": k, "distinct": len(distinct)}
    if return_labels:
        result["labels"] = kmeans.labels_[inverse.reshape(-1)]  # (P,) cluster of every vector
    return result


def separability_batch(vectors, ks, seed: int = 0, return_labels: bool = False) -> dict:
    """`separability` of every image of a batch: vectors (B, P, c), ks (B,) -> dict of (B,) arrays, `inter` and
    `intra` float64 (NaN where undefined), `k` and `distinct` int64; with `return_labels`, `labels` (B, P)."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().cpu().numpy()
    ks = ks.tolist() if isinstance(ks, (torch.Tensor, np.ndarray)) else list(ks)
    if len(vectors) != len(ks):
        raise ValueError(f"one k per image is needed: {len(vectors)} images but {len(ks)} values of k")
    results = [separability(image_vectors, k, seed, return_labels) for image_vectors, k in zip(vectors, ks)]
    batch = {"inter": np.array([r["inter"] for r in results], dtype=np.float64),
             "intra": np.array([r["intra"] for r in results], dtype=np.float64),
             "k": np.array([r["k"] for r in results], dtype=np.int64),
             "distinct": np.array([r["distinct"] for r in results], dtype=np.int64)}
    if return_labels:
        batch["labels"] = np.stack([r["labels"] for r in results])
    return batch

def segmentation_scores(pred: torch.Tensor, true: torch.Tensor, extended: bool = False) -> dict:
    """Every reported metric of one batch: (B,) float64 per key. `extended` adds mIoU / mBO without the
    background segment (DINOSAUR's convention), for comparison with numbers reported that way."""
    scores = {"ari": ari(pred, true), "ari_fg": ari(pred, true, foreground_only=True),
              "miou": miou(pred, true), "mbo": mbo(pred, true)}
    if extended:
        scores["miou_fg"] = miou(pred, true, ignore_background=True)
        scores["mbo_fg"] = mbo(pred, true, ignore_background=True)
    return scores


def score_batch(model, batch: dict, device, dtype=None, extended: bool = False, shuffled_slots: bool = False) -> tuple:
    """Run one batch through an OCL model and score its slot masks: (scores of segmentation_scores plus
    mask_entropy, the model's stats: "loss", and "loss_shuffled_slots" when asked for (OCLModel.forward), the batch
    on `device`). Videos get one score each, time flattened. train_ocl.py validates with this too."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast(device, dtype):
        _, stats, masks = model(batch, shuffled_slots=shuffled_slots)
    truth = batch["segment"].long()
    predicted = masks_to_segments(masks, tuple(truth.shape[-2:]))
    scores = segmentation_scores(predicted.flatten(1).cpu(), truth.flatten(1).cpu(), extended)
    scores["mask_entropy"] = mask_entropy(masks)
    return scores, stats, batch


# ================================================================================================================
# Figures.

PALETTE = torch.tensor([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                        [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
                        [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]]) / 255.0


def colour_segments(segments: torch.Tensor) -> torch.Tensor:
    """(..., H, W) ids -> (..., 3, H, W) colours in [0, 1]; id 0 black, 255 (ignore) white."""
    ids = segments.long()
    colours = PALETTE[ids.clamp(max=254) % len(PALETTE)]
    colours[ids == IGNORE] = 1.0
    return colours.movedim(-1, -3)


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
        if model.method == "slotdiffusion":
            slots, _ = model.slots(batch[key], 0.0)
            rows.append((model.reconstruct(batch[key], slots, steps=25) * 0.5 + 0.5).cpu())
            labels.append("reconstruction (DDIM from slots)")
        for s in range(soft.shape[1]):
            rows.append((images * soft[:, s, None] + 0.5 * (1 - soft[:, s, None])).cpu())
            labels.append(f"slot {s} mask (0-1)")
        paths.append(save_labelled_grid(rows, labels, prefix + ".png"))
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
            paths.append(save_labelled_grid(rows, labels, f"{prefix}_video{v}.png"))
    model.train(was_training)
    return paths


# ================================================================================================================
# Loading checkpoints for evaluation.

def load_for_evaluation(path: str, device):
    """(model, checkpoint dict) rebuilt from a checkpoint's own config: an OCL model (kind 'ocl') with its frozen
    VAE and DINO weights taken from the checkpoint, or a VAE (kind 'vae'). A run directory means its best.pt
    (OCL) or its latest checkpoint."""
    chosen = path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "best.pt")):
        path = chosen = os.path.join(path, "best.pt")
    state = load_checkpoint(path)
    if os.path.isdir(chosen) and state["kind"] == "ocl":  # an OCL run without best.pt: say what is evaluated instead
        print(f"note: {chosen} holds no best.pt; evaluating its latest checkpoint {state['path']} (give a "
              f"checkpoint file to choose another)", file=sys.stderr)
    # Stored paths are relative to where training ran: resolve them against the checkpoint's own location.
    out_dir = state["config"].get("out_dir", "")
    if state.get("data", {}).get("data_dir"):
        state["data"] = dict(state["data"], data_dir=resolve_stored_path(state["data"]["data_dir"], state["path"],
                                                                          out_dir))
    if state.get("vae_ckpt"):
        state["vae_ckpt"] = resolve_stored_path(state["vae_ckpt"], state["path"], out_dir)
    if state["kind"] == "vae":
        with _older_config_error(state):
            vae = msf.build_vae(state["config"])
        load_weights(vae, state["model"], state["path"])
        return vae.to(device).eval(), state
    if state["kind"] != "ocl":
        raise UserError(f"{state['path']} is a {state['kind']} checkpoint; evaluate.py takes OCL or VAE checkpoints")
    config = dict(state["config"], dino_pretrained=False, dino_weights="")  # DINO's weights are in the checkpoint
    with _older_config_error(state), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DINO is RANDOMLY")
        vae = msf.build_vae(state["vae_config"]) if state.get("vae_config") else None
        model = build_model(config, state["video"], vae)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"{state['path']} does not fit the model its own config describes "
                        f"({str(error).splitlines()[0][:200]})") from None
    return model.to(device).eval(), state


@contextlib.contextmanager
def _older_config_error(state: dict):
    """A checkpoint from an older version may lack a key its model needs now: say so in one sentence (filling it
    with today's default could rebuild a different model without a word)."""
    try:
        yield
    except KeyError as error:
        key = error.args[0] if error.args else None
        if key in state["config"] or key in (state.get("vae_config") or {}):
            raise  # not a missing config key: a bug, keep its traceback
        raise UserError(f"{state['path']} was written by an older version: its config lacks {key!r}; "
                        f"retrain, or add it to the checkpoint's config with the value it was trained with") from None


def run_name(path: str) -> str:
    """A checkpoint's label in tables and figure names: its run directory for `ckpt_*.pt` / `best.pt`, else the
    file name without `.pt`."""
    base = os.path.basename(path)
    if base == "best.pt" or (base.startswith("ckpt_") and base.endswith(".pt")):
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    return base.removesuffix(".pt")


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
        if separability_of_guidance and model.vae is not None and not model.video:
            vectors = model.guidance(batch["image"])["vectors"][0]
            scores.update(_guidance_separability(vectors, truth))
        for name, value in scores.items():
            per_sample.setdefault(name, []).append(torch.as_tensor(value, dtype=torch.float64).numpy())
        bar.update(truth.shape[0])
    bar.close()
    return {name: np.concatenate(values) for name, values in per_sample.items()}


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


def segments_at(truth: torch.Tensor, size: tuple) -> torch.Tensor:
    """Ground-truth segments (b,H,W) at a token grid (b,h,w): the majority label of each block; ignore (255) votes
    as a label of its own, so that blocks it dominates still drop out of the scores."""
    labels = truth.long()
    ignore = labels == IGNORE
    ignore_id = int(labels[~ignore].max()) + 1 if (~ignore).any() else 0
    votes = F.one_hot(labels.masked_fill(ignore, ignore_id), ignore_id + 1).permute(0, 3, 1, 2).float()
    majority = F.adaptive_avg_pool2d(votes, size).argmax(1)  # (b,h,w)
    return majority.masked_fill(majority == ignore_id, IGNORE) if ignore.any() else majority


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
# Command line.

def _format_table(header: list, rows: list) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


TABLE_KEYS = ("ari", "ari_fg", "miou", "mbo", "miou_fg", "mbo_fg", "mask_entropy")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="OCL or VAE checkpoints (files or run directories); several "
                        "OCL checkpoints (seeds) are aggregated as mean ± std")
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument("--out", default="", help="output directory (default: RUN/eval_SPLIT of the first checkpoint)")
    parser.add_argument("--data_dir", default="", help="dataset directory (default: the one the run trained on)")
    parser.add_argument("--samples", type=int, default=0, help="evaluate the first N samples only (0 = all)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--separability", action="store_true", help="object separability of the guidance "
                        "vectors (VAE checkpoints: every scale and representation; OCL: its guidance at scale 1)")
    parser.add_argument("--compare", action="store_true", help="one table row per checkpoint instead of mean ± std")
    parser.add_argument("--figures", type=int, default=8, help="samples drawn in the figures (0 = none)")
    args = parser.parse_args(argv)
    for flag, value, least in (("samples", args.samples, 0), ("batch_size", args.batch_size, 1),
                               ("num_workers", args.num_workers, 0), ("figures", args.figures, 0)):
        if value < least:
            raise UserError(f"--{flag} must be at least {least}, got {value}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("evaluate.py runs in one process: start it with python, not torchrun")
    d = setup_distributed(args.device)
    first = args.checkpoints[0]
    out = args.out or os.path.join(first if os.path.isdir(first) else os.path.dirname(first) or ".",
                                   f"eval_{args.split}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory; give a directory for the metrics and figures")
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
                 "split": split_path}
        if state["kind"] == "vae":
            if loader.dataset.dataset.is_video:
                raise UserError("separability is measured on images; give an image dataset with --data_dir")
            figure = os.path.join(out, f"{name}_code_maps.png") if args.figures else ""
            entry["separability"] = vae_separability(model, loader, d.device, args.samples or len(loader.dataset),
                                                     figure)
        else:
            scores = evaluate_ocl(model, loader, d.device, args.separability, f"evaluate {name}")
            for key, values in scores.items():
                entry[key] = mean_percent(values) if not key.startswith("sep_") else float(np.nanmean(values))
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
        lines.append(_format_table(["run"] + keys, rows))
        lines.append("ari, ari_fg, miou, mbo: percent, background counted as a segment (README, 'Evaluation "
                     "protocol'); miou_fg, mbo_fg: background excluded (DINOSAUR's convention); mask_entropy: "
                     "entropy of the soft masks over slots, % of ln(slots), 100 = uniform" +
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
    return {"text": "\n\n".join(lines), "json": payload}


if __name__ == "__main__":
    run_main(main)
