"""metrics.py against independent oracles: sklearn's adjusted_rand_score per sample, naive per-pair
IoU loops matched by scipy's Hungarian solver (the one miou calls) and by brute force over permutations,
hand-checked tables, the edge cases (empty foreground, single object, negative ARI, all-ignore samples), video
flattening, and object separability on synthetic clusters."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_assignment
from scipy.special import gammaln
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import adjusted_rand_score

from metrics import (ari, background_split, grid_segments, grid_shape, mask_entropy, mbo, mbo_by_size, mean_percent,
                     miou, objects_by_size, segments_at, separability, separability_batch)

TOL = 1e-6


def ids(rows) -> torch.Tensor:
    """A literal (B, N) batch of segment ids."""
    return torch.tensor(rows, dtype=torch.int64)


def random_batch(generator: np.random.Generator, batch: int, pixels: int, true_choices, pred_choices):
    """Random (pred, true) label maps; segment sizes vary because each sample draws its own label frequencies."""
    pred, true = [], []
    for _ in range(batch):
        true_p = generator.dirichlet(np.full(len(true_choices), 0.7))
        pred_p = generator.dirichlet(np.full(len(pred_choices), 0.7))
        true.append(generator.choice(true_choices, size=pixels, p=true_p))
        pred.append(generator.choice(pred_choices, size=pixels, p=pred_p))
    return torch.tensor(np.array(pred), dtype=torch.int64), torch.tensor(np.array(true), dtype=torch.int64)


# ------------------------------------------------------------------------------------------------ oracles

def sklearn_ari(pred_row, true_row, foreground_only=False) -> float:
    """adjusted_rand_score on the scored pixels of one sample; NaN when none is left."""
    pred_row, true_row = np.asarray(pred_row), np.asarray(true_row)
    keep = true_row != 255
    if foreground_only:
        keep &= true_row != 0
    if not keep.any():
        return math.nan
    return adjusted_rand_score(true_row[keep], pred_row[keep])


def naive_iou_table(pred_row, true_row, ignore_background=False) -> np.ndarray:
    """IoU of every scored true segment with every predicted segment, one pair of boolean masks at a time."""
    pred_row, true_row = np.asarray(pred_row), np.asarray(true_row)
    keep = true_row != 255
    true_ids = [t for t in np.unique(true_row[keep]) if not (ignore_background and t == 0)]
    pred_ids = np.unique(pred_row[keep])
    table = np.zeros((len(true_ids), len(pred_ids)))
    for i, t in enumerate(true_ids):
        for j, p in enumerate(pred_ids):
            true_mask, pred_mask = keep & (true_row == t), keep & (pred_row == p)
            union = (true_mask | pred_mask).sum()
            table[i, j] = (true_mask & pred_mask).sum() / union if union else 0.0
    return table


def scipy_miou(pred_row, true_row, ignore_background=False) -> float:
    table = naive_iou_table(pred_row, true_row, ignore_background)
    if table.shape[0] == 0:
        return math.nan
    rows, cols = scipy_assignment(table, maximize=True)
    return table[rows, cols].sum() / table.shape[0]


def brute_force_miou(pred_row, true_row, ignore_background=False) -> float:
    """Best one-to-one matching over all permutations; zero columns stand for 'left unmatched'."""
    table = naive_iou_table(pred_row, true_row, ignore_background)
    num_true, num_pred = table.shape
    if num_true == 0:
        return math.nan
    padded = np.concatenate([table, np.zeros((num_true, num_true))], axis=1)
    best = max(sum(padded[i, j] for i, j in enumerate(perm))
               for perm in itertools.permutations(range(num_pred + num_true), num_true))
    return best / num_true


def naive_mbo(pred_row, true_row, ignore_background=False) -> float:
    table = naive_iou_table(pred_row, true_row, ignore_background)
    return table.max(1).mean() if table.shape[0] else math.nan


def naive_background_split(pred_row, true_row, share=0.1) -> tuple:
    """Best IoU of the background with one predicted segment and the number of segments holding >= `share` of
    it, by a loop over sets of pixel positions (ignore pixels dropped)."""
    kept = [i for i in range(len(true_row)) if true_row[i] != 255]
    background = {i for i in kept if true_row[i] == 0}
    if not background:
        return math.nan, math.nan
    best, slots = 0.0, 0
    for segment_id in {pred_row[i] for i in kept}:
        segment = {i for i in kept if pred_row[i] == segment_id}
        best = max(best, len(segment & background) / len(segment | background))
        slots += len(segment & background) >= share * len(background)
    return best, slots


def naive_mbo_by_size(pred_row, true_row, edges=(0.01, 0.05)) -> tuple:
    """Per size group (small, medium, large): the mean over the row's objects (true ids other than 0 and 255) of
    the best IoU with one predicted segment, each object grouped by its pixel count over the row's length, by a loop
    over sets of pixel positions; and the number of objects in each group."""
    kept = [i for i in range(len(true_row)) if true_row[i] != 255]
    segments = {s: {i for i in kept if pred_row[i] == s} for s in {pred_row[i] for i in kept}}
    groups = {"small": [], "medium": [], "large": []}
    for object_id in {true_row[i] for i in kept} - {0}:
        pixels = {i for i in kept if true_row[i] == object_id}
        share = len(pixels) / len(true_row)
        name = "small" if share < edges[0] else "medium" if share < edges[1] else "large"
        groups[name].append(max(len(pixels & s) / len(pixels | s) for s in segments.values()))
    return ({name: (sum(v) / len(v) if v else math.nan) for name, v in groups.items()},
            {name: len(v) for name, v in groups.items()})


def assert_close(got: torch.Tensor, expected) -> None:
    """Equal to TOL, NaN where the oracle is NaN."""
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), np.asarray(expected, dtype=np.float64), rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------------------ hand-checked

# 2x4 image (rows written one after the other): background left, object 1 top right, object 2 bottom right;
# slot 5 covers the background exactly, slot 7 both objects.
HAND_TRUE = [0, 0, 1, 1,
             0, 0, 2, 2]
HAND_PRED = [5, 5, 7, 7,
             5, 5, 7, 7]
# A second 2x4 image with an ignore pixel: slot 4 covers the object and spills onto one background pixel.
SPILL_TRUE = [0, 0, 0, 1,
              255, 1, 1, 1]
SPILL_PRED = [3, 3, 4, 4,
              4, 4, 4, 4]


@pytest.mark.parametrize("metric, kwargs, expected", [
    # pairs: 8 same-both, true pairs 6+1+1=8, pred pairs 6+6=12 of C(8,2)=28: (8-96/28)/(10-96/28) = 16/23
    (ari, {}, 16 / 23),
    # foreground: objects 1 and 2 in one slot: 2 same-both, expected 2*6/6 = 2 -> (2-2)/(4-2) = 0
    (ari, {"foreground_only": True}, 0.0),
    # IoU rows bg/obj1/obj2 x slots 5/7: [[1, 0], [0, 1/2], [0, 1/2]]; matching 1 + 1/2 + 0 -> 1/2
    (miou, {}, 1 / 2),
    # without the background row: obj1-slot7 1/2, obj2-slot5 0 -> 1/4
    (miou, {"ignore_background": True}, 1 / 4),
    # best per row: 1, 1/2, 1/2 -> 2/3
    (mbo, {}, 2 / 3),
    (mbo, {"ignore_background": True}, 1 / 2),
])
def test_hand_checked_table(metric, kwargs, expected):
    assert_close(metric(ids([HAND_PRED]), ids([HAND_TRUE]), **kwargs), [expected])


@pytest.mark.parametrize("metric, kwargs, expected", [
    # 7 scored pixels, table [[2, 1], [0, 4]]: same-both 1+6=7, true 3+6=9, pred 1+10=11 of 21
    # -> (7-99/21)/(10-99/21) = 16/37
    (ari, {}, 16 / 37),
    # the object alone, all in slot 4: identical one-cluster partitions -> 1 (sklearn, OCLF)
    (ari, {"foreground_only": True}, 1.0),
    # IoU bg-slot3 2/3, bg-slot4 1/7, obj-slot4 4/(4+5-4) = 4/5 -> (2/3 + 4/5)/2 = 11/15
    (miou, {}, 11 / 15),
    (mbo, {}, 11 / 15),
    # background pixel predicted as slot 4 stays in its union: 4/5, not 1
    (miou, {"ignore_background": True}, 4 / 5),
    (mbo, {"ignore_background": True}, 4 / 5),
])
def test_hand_checked_ignore_and_spill(metric, kwargs, expected):
    assert_close(metric(ids([SPILL_PRED]), ids([SPILL_TRUE]), **kwargs), [expected])


def test_negative_ari():
    # Each slot takes half of each object: no pair agrees beyond chance. (0 - 2/3)/(2 - 2/3) = -1/2.
    pred, true = ids([[0, 1, 0, 1]]), ids([[1, 1, 2, 2]])
    got = ari(pred, true)
    assert got.item() < 0
    assert_close(got, [-0.5])
    assert_close(got, [adjusted_rand_score(true[0].numpy(), pred[0].numpy())])
    assert_close(ari(pred, true, foreground_only=True), [-0.5])


def test_perfect_prediction_under_any_relabelling():
    true = ids([[0, 0, 1, 1, 2, 2, 3, 255]])
    pred = ids([[-4, -4, 9, 9, 2 ** 40, 2 ** 40, 0, 1]])  # a bijection of the ids; the ignore pixel is free
    for foreground_only in (False, True):
        assert_close(ari(pred, true, foreground_only=foreground_only), [1.0])
    for ignore_background in (False, True):
        assert_close(miou(pred, true, ignore_background=ignore_background), [1.0])
        assert_close(mbo(pred, true, ignore_background=ignore_background), [1.0])


def test_single_object_and_empty_foreground():
    true = ids([[0, 0, 0, 0, 0, 3, 3, 0],      # one object
                [0, 0, 0, 0, 0, 0, 0, 0],      # no foreground
                [0, 0, 255, 255, 0, 0, 0, 0]])  # no foreground, some ignore
    pred = ids([[1, 1, 1, 2, 2, 2, 2, 1],
                [1, 1, 2, 2, 1, 1, 1, 1],
                [1, 1, 1, 1, 1, 1, 1, 1]])
    fg = ari(pred, true, foreground_only=True)
    assert fg[0].item() == 1.0 and torch.isnan(fg[1:]).all()
    assert_close(ari(pred, true, foreground_only=True, empty_foreground=1.0), [1.0, 1.0, 1.0])
    assert_close(ari(pred, true), [sklearn_ari(p, t) for p, t in zip(pred, true)])
    # one true segment and one slot over every scored pixel: identical partitions
    assert ari(pred, true)[2].item() == 1.0
    assert torch.isnan(miou(pred, true, ignore_background=True)[1:]).all()
    assert torch.isnan(mbo(pred, true, ignore_background=True)[1:]).all()
    assert_close(miou(pred, true), [scipy_miou(p, t) for p, t in zip(pred, true)])


def test_all_ignore_sample_is_nan():
    true = ids([[255, 255, 255, 255], [0, 1, 1, 255]])
    pred = ids([[0, 1, 2, 3], [0, 1, 1, 1]])
    for scores in (ari(pred, true), ari(pred, true, foreground_only=True), miou(pred, true), mbo(pred, true),
                   miou(pred, true, ignore_background=True), mbo(pred, true, ignore_background=True)):
        assert math.isnan(scores[0].item()) and scores[1].item() == 1.0
    assert ari(pred, true, empty_foreground=1.0)[0].item() == 1.0
    assert mean_percent(miou(pred, true)) == 100.0


def test_empty_batch_and_no_pixels():
    for metric in (ari, miou, mbo):
        assert metric(ids([[]] * 3), ids([[]] * 3)).isnan().all()
        assert metric(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long)).shape == (0,)


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="segment ids"):
        ari(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        miou(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ random vs oracles

TRUE_CHOICES = [0, 1, 2, 3, 7, 254, 255]
PRED_CHOICES = [-3, 0, 1, 5, 11, 2 ** 40]


@pytest.mark.parametrize("foreground_only", [False, True])
def test_ari_matches_sklearn(foreground_only):
    generator = np.random.default_rng(1 + foreground_only)
    for pixels in (1, 2, 5, 64, 777):
        pred, true = random_batch(generator, 24, pixels, TRUE_CHOICES, PRED_CHOICES)
        expected = [sklearn_ari(p, t, foreground_only) for p, t in zip(pred.numpy(), true.numpy())]
        assert_close(ari(pred, true, foreground_only=foreground_only), expected)


def test_ari_matches_sklearn_on_near_perfect_and_few_segments():
    """Predictions that are a relabelled ground truth with a few pixels flipped; ARI near 1 must stay exact."""
    generator = np.random.default_rng(3)
    _, true = random_batch(generator, 16, 32 * 32, [0, 1, 2, 3, 255], [0])
    relabel = torch.tensor([9, 4, 6, 2] + [0] * 252)
    pred = relabel[true.clamp(max=255)]
    flips = torch.from_numpy(generator.random(pred.shape) < 0.02)
    pred[flips] = 7
    for foreground_only in (False, True):
        expected = [sklearn_ari(p, t, foreground_only) for p, t in zip(pred.numpy(), true.numpy())]
        assert_close(ari(pred, true, foreground_only=foreground_only), expected)


@pytest.mark.parametrize("ignore_background", [False, True])
def test_miou_and_mbo_match_naive_loops(ignore_background):
    generator = np.random.default_rng(4 + ignore_background)
    pred, true = random_batch(generator, 32, 100, TRUE_CHOICES, PRED_CHOICES)
    pred_rows, true_rows = pred.numpy(), true.numpy()
    assert_close(miou(pred, true, ignore_background=ignore_background),
                 [scipy_miou(p, t, ignore_background) for p, t in zip(pred_rows, true_rows)])
    assert_close(mbo(pred, true, ignore_background=ignore_background),
                 [naive_mbo(p, t, ignore_background) for p, t in zip(pred_rows, true_rows)])


def test_background_split_matches_a_naive_loop():
    generator = np.random.default_rng(12)
    for pixels in (1, 3, 40, 300):
        pred, true = random_batch(generator, 20, pixels, TRUE_CHOICES, PRED_CHOICES)
        for share in (0.1, 0.4):
            expected = [naive_background_split(p, t, share) for p, t in zip(pred.tolist(), true.tolist())]
            got = background_split(pred, true, share)
            assert_close(got["bg_iou"], [e[0] for e in expected])
            assert_close(got["bg_slots"], [e[1] for e in expected])


@pytest.mark.parametrize("edges", [(0.01, 0.05), (0.05, 0.2), (0.1, 0.11)])
def test_mbo_by_size_matches_a_naive_loop(edges):
    generator = np.random.default_rng(7)
    for pixels in (1, 5, 60, 400):
        # many small segments and a few large ones, with ignore pixels and ids that are not contiguous
        pred, true = random_batch(generator, 16, pixels, [0, 1, 2, 3, 5, 9, 17, 33, 255], [0, 2, 3, 4, 7, 11])
        expected = [naive_mbo_by_size(p, t, edges) for p, t in zip(pred.tolist(), true.tolist())]
        got, numbers = mbo_by_size(pred, true, edges), objects_by_size(true, edges)
        for name in ("small", "medium", "large"):
            assert_close(got[name], [e[0][name] for e in expected])
            assert numbers[name].tolist() == [e[1][name] for e in expected]


def test_mbo_by_size_by_hand():
    # 200 pixels a row: object 1 has 1 pixel (0.5 %, small), object 2 4 pixels (2 %, medium), object 3 40 (20 %,
    # large); the rest background. Slot 7 is object 2 plus 4 background pixels, slot 8 objects 1 and 3 together.
    true = torch.zeros(2, 200, dtype=torch.int64)
    true[:, 0], true[:, 1:5], true[:, 5:45] = 1, 2, 3
    pred = torch.full((2, 200), 9, dtype=torch.int64)
    pred[0, 1:5], pred[0, 45:49], pred[0, 0], pred[0, 5:45] = 7, 7, 8, 8
    pred[1] = 9  # everything in one slot
    true[1, 100:110] = 255  # ignore pixels are neither object nor background
    got = mbo_by_size(pred, true)
    assert_close(got["small"], [1 / 41, 1 / 190])
    assert_close(got["medium"], [4 / 8, 4 / 190])
    assert_close(got["large"], [40 / 41, 40 / 190])
    assert {k: v.tolist() for k, v in objects_by_size(true).items()} == {"small": [1, 1], "medium": [1, 1],
                                                                         "large": [1, 1]}
    # no object in a group is NaN, not 0; a background-only row has no object at all
    only_large = mbo_by_size(ids([[0, 0, 1, 1], [0, 0, 0, 0]]), ids([[0, 0, 1, 1], [0, 0, 0, 0]]))
    assert torch.isnan(only_large["small"]).all() and torch.isnan(only_large["medium"]).all()
    assert_close(only_large["large"], [1.0, math.nan])
    with pytest.raises(ValueError):
        mbo_by_size(pred, true, edges=(0.05, 0.01))


def test_background_split_by_hand():
    # background (4 pixels) in slot 5 exactly / split 3:1 between slots 5 and 6 / ignored pixels left out
    true = ids([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 255, 255, 1, 1]])
    pred = ids([[5, 5, 5, 5, 6, 6], [5, 5, 5, 6, 6, 6], [5, 6, 6, 6, 5, 5]])
    got = background_split(pred, true)
    assert_close(got["bg_iou"], [1.0, 3 / 4, 1 / 2])  # third: background {0, 1}, slot 6 {1} among scored
    assert_close(got["bg_slots"], [1, 2, 2])
    nothing = background_split(ids([[3, 4], [3, 3]]), ids([[1, 2], [255, 255]]))
    assert torch.isnan(nothing["bg_iou"]).all() and torch.isnan(nothing["bg_slots"]).all()


@pytest.mark.parametrize("ignore_background", [False, True])
def test_miou_matches_brute_force(ignore_background):
    """Small cases where permutations are cheap, with more true segments than slots and the reverse."""
    generator = np.random.default_rng(6 + ignore_background)
    for true_choices, pred_choices in [([0, 1, 2, 3, 255], [0, 1]), ([0, 1, 2], [0, 1, 2, 3, 4]),
                                       ([0, 1, 2, 3], [5, 6, 7, 8])]:
        pred, true = random_batch(generator, 12, 12, true_choices, pred_choices)
        expected = [brute_force_miou(p, t, ignore_background) for p, t in zip(pred.numpy(), true.numpy())]
        assert_close(miou(pred, true, ignore_background=ignore_background), expected)


def test_hungarian_differs_from_best_overlap_when_slots_are_shared():
    # Slot 0 is the best overlap of both objects; the matching may use it only once.
    true = ids([[1, 1, 1, 1, 2, 2, 2, 2]])
    pred = ids([[1, 0, 0, 0, 0, 0, 0, 2]])
    # IoU obj1/obj2 with slot 0: 3/(4+6-3) = 3/7 each; obj1-slot1 and obj2-slot2: 1/4
    assert_close(mbo(pred, true), [3 / 7])
    assert_close(miou(pred, true), [(3 / 7 + 1 / 4) / 2])  # = 19/56
    assert_close(miou(pred, true), [brute_force_miou(pred[0], true[0])])


def test_batch_rows_are_independent():
    """Ids are made compact over the whole batch; a sample's score must not depend on its neighbours."""
    generator = np.random.default_rng(8)
    pred, true = random_batch(generator, 6, 50, TRUE_CHOICES, PRED_CHOICES)
    for metric, kwargs in [(ari, {}), (ari, {"foreground_only": True}), (miou, {}), (mbo, {}),
                           (miou, {"ignore_background": True})]:
        together = metric(pred, true, **kwargs)
        alone = torch.cat([metric(pred[i:i + 1], true[i:i + 1], **kwargs) for i in range(len(pred))])
        torch.testing.assert_close(together, alone, equal_nan=True, rtol=0, atol=1e-12)


def test_video_is_scored_with_time_flattened():
    """Slots swap identities between two frames: each frame alone is perfect, the video is not."""
    frame_true = [0, 0, 1, 1, 2, 2]
    video_true = ids([frame_true + frame_true])  # (1, T*N)
    video_pred = ids([[0, 0, 1, 1, 2, 2] + [0, 0, 2, 2, 1, 1]])
    frames_true, frames_pred = video_true.view(2, 6), video_pred.view(2, 6)
    for metric in (ari, miou, mbo):
        assert_close(metric(frames_pred, frames_true), [1.0, 1.0])
        assert metric(video_pred, video_true).item() < 1.0 - 0.1
    assert_close(ari(video_pred, video_true), [adjusted_rand_score(video_true[0].numpy(), video_pred[0].numpy())])
    # objects 1 and 2 each split 2/2 over slots 1 and 2: IoU 2/6 for any match; background 1 -> (1 + 1/3 + 1/3)/3
    assert_close(miou(video_pred, video_true), [5 / 9])


def test_mean_percent():
    assert mean_percent(torch.tensor([0.5, math.nan, 1.0], dtype=torch.float64)) == pytest.approx(75.0)
    assert mean_percent([0.25]) == 25.0
    assert math.isnan(mean_percent([math.nan, math.nan]))
    assert math.isnan(mean_percent([]))


@pytest.mark.parametrize("video", [False, True])
def test_mask_entropy_matches_scipy_per_position(video):
    generator = torch.Generator().manual_seed(0)
    shape = (3, 2, 5, 4, 6) if video else (3, 5, 4, 6)  # (B, [T,] S, h, w)
    masks = torch.rand(shape, generator=generator) ** 4  # uneven, and not normalised
    masks[0] = 1.0  # sample 0: uniform over slots everywhere
    got = mask_entropy(masks)
    for b in range(3):
        per_position = masks[b].reshape(-1, 5, 24) if video else masks[b].reshape(1, 5, 24)
        values = [scipy_entropy(per_position[t, :, i].double().numpy()) / math.log(5)
                  for t in range(per_position.shape[0]) for i in range(24)]
        assert got[b].item() == pytest.approx(float(np.mean(values)), rel=1e-9)
    assert got[0].item() == pytest.approx(1.0)
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 4, 6), generator=generator), 5).permute(0, 3, 1, 2)
    assert mask_entropy(one_hot.float()).abs().max() < 1e-12  # each position owned by one slot


# ------------------------------------------------------------------------------------------------ separability

def expected_gaussian_radius(sigma: float, dims: int) -> float:
    """E||x - mu|| for x ~ N(mu, sigma^2 I_d): sigma * sqrt(2) * Gamma((d+1)/2) / Gamma(d/2)."""
    return sigma * math.sqrt(2) * math.exp(gammaln((dims + 1) / 2) - gammaln(dims / 2))


def blobs(generator, centres, sigma, per_blob):
    return np.concatenate([c + sigma * generator.normal(size=(per_blob, len(c))) for c in centres])


def test_separability_on_known_clusters():
    generator = np.random.default_rng(12)
    dims, sigma = 8, 0.05
    centres = np.zeros((3, dims))
    centres[0, 0], centres[1, 1], centres[2, :2] = 1.0, 3.0, (2.0, 2.0)
    vectors = blobs(generator, centres, sigma, 400)
    result = separability(torch.from_numpy(vectors).float(), k=3)
    centre_distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(centres, 2)]
    assert result["k"] == 3
    assert result["inter"] == pytest.approx(np.mean(centre_distances), rel=0.01)
    assert result["intra"] == pytest.approx(expected_gaussian_radius(sigma, dims), rel=0.03)
    # tighter blobs: same inter, smaller intra (Table 4's arrows)
    tighter = separability(blobs(generator, centres, sigma / 5, 400), k=3)
    assert tighter["inter"] == pytest.approx(result["inter"], rel=0.01) and tighter["intra"] < result["intra"] / 4


def test_separability_clips_k_to_distinct_vectors():
    codes = np.array([[0.0, 0.0], [3.0, 4.0]])
    vectors = codes[np.arange(20) % 2]  # 20 vectors, 2 distinct codes
    result = separability(vectors, k=5)
    assert result["k"] == 2 and result["inter"] == pytest.approx(5.0) and result["intra"] == pytest.approx(0.0)
    single = separability(np.ones((10, 3)), k=4)
    assert single["k"] == 1 and math.isnan(single["inter"]) and single["intra"] == pytest.approx(0.0)
    empty = separability(vectors, k=0)
    assert math.isnan(empty["inter"]) and math.isnan(empty["intra"])


def test_separability_batch_matches_per_image():
    generator = np.random.default_rng(13)
    vectors = torch.from_numpy(generator.normal(size=(3, 64, 4)))
    vectors[1, :32] += 5.0
    ks = torch.tensor([2, 3, 1])
    batch = separability_batch(vectors, ks, seed=1)
    assert batch["inter"].dtype == np.float64 and batch["intra"].shape == (3,)
    for i in range(3):
        single = separability(vectors[i], int(ks[i]), seed=1)
        np.testing.assert_allclose([batch["inter"][i], batch["intra"][i]], [single["inter"], single["intra"]])
    assert math.isnan(batch["inter"][2]) and batch["k"].tolist() == [2, 3, 1]


def test_segments_at_token_grid_is_the_block_majority():
    generator = np.random.default_rng(14)
    truth = torch.from_numpy(generator.choice([0, 1, 2, 255], size=(2, 16, 16), p=[0.4, 0.3, 0.2, 0.1]))
    truth[0, :8, :8] = 1  # a whole block of one object
    truth[1, 8:12, 8:12] = 255  # a block that is ignore only
    grid = segments_at(truth, (4, 4))
    for b, i, j in itertools.product(range(2), range(4), range(4)):
        block = truth[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1).tolist()
        counts = {label: block.count(label) for label in set(block)}
        best = max(counts.values())
        assert counts.get(int(grid[b, i, j]), 0) == best  # a most frequent label of the block (ties: any)
    assert (grid[0, :2, :2] == 1).all() and grid[1, 2, 2] == 255


def test_cluster_labels_follow_the_vectors_and_object_ari_cannot_reward_collapse():
    # Two guidance maps of one 8x8 image with a square object: one codes the object, the other uses two codes in
    # stripes that ignore it. Both have intra 0 (as many clusters as codes), so the inter/intra ratio cannot tell
    # them apart; the clusters' ARI against the objects can.
    truth = torch.zeros(1, 8, 8, dtype=torch.long)
    truth[0, 2:6, 2:6] = 1
    follows = torch.where(truth[0, ..., None] == 1, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    stripes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[torch.arange(8) % 2][None].expand(8, 8, 2)
    scores = []
    for vectors in (follows, stripes):
        result = separability_batch(vectors.reshape(1, 64, 2), [2], return_labels=True)
        labels = result["labels"][0]
        flat = vectors.reshape(64, 2)
        for p, q in itertools.combinations(range(0, 64, 7), 2):  # equal vectors share a cluster
            assert (labels[p] == labels[q]) == bool(torch.equal(flat[p], flat[q]))
        assert result["intra"][0] == pytest.approx(0.0) and result["distinct"][0] == 2
        scores.append(float(ari(torch.as_tensor(labels)[None], truth.reshape(1, 64))[0]))
    assert scores[0] == pytest.approx(1.0) and abs(scores[1]) < 0.1


def test_grid_segments_by_hand():
    assert grid_segments(4, 6, 6).tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2],
                                               [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]
    assert grid_segments(3, 3, 1).tolist() == [[0, 0, 0]] * 3
    assert [grid_shape(k) for k in (1, 4, 6, 7, 8, 12)] == [(1, 1), (2, 2), (2, 3), (1, 7), (2, 4), (3, 4)]
    with pytest.raises(ValueError, match="at least one cell"):
        grid_shape(0)


@pytest.mark.parametrize("cells", range(1, 13))
def test_grid_segments_are_the_most_square_grid_of_rectangles(cells):
    """Against a brute-force search of the factor pairs and a cell-by-cell check of the pixels: exactly `cells`
    ids, each an axis-aligned rectangle, the rectangles' sides differing by at most one pixel, ids row-major."""
    height, width = 13, 17
    grid = grid_segments(height, width, cells).numpy()
    rows, cols = min(((r, cells // r) for r in range(1, cells + 1) if cells % r == 0 and r <= cells // r),
                     key=lambda pair: pair[1] - pair[0])
    assert sorted(np.unique(grid).tolist()) == list(range(cells))
    heights, widths = set(), set()
    for cell in range(cells):
        ys, xs = np.nonzero(grid == cell)
        box = grid[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert (box == cell).all()  # a filled rectangle
        heights.add(ys.max() - ys.min() + 1), widths.add(xs.max() - xs.min() + 1)
        assert (ys.min(), xs.min()) == (min(y for y in range(height) if (grid[y] == cell).any()),
                                        min(x for x in range(width) if (grid[:, x] == cell).any()))
    assert max(heights) - min(heights) <= 1 and max(widths) - min(widths) <= 1
    row_starts = [y for y in range(height) if y == 0 or (grid[y] != grid[y - 1]).any()]
    col_starts = [x for x in range(width) if x == 0 or (grid[:, x] != grid[:, x - 1]).any()]
    corners = [grid[y, x] for y in row_starts for x in col_starts]
    assert corners == list(range(cells))  # the cells' top-left corners, row by row, are ids 0, 1, 2, ...
    assert len({tuple(row) for row in grid}) == rows and len({tuple(col) for col in grid.T}) == cols
