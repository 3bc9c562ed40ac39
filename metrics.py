"""Segmentation metrics of slot masks against ground-truth segments, and the object separability of guidance
vectors (protocol: README, "Evaluation protocol"). evaluate.py reports them and train_ocl.py validates with them;
neither needs the other.

  ari(pred, true, foreground_only=False)     adjusted Rand index (ARI, and ARIfg with foreground_only=True)
  miou(pred, true, ignore_background=False)  mean IoU under the Hungarian matching of segments
  mbo(pred, true, ignore_background=False)   mean best overlap
  mask_entropy(masks)                        how undecided the soft slot masks are
  background_split(pred, true)               where the background went: its best IoU and the slots sharing it
  mbo_by_size(pred, true, edges)             mBO of small / medium / large objects (area as a share of the image)
  grid_segments(height, width, cells)        a fixed grid of cells, the same for every image: what a model scores
                                             by cutting the image into places rather than objects
  separability(vectors, k)                   KMeans inter/intra-cluster distances of guidance vectors (Table 4)
  score_batch(model, batch, device)          every metric of one batch run through an OCL model

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

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from devices import autocast
from model import masks_to_segments

BACKGROUND = 0
IGNORE = 255


# ================================================================================================================
# Segments: contingency tables (one bincount for the whole batch) and the ground truth at a token grid.

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


def segments_at(truth: torch.Tensor, size: tuple) -> torch.Tensor:
    """Ground-truth segments (b,H,W) at a token grid (b,h,w): the majority label of each block; ignore (255) votes
    as a label of its own, so that blocks it dominates still drop out of the scores."""
    labels = truth.long()
    ignore = labels == IGNORE
    ignore_id = int(labels[~ignore].max()) + 1 if (~ignore).any() else 0
    votes = F.one_hot(labels.masked_fill(ignore, ignore_id), ignore_id + 1).permute(0, 3, 1, 2).float()
    majority = F.adaptive_avg_pool2d(votes, size).argmax(1)  # (b,h,w)
    return majority.masked_fill(majority == ignore_id, IGNORE) if ignore.any() else majority


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

def _iou_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """IoU of every (true, predicted) segment pair (B, T, P) from a contingency table; 0 where the union is empty."""
    union = counts.sum(2, keepdim=True) + counts.sum(1, keepdim=True) - counts
    return torch.where(union > 0, counts / union.clamp(min=1), torch.zeros_like(counts))


def _iou_table(pred: torch.Tensor, true: torch.Tensor, ignore_background: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU of every (true, predicted) segment pair (B, T, P), which true segments are scored (B, T) and which
    predicted segments occur (B, P). IoU of an empty union is 0."""
    counts, true_ids = contingency(pred, true)  # background pixels always kept: predictions are never filtered
    true_area = counts.sum(2)  # (B, T)
    pred_area = counts.sum(1)  # (B, P)
    iou = _iou_of_counts(counts)
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


SIZE_GROUPS = ("small", "medium", "large")


def _object_groups(counts: torch.Tensor, true_ids: torch.Tensor, num_pixels: int, edges: tuple) -> torch.Tensor:
    """The size group of every (sample, true segment) of a contingency table (B, T, P): 0 / 1 / 2 for small /
    medium / large by the object's pixel count as a fraction of the row's `num_pixels`, -1 where the segment is
    the background or absent from the sample."""
    low, high = edges
    if not 0 < low < high:
        raise ValueError(f"edges must be two increasing fractions of the image, got {edges}")
    area = counts.sum(2) / max(num_pixels, 1)  # (B, T)
    group = (area >= low).long() + (area >= high).long()
    absent = (counts.sum(2) == 0) | (true_ids == BACKGROUND)[None]
    return group.masked_fill(absent, -1)


def mbo_by_size(pred: torch.Tensor, true: torch.Tensor, edges: tuple = (0.01, 0.05)) -> dict:
    """mBO of the objects grouped by size: {"small", "medium", "large"} -> (B,) float64, each the mean best-overlap
    IoU (as in `mbo`) of a sample's ground-truth objects whose area, as a fraction of the row's N pixels, is below
    edges[0] (small), from edges[0] to below edges[1] (medium), or edges[1] and above (large). The background is
    not an object here; its pixels stay in the predicted segments, so a slot spilling onto it loses IoU. NaN where
    a sample has no object in the group. `objects_by_size` counts the objects behind each mean."""
    counts, true_ids = contingency(pred, true)  # (B, T, P)
    group = _object_groups(counts, true_ids, pred.shape[1], edges)  # (B, T)
    best = _iou_of_counts(counts).max(2).values if counts.shape[2] else torch.zeros(group.shape, dtype=torch.float64)
    scores = {}
    for index, name in enumerate(SIZE_GROUPS):
        member = group == index
        number = member.sum(1)
        total = torch.where(member, best, torch.zeros_like(best)).sum(1)
        scores[name] = torch.where(number > 0, total / number.clamp(min=1), torch.full_like(total, math.nan))
    return scores


def objects_by_size(true: torch.Tensor, edges: tuple = (0.01, 0.05)) -> dict:
    """How many ground-truth objects of each sample fall in each size group of `mbo_by_size`: {"small", "medium",
    "large"} -> (B,) int64."""
    counts, true_ids = contingency(torch.zeros_like(true), true)
    group = _object_groups(counts, true_ids, true.shape[1], edges)
    return {name: (group == index).sum(1) for index, name in enumerate(SIZE_GROUPS)}


def background_split(pred: torch.Tensor, true: torch.Tensor, share: float = 0.1) -> dict:
    """Where the background went, per sample (B,) float64:
      bg_iou:    the best IoU of the background segment with one predicted segment (1 = one slot is exactly the
                 background);
      bg_slots:  how many predicted segments hold at least `share` of the background's pixels (1 = one slot took
                 it, 3 = cut into three large pieces).
    ARI with the background counted and mBO reward a background kept in one slot; these two say whether a low score
    comes from the background being split. Same pixel conventions as `mbo`; NaN where a sample has no background
    pixel to score."""
    counts, true_ids = contingency(pred, true)  # (B, T, P)
    nan = torch.full(counts.shape[:1], math.nan, dtype=torch.float64, device=counts.device)
    row = (true_ids == BACKGROUND).nonzero().flatten()
    if len(row) == 0 or counts.shape[2] == 0:  # no background pixel in the whole batch, or no pixel at all
        return {"bg_iou": nan, "bg_slots": nan.clone()}
    background = counts[:, row[0]]  # (B, P): background pixels in each predicted segment
    area = background.sum(1)  # (B,)
    iou = _iou_of_counts(counts)[:, row[0]]  # (B, P)
    slots = (background >= share * area[:, None]).sum(1).double()
    present = area > 0
    return {"bg_iou": torch.where(present, iou.max(1).values, nan),
            "bg_slots": torch.where(present, slots, nan)}


def grid_shape(cells: int) -> tuple:
    """(rows, cols) of the most nearly square grid of exactly `cells` cells, rows <= cols (7 -> 1 x 7)."""
    if cells < 1:
        raise ValueError(f"a grid needs at least one cell, got {cells}")
    rows = max(r for r in range(1, math.isqrt(cells) + 1) if cells % r == 0)
    return rows, cells // rows


def grid_segments(height: int, width: int, cells: int) -> torch.Tensor:
    """(height, width) int64 ids of a fixed grid (`grid_shape(cells)`, row-major ids), pixel (y, x) in row
    floor(y * rows / height) and column floor(x * cols / width): a segmentation that knows nothing of the image.
    Scored like a model's (`segmentation_scores`), with as many cells as the model has slots, it is the bar a model
    must clear to show it separates objects rather than places: objects spread over the image land in different
    cells, so on scenes of a few objects a fixed grid's ARIfg is high (evaluate.py reports it beside every run)."""
    rows, cols = grid_shape(cells)
    row = torch.arange(height, dtype=torch.int64) * rows // height
    col = torch.arange(width, dtype=torch.int64) * cols // width
    return row[:, None] * cols + col[None, :]


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
    from sklearn.cluster import KMeans  # here, not with the module: a second of imports no trainer needs

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
    background segment (DINOSAUR's convention), for comparison with numbers reported that way, and where the
    background went (`background_split`)."""
    scores = {"ari": ari(pred, true), "ari_fg": ari(pred, true, foreground_only=True),
              "miou": miou(pred, true), "mbo": mbo(pred, true)}
    if extended:
        scores["miou_fg"] = miou(pred, true, ignore_background=True)
        scores["mbo_fg"] = mbo(pred, true, ignore_background=True)
        scores.update(background_split(pred, true))
        scores.update({f"mbo_{name}": value for name, value in mbo_by_size(pred, true).items()})
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
