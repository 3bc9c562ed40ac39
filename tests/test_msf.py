"""msf.py: the batched inter-scale fusion against a naive per-pixel loop, Eq. 1, the pinv split, every toggle,
reductions to the baselines, code replacement and the schedules."""

import itertools
import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

import msf
from errors import UserError
from schedules import cosine_anneal, warmup_cosine

TINY = dict({k: o.default for k, o in msf.VAE_OPTIONS.items()}, code_dim=8, vae_width=8, codebook_size=64)


# ------------------------------------------------------------------------------------------------ Eq. 1 and Eq. 4

def naive_fusion(z_list, codes, mode="adjacent"):
    """Oracle for Eq. 4, one super-pixel at a time in float64: every candidate vector is built by hand (2x2 /
    2^k-block mean of a finer scale, the covering super-pixel of a coarser one), matched with softmax(-||z - C||),
    and the code with the highest probability over candidates wins. Also returns each decision's margin."""
    codes = codes.double()
    out, margins = [], []
    for n, z in enumerate(z_list):
        b, h, w, _ = z.shape
        fused = torch.zeros(b, h, w, dtype=torch.long)
        margin = torch.zeros(b, h, w, dtype=torch.float64)
        for bi, i, j in itertools.product(range(b), range(h), range(w)):
            candidates = [z[bi, i, j]]
            others = {"adjacent": [k for k in (n - 1, n + 1) if 0 <= k < len(z_list)],
                      "all": [k for k in range(len(z_list)) if k != n]}[mode]
            for k in others:
                if k < n:
                    f = 2 ** (n - k)
                    candidates.append(z_list[k][bi, f * i:f * i + f, f * j:f * j + f].reshape(-1, z.shape[-1]).mean(0))
                else:
                    f = 2 ** (k - n)
                    candidates.append(z_list[k][bi, i // f, j // f])
            probs = torch.stack([torch.softmax(-(v.double()[None] - codes).norm(dim=1), 0) for v in candidates])
            best_per_code = probs.max(0).values  # max over candidate scales
            top2 = best_per_code.topk(2).values
            fused[bi, i, j] = best_per_code.argmax()
            margin[bi, i, j] = top2[0] - top2[1]
        out.append(fused)
        margins.append(margin)
    return out, margins


@pytest.mark.parametrize("num_scales, size, num_codes, mode", [
    (2, 4, 8, "adjacent"), (3, 8, 16, "adjacent"), (4, 8, 32, "adjacent"), (3, 8, 5, "all"), (4, 8, 16, "all"),
    (1, 4, 8, "adjacent"),
])
def test_batched_fusion_matches_naive_loop(num_scales, size, num_codes, mode):
    generator = torch.Generator().manual_seed(num_scales * 100 + size + num_codes)
    z = [torch.randn(2, size // 2 ** n, size // 2 ** n, 6, generator=generator) for n in range(num_scales)]
    codes = torch.randn(num_codes, 6, generator=generator)
    expected, margins = naive_fusion(z, codes, mode)
    got = msf.fuse_inter_scale(z, codes, mode)[0] if mode == "all" else msf.inter_scale_indices(z, codes)
    for n in range(num_scales):
        decided = margins[n] > 1e-5  # float32 vs float64 may only disagree on near-ties
        assert decided.float().mean() > 0.95
        assert torch.equal(got[n][decided], expected[n][decided]), f"scale {n + 1}"
        assert got[n].dtype == torch.long and got[n].shape == z[n].shape[:3]


def test_fusion_returns_the_winning_candidates_vectors():
    generator = torch.Generator().manual_seed(0)
    z = [torch.randn(1, 8 // 2 ** n, 8 // 2 ** n, 4, generator=generator) for n in range(3)]
    codes = torch.randn(8, 4, generator=generator)
    fused, vectors, own, winners = msf.fuse_inter_scale(z, codes, "adjacent")
    # scale 2: candidate 0 = own, 1 = finer (2x2 mean of scale 1), 2 = coarser (scale 3, upsampled)
    finer = F.avg_pool2d(z[0].permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    coarser = z[2].repeat_interleave(2, 1).repeat_interleave(2, 2)
    expected = torch.stack([z[1], finer, coarser]).gather(0, winners[1][None, ..., None].expand(1, *z[1].shape))[0]
    torch.testing.assert_close(vectors[1], expected)
    assert (winners[1] > 0).any()  # some super-pixels are decided by another scale
    own_direct = msf.match_logits(z[1].reshape(-1, 4), codes).argmax(1).view(own[1].shape)
    assert torch.equal(own[1], own_direct)


def test_eq1_matching_against_the_direct_formula():
    generator = torch.Generator().manual_seed(1)
    z, codes = torch.randn(50, 16, generator=generator) * 3, torch.randn(40, 16, generator=generator)
    direct = -(z[:, None, :] - codes[None]).norm(dim=-1)  # -||Z - C||_2
    torch.testing.assert_close(torch.softmax(msf.match_logits(z, codes), 1), torch.softmax(direct, 1))
    assert torch.equal(msf.match_logits(z, codes).argmax(1), direct.argmax(1))
    chi = msf.chi_distance_std(16)
    torch.testing.assert_close(msf.match_logits(z, codes, "official"), direct / chi)
    # Gumbel-max: temperature 0 is argmax; a large temperature visits many codes
    torch.manual_seed(0)
    sampled = msf.match_logits(z, codes, temperature=100.0).argmax(1)
    assert (sampled != direct.argmax(1)).any()


def test_chi_distance_std_matches_sampling():
    torch.manual_seed(0)
    for dim in (4, 256):
        norms = torch.randn(200000, dim).norm(dim=1)
        assert abs(norms.std().item() - msf.chi_distance_std(dim)) < 0.01


def test_pinv_split_round_trip():
    project = msf.ProjectPinv(16, 2)
    with torch.no_grad():
        project.weight.copy_(torch.randn(32, 16))  # a random full-rank W
    z = torch.randn(3, 4, 4, 16)
    up = project.up(z)
    assert up.shape == (3, 4, 4, 32)
    torch.testing.assert_close(project.down(up), z, atol=1e-4, rtol=1e-4)  # Z·pinv(W)·W = Z
    torch.testing.assert_close(up, z @ torch.linalg.pinv(project.weight))


# ------------------------------------------------------------------------------------------------ the VAE

TOGGLES = [
    dict(quantizer="vq"),
    dict(quantizer="grouped"),
    dict(quantizer="grouped", num_groups=3, codebook_size=64),
    dict(quantizer="msf"),
    dict(quantizer="msf", num_scales=1),
    dict(quantizer="msf", num_scales=2),
    dict(quantizer="msf", num_scales=4),
    dict(quantizer="msf", inter_scale_fusion=False),
    dict(quantizer="msf", intra_scale_fusion=False),
    dict(quantizer="msf", inter_scale_fusion=False, intra_scale_fusion=False),
    dict(quantizer="msf", sv_codebook="shared"),
    dict(quantizer="msf", fusion="mean"),
    dict(quantizer="msf", candidates="all"),
    dict(quantizer="msf", codebook="simvq", code_replacement=False, simvq_basis_dim=16),
    dict(quantizer="msf", matching="official"),
    dict(quantizer="msf", si_codebook_size=16, sv_codebook_sizes=[16, 8, 4]),
    dict(quantizer="vq", codebook="simvq", code_replacement=False, simvq_basis_dim=16),
]


@pytest.mark.parametrize("toggles", TOGGLES, ids=lambda t: "-".join(f"{k}={v}" for k, v in t.items()))
def test_every_toggle_builds_and_trains(toggles):
    config = dict(TINY, **toggles)
    msf.check_vae_config(config, 32)
    torch.manual_seed(0)
    model = msf.build_vae(config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, stats = model(images, alpha=0.3, temperature=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.parameters())
    assert model.encoder[0][0].weight.grad.abs().sum() > 0
    scales = config["num_scales"] if config["quantizer"] == "msf" else 1
    assert len([k for k in stats if k.startswith("recon_mse")]) == scales
    for book in model.codebooks():
        book.maintain(replace=config["code_replacement"])
    model.eval()
    guidance = model.guidance(images, scales=[1])
    vectors, indices, sizes = guidance["vectors"][0], guidance["indices"][0], guidance["group_sizes"][0]
    assert vectors.shape == (2, 8, 8, 8) and indices.shape[:3] == (2, 8, 8) and indices.shape[3] == len(sizes)
    assert all((indices[..., g] < size).all() for g, size in enumerate(sizes))


def keep_codes(*models):
    """Mark the codes as initialised, so that training-mode forwards compare the codes the test copied."""
    for model in models:
        for book in model.codebooks():
            book.initialised.fill_(True)


def test_msf_with_one_scale_and_no_intra_fusion_is_a_plain_vq_vae():
    """num_scales 1 = plain VQ-VAE. With one scale inter-scale fusion has no other scale to vote."""
    vq = msf.build_vae(dict(TINY, quantizer="vq", codebook_size=16))
    one = msf.build_vae(dict(TINY, quantizer="msf", num_scales=1, intra_scale_fusion=False, si_codebook_size=16))
    one.encoder.load_state_dict(vq.encoder.state_dict())
    one.decoder.load_state_dict(vq.decoder.state_dict())
    with torch.no_grad():
        one.quantizer.si.weight.copy_(vq.quantizer.codebook.weight)
    keep_codes(vq, one)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    for alpha in (0.0, 0.4):
        loss_vq, stats_vq, q_vq, rec_vq = vq(images, alpha, return_reconstructions=True)
        loss_one, stats_one, q_one, rec_one = one(images, alpha, return_reconstructions=True)
        torch.testing.assert_close(loss_one, loss_vq)
        torch.testing.assert_close(rec_one[0], rec_vq[0])
        assert torch.equal(q_one.indices[0], q_vq.indices[0])


def test_msf_with_one_scale_equals_grouped_codes_with_two_groups():
    grouped = msf.build_vae(dict(TINY, quantizer="grouped"))
    one = msf.build_vae(dict(TINY, quantizer="msf", num_scales=1))
    one.load_state_dict({k.replace("quantizer.groups.0", "quantizer.si").replace("quantizer.groups.1", "quantizer.sv.0"): v
                         for k, v in grouped.state_dict().items()})
    keep_codes(grouped, one)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    loss_g, _, q_g, _ = grouped(images, 0.2, return_reconstructions=True)
    loss_m, _, q_m, _ = one(images, 0.2, return_reconstructions=True)
    torch.testing.assert_close(loss_m, loss_g)
    assert torch.equal(q_m.indices[0], q_g.indices[0])


def test_straight_through_passes_gradients_to_z_and_codes_get_the_codebook_loss():
    quantizer = msf.VectorQuantizer(4, 8, "plain", 16, "paper", 0.25)
    z = torch.randn(1, 2, 2, 4, requires_grad=True)
    out = quantizer([z])
    out.decoder_inputs[0].sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # identity gradient
    assert quantizer.codebook.weight.grad is None  # the decoder path does not touch the codes
    out.loss.backward()
    assert quantizer.codebook.weight.grad.abs().sum() > 0


def test_residual_mixing_forward_value():
    z, q = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(msf.straight_through(z, q, 0.25), 0.25 * z + 0.75 * q)
    torch.testing.assert_close(msf.straight_through(z, q, 0.0), q)


def test_msf_without_fusion_is_per_scale_matching():
    model = msf.build_vae(dict(TINY, quantizer="msf", inter_scale_fusion=False, intra_scale_fusion=False))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    _, z = model.encode(images)
    out = model.quantizer(z)
    for n in range(3):
        direct = msf.match_logits(z[n].reshape(-1, 8), model.quantizer.si.codes()).argmax(1).view(z[n].shape[:3])
        assert torch.equal(out.indices[n][..., 0], direct)


def test_code_replacement_revives_dead_codes_at_the_end_of_each_window():
    torch.manual_seed(0)
    book = msf.Codebook(8, 4)
    with torch.no_grad():
        book.weight.copy_(torch.randn(8, 4))
        book.weight[5:] = 100.0  # far from every encoder output: never matched
    book.initialised.fill_(True)
    vectors = torch.randn(256, 4)
    indices = msf.match_logits(vectors, book.codes()).argmax(1)
    assert not (indices >= 5).any()
    book.track(indices, vectors)
    assert not book.maintain(True, replace_every=2).any()  # mid-window: counting only
    assert book.dead_codes()[5:].all() and not book.dead_codes()[:5].any()
    book.track(indices, vectors)
    replaced = book.maintain(True, replace_every=2)
    assert replaced.tolist() == [False] * 5 + [True] * 3
    assert (book.weight[5:].abs() < 10).all()  # re-initialised from encoder outputs
    revived = msf.match_logits(vectors, book.codes()).argmax(1)
    assert (revived >= 5).any()  # and now in use
    assert int(book.window_steps) == 0 and not book.window_counts.any()  # a new window starts


def test_replacement_without_replace_only_counts():
    book = msf.Codebook(4, 2)
    book.initialised.fill_(True)
    for _ in range(3):
        book.track(torch.tensor([0, 0, 0, 1]), torch.zeros(4, 2))
        assert not book.maintain(False, replace_every=3).any()
    before = book.weight.clone()
    assert torch.equal(book.weight, before) and int(book.window_steps) == 0


def test_fresh_codes_come_from_every_scale_a_shared_codebook_serves():
    # Scale 1 has 16x more vectors than scale 3; the pool keeps a sample per scale, so a replacement that revives
    # many codes draws from both.
    torch.manual_seed(0)
    book = msf.Codebook(64, 2)
    book.initialised.fill_(True)
    with torch.no_grad():
        book.weight.fill_(1000.0)
    fine, coarse = torch.randn(4096, 2) + 50, torch.randn(256, 2) - 50
    book.track(torch.zeros(4096, dtype=torch.long), fine)
    book.track(torch.zeros(256, dtype=torch.long), coarse)
    replaced = book.maintain(True, replace_every=1)
    assert int(replaced.sum()) == 63
    fresh = book.weight[1:]
    assert (fresh[:, 0] > 25).sum() > 10 and (fresh[:, 0] < -25).sum() > 10


def test_codes_start_from_the_first_batch_of_encoder_outputs():
    torch.manual_seed(0)
    model = msf.build_vae(dict(TINY, quantizer="msf", num_scales=3))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    model(images)
    _, z = model.encode(images)
    halves = [model.quantizer.project.up(v).split(8, -1) for v in z]
    for book, vectors in [(model.quantizer.si, [h[0] for h in halves])] + [
            (model.quantizer.sv[n], [halves[n][1]]) for n in range(3)]:
        flat = torch.cat([v.reshape(-1, 8) for v in vectors])
        nearest = torch.cdist(book.codes().detach(), flat).min(1).values
        assert bool(book.initialised)
        assert (nearest < 0.05 * flat.std() * math.sqrt(8)).all()  # every code is (a jittered) encoder output
    si = model.quantizer.si.codes().detach()
    codes = si.clone()
    model(images)
    assert torch.equal(model.quantizer.si.codes().detach(), codes)  # only once


def test_initial_codes_take_an_equal_share_from_every_scale():
    torch.manual_seed(0)
    book = msf.Codebook(64, 2)
    scales = [torch.randn(4096, 2) + 50, torch.randn(256, 2), torch.randn(16, 2) - 50]  # scale 3 has few vectors
    book.initialise_from(scales)
    origin = torch.stack([torch.cdist(book.codes().detach(), v).min(1).values for v in scales]).argmin(0)
    assert torch.bincount(origin, minlength=3).tolist() == [22, 21, 21]


def test_replaced_codes_lose_their_adam_moments():
    book = msf.Codebook(4, 3)
    with torch.no_grad():
        book.weight.fill_(1.0)
    other = torch.nn.Parameter(torch.ones(4, 3))
    optimizer = torch.optim.Adam([book.weight, other], lr=0.1)
    (book.weight.square().sum() + other.square().sum() + book.weight.sum()).backward()
    optimizer.step()
    rows = torch.tensor([False, True, False, True])
    msf.reset_optimizer_rows(optimizer, book.weight, rows)
    state = optimizer.state[book.weight]
    assert not state["exp_avg"][rows].any() and not state["exp_avg_sq"][rows].any()
    assert state["exp_avg"][~rows].all() and state["exp_avg_sq"][~rows].all()
    assert optimizer.state[other]["exp_avg_sq"].all()  # other parameters untouched


def test_old_checkpoints_without_window_buffers_load():
    book = msf.Codebook(4, 2)
    state = {k: v for k, v in book.state_dict().items() if k not in ("initialised", "window_counts", "window_steps")}
    state.update(usage=torch.zeros(4), usage_steps=torch.zeros(()))
    fresh = msf.Codebook(4, 2)
    fresh.load_state_dict(state)
    assert bool(fresh.initialised)


# ------------------------------------------------------------------------------- noise and confidence on Eq. 1/4

def test_paper_noise_is_relative_to_the_logits_spread():
    # Scaling codes and vectors by k scales every distance by k; relative noise scales with them, so the same
    # random numbers pick the same codes. Absolute noise would not: it would be 1000x weaker at k = 1000.
    torch.manual_seed(0)
    codes, vectors = torch.randn(64, 8), torch.randn(512, 8)
    picks = []
    for k in (1e-3, 1.0, 1e3):
        torch.manual_seed(1)
        picks.append(msf.match_logits(vectors * k, codes * k, temperature=0.3).argmax(1))
    assert (picks[0] == picks[1]).float().mean() > 0.99 and (picks[2] == picks[1]).float().mean() > 0.99
    assert (picks[1] != msf.match_logits(vectors, codes).argmax(1)).any()  # it is noise


def old_log_max_probability(logits):
    """The formula this project used before: log max P as max - logsumexp, float32."""
    best_logit, best = logits.max(1)
    return best_logit - torch.logsumexp(logits, 1), best


def confident_inputs(seed=0):
    """Encodings near well-separated codes: max P is within 1e-10..1e-5 of 1 at every scale."""
    torch.manual_seed(seed)
    codes = torch.randn(16, 8) * 8
    z = [codes[torch.randint(16, (2, s, s))] + 0.3 * torch.randn(2, s, s, 8) for s in (8, 4, 2)]
    return z, codes


def test_log_max_probability_agrees_with_float64_on_confident_rows():
    z, codes = confident_inputs()
    logits = -torch.cdist(z[0].reshape(-1, 8), codes)
    ours, best = msf.log_max_probability(logits)
    # The oracle: the textbook formula at 50 significant digits (float64 log_softmax itself rounds log max P of
    # 1e-14 to the ulp of the max logit, ~1e-16).
    mpmath.mp.dps = 50
    exact = torch.tensor([float(mpmath.log(max(mpmath.exp(v) for v in row) / mpmath.fsum(mpmath.exp(v) for v in row)))
                          for row in logits.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=0)
    assert torch.equal(best, logits.argmax(1))
    assert exact.median() > -1e-6  # confident indeed
    old, _ = old_log_max_probability(logits)
    assert ((old.double() - exact).abs() / exact.abs() > 0.1).any()  # the old formula is off by > 10 %


def test_fusion_on_confident_inputs_agrees_with_float64(monkeypatch):
    z, codes = confident_inputs()
    expected, _ = naive_fusion(z, codes)
    fused = msf.fuse_inter_scale(z, codes, "adjacent", "paper", return_vectors=False)[0]
    for got, want in zip(fused, expected):
        assert torch.equal(got, want)
    monkeypatch.setattr(msf, "log_max_probability", old_log_max_probability)
    old = msf.fuse_inter_scale(z, codes, "adjacent", "paper", return_vectors=False)[0]
    assert sum(int((got != want).sum()) for got, want in zip(old, expected)) > 0  # the old formula fails here


def test_invalid_configs_are_refused():
    with pytest.raises(UserError, match="divisible"):
        msf.check_vae_config(dict(TINY, quantizer="msf", num_scales=4), 48)
    with pytest.raises(UserError, match="code_replacement"):
        msf.check_vae_config(dict(TINY, codebook="simvq"), 32)
    with pytest.raises(UserError, match="sv_codebook_sizes"):
        msf.check_vae_config(dict(TINY, sv_codebook_sizes=[4, 4]), 32)
    with pytest.raises(UserError, match="perfect power"):
        msf.build_vae(dict(TINY, quantizer="grouped", codebook_size=50))
    with pytest.raises(UserError, match="guidance scale 2"):
        msf.build_vae(dict(TINY, quantizer="vq")).guidance(torch.zeros(1, 3, 16, 16), scales=[2])


# ------------------------------------------------------------------------------------------------ schedules

def test_learning_rate_schedule():
    peak, total = 2e-3, 1000  # warm-up over 50 steps, then cosine to peak / 1000
    assert warmup_cosine(0, total, peak) == 0
    assert warmup_cosine(25, total, peak) == pytest.approx(peak / 2)
    assert warmup_cosine(50, total, peak) == pytest.approx(peak)
    middle = 50 + (1000 - 50) / 2
    assert warmup_cosine(int(middle), total, peak) == pytest.approx((peak + peak / 1000) / 2, rel=1e-2)
    assert warmup_cosine(1000, total, peak) == pytest.approx(peak / 1000)
    values = [warmup_cosine(s, total, peak) for s in range(50, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_annealing_schedules():
    config = dict(TINY, residual_anneal_fraction=0.5, gumbel_temperature_start=1.0, gumbel_temperature_end=0.1,
                  gumbel_anneal_fraction=0.25)
    assert msf.residual_alpha(0, 100, config) == 1.0
    assert msf.residual_alpha(25, 100, config) == pytest.approx(0.5)
    assert msf.residual_alpha(50, 100, config) == 0.0 and msf.residual_alpha(90, 100, config) == 0.0
    assert msf.residual_alpha(0, 100, dict(config, residual_anneal=False)) == 0.0
    assert msf.gumbel_temperature(0, 100, config) == 1.0
    assert msf.gumbel_temperature(12.5, 100, config) == pytest.approx(0.55)
    assert msf.gumbel_temperature(60, 100, config) == pytest.approx(0.1)
    assert msf.gumbel_temperature(0, 100, dict(config, gumbel=False)) == 0.0
    # official matching: the release's logit factor exp(cosine from ln 1 to ln 2 over the whole run), inverted
    official = dict(config, matching="official")
    for step in (0, 25, 50, 100, 120):
        factor = math.exp(0.5 * (0 - math.log(2)) * (1 + math.cos(math.pi * min(step, 100) / 100)) + math.log(2))
        assert msf.gumbel_temperature(step, 100, official) == pytest.approx(1 / factor)
    assert cosine_anneal(3, 0, 1.0, 0.0) == 0.0
    assert cosine_anneal(1, 4, 1.0, 0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_pca_colours_range_and_shape():
    colours = msf.pca_colours(torch.randn(2, 4, 5, 8))
    assert colours.shape == (2, 3, 4, 5) and colours.min() >= 0 and colours.max() <= 1


# ------------------------------------------------------------------------- the release's variant, transcribed

OFFICIAL = dict(TINY, quantizer="msf", num_scales=3, fusion="mean", candidates="all", codebook="simvq",
                simvq_basis_dim=32, matching="official", vae_losses="official", pyramid="official",
                code_replacement=False, si_codebook_size=16, sv_codebook_sizes=[16, 8, 4])


def release_quantise(z_list, books, alpha, beta=0.25):
    """A transcription of the release's VQVAEZMultiScale forward after the encoder (eval mode), in its own terms:
    for each scale every scale's features are brought to its grid (avg-pool from finer, nearest upsampling from
    coarser) and stacked finest first; each is matched to the shared codebook by a softmax over chi-normalised
    negative cdist; the highest probability over codes, then the argmax over the stack, picks the code and the
    encoding; the specific codebook of the scale matches the scale's own features; shared and specific vectors are
    averaged. Losses: MSE(quant, sg(enc)) + beta·MSE(enc, sg(residual)) + 0.1·MSE(enc, sg(group_norm(enc)))."""
    c = z_list[0].shape[-1]
    mu = math.sqrt(2) * math.exp(math.lgamma((c + 1) / 2) - math.lgamma(c / 2))
    sigma = math.sqrt(c - mu ** 2)

    def match(encode, codes):
        similarity = (-torch.cdist(encode.flatten(0, -2), codes) - mu) / sigma
        soft = similarity.softmax(-1)
        return soft.unflatten(0, encode.shape[:-1]), soft.argmax(-1).view(encode.shape[:-1])

    s = len(z_list)
    shared = books[0].codes()
    indices, decoder_inputs, loss = [], [], 0.0
    for i in range(s):
        stack = []
        for j, encode in enumerate(z_list):
            e = encode.permute(0, 3, 1, 2)
            if j < i:
                e = F.avg_pool2d(e, 2 ** (i - j))
            elif j > i:
                e = F.interpolate(e, scale_factor=2 ** (j - i), mode="nearest")
            stack.append(e.permute(0, 2, 3, 1))
        stack = torch.stack(stack)  # (s,b,h,w,c)
        soft, _ = match(stack.flatten(0, 1), shared)
        best_p, best_code = soft.unflatten(0, stack.shape[:2]).max(-1)  # (s,b,h,w)
        winner = best_p.argmax(0)
        code1 = best_code.gather(0, winner[None])[0]
        encode1 = stack.gather(0, winner[None, ..., None].expand(-1, -1, -1, -1, c))[0]
        _, code2 = match(z_list[i], books[1 + i].codes())
        encode = (encode1 + z_list[i]) / 2
        quant = (shared[code1] + books[1 + i].codes()[code2]) / 2
        residual = encode * alpha + quant * (1 - alpha)
        decoder_inputs.append(encode + (residual - encode).detach())
        indices.append(torch.stack([code1, code2], -1))
        normed = F.group_norm(encode.detach().permute(0, 3, 1, 2), num_groups=1).permute(0, 2, 3, 1)
        loss = loss + F.mse_loss(quant, encode.detach()) + beta * F.mse_loss(encode, residual.detach()) \
            + 0.1 * F.mse_loss(encode, normed)
    return indices, decoder_inputs, loss


@pytest.mark.parametrize("confident", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_official_variant_matches_a_transcription_of_the_release(confident, alpha):
    torch.manual_seed(3)
    vae = msf.build_vae(OFFICIAL).eval()
    books = vae.codebooks()
    if confident:  # every feature a near copy of a shared code: probabilities saturate at 1.0 in float32
        shared = books[0].codes().detach() * 20
        with torch.no_grad():
            books[0].project.weight.mul_(20), books[0].project.bias.mul_(20)
        z = [shared[torch.randint(16, (2, n, n))] + 0.01 * torch.randn(2, n, n, 8) for n in (8, 4, 2)]
    else:
        z = [torch.randn(2, n, n, 8) * 3 for n in (8, 4, 2)]
    out = vae.quantizer(z, alpha)
    want_indices, want_inputs, want_loss = release_quantise(z, books, alpha)
    for n in range(3):
        assert torch.equal(out.indices[n], want_indices[n]), n
        torch.testing.assert_close(out.decoder_inputs[n], want_inputs[n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-5, atol=1e-6)
    if confident:  # the case exercises saturated ties: own and coarser candidates of scale 2 both at P = 1.0
        codes = books[0].codes().detach()
        own = msf.match_logits(z[1].reshape(-1, 8), codes, "official").softmax(1).max(1).values
        coarse = msf.match_logits(F.interpolate(z[2].permute(0, 3, 1, 2), scale_factor=2).permute(0, 2, 3, 1)
                                  .reshape(-1, 8), codes, "official").softmax(1).max(1).values
        assert ((own == 1.0) & (coarse == 1.0)).sum() > 4


def test_official_pyramid_is_one_bilinear_resize_per_scale():
    images = torch.rand(2, 3, 16, 16)
    pyramid = msf.image_pyramid(images, 3, "official")
    # without antialiasing, a 4x bilinear downsample reads the centre 2x2 of every 4x4 block
    centre = images.unfold(2, 4, 4).unfold(3, 4, 4)[..., 1:3, 1:3].mean((-1, -2))
    torch.testing.assert_close(pyramid[2], centre)
    box = F.avg_pool2d(images, 4)
    torch.testing.assert_close(msf.image_pyramid(images, 3)[2], box)  # the paper's: the whole block's mean
    assert not torch.allclose(pyramid[2], box)


def test_official_noise_is_the_releases_gumbel_softmax_of_scaled_logits(monkeypatch):
    # With the Gumbel draws fixed, the release's gumbel_softmax(factor * s) argmax equals ours at 1 / factor.
    torch.manual_seed(0)
    vectors, codes = torch.randn(64, 8), torch.randn(16, 8)
    draws = torch.rand(64, 16).clamp(1e-9, 1 - 1e-9)
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self.copy_(draws))
    ours = msf.match_logits(vectors, codes, "official", temperature=0.5)
    similarity = -torch.cdist(vectors, codes) / msf.chi_distance_std(8)
    release = 2.0 * similarity - torch.log(-torch.log(draws))
    torch.testing.assert_close(ours, release, rtol=1e-5, atol=1e-5)


def test_pinv_split_stays_inverse_through_training_and_starts_with_distinct_halves():
    torch.manual_seed(0)
    model = msf.build_vae(dict(TINY, quantizer="msf", num_scales=2))
    project = model.quantizer.project
    z = torch.randn(50, 8)
    halves = project.up(z).split(8, -1)
    assert not torch.allclose(halves[0], halves[1], atol=1e-3)  # not two copies of Z
    torch.testing.assert_close(project.up(z).norm(dim=1), z.norm(dim=1))  # orthonormal columns keep norms
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(20):
        loss, _ = model(torch.rand(4, 3, 16, 16) * 2 - 1, alpha=0.3, temperature=0.2)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    assert not torch.allclose(project.weight, torch.linalg.qr(project.weight).Q)  # W has moved
    torch.testing.assert_close(project.down(project.up(z)), z, rtol=1e-4, atol=1e-4)


def test_paper_vq_terms_use_the_nearest_code_while_the_decoder_sees_the_sample():
    torch.manual_seed(0)
    quantizer = msf.VectorQuantizer(4, 16, "plain", 16, "paper", 0.25)
    quantizer.codebook.initialised.fill_(True)
    z = torch.randn(2, 4, 4, 4)
    out = quantizer([z], alpha=0.0, temperature=5.0)
    codes = quantizer.codebook.codes()
    nearest = torch.cdist(z.reshape(-1, 4), codes).argmin(1).view(2, 4, 4)
    assert (out.indices[0][..., 0] != nearest).any()  # the decoder path is sampled
    torch.testing.assert_close(out.decoder_inputs[0], codes[out.indices[0][..., 0]])
    expected = F.mse_loss(codes[nearest], z) * 1.25  # codebook + 0.25 commitment, same value forward
    torch.testing.assert_close(out.loss, expected)
    assert torch.equal(quantizer.codebook.step_counts, torch.bincount(nearest.reshape(-1), minlength=16).float())
