"""msf.py: the batched inter-scale fusion against a naive per-pixel loop, Eq. 1, the pinv split, every toggle,
reductions to the baselines, code replacement and the schedules."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import msf
from common import UserError, cosine_anneal, warmup_cosine

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


def test_msf_with_one_scale_and_no_intra_fusion_is_a_plain_vq_vae():
    """num_scales 1 = plain VQ-VAE. With one scale inter-scale fusion has no other scale to vote."""
    vq = msf.build_vae(dict(TINY, quantizer="vq", codebook_size=16))
    one = msf.build_vae(dict(TINY, quantizer="msf", num_scales=1, intra_scale_fusion=False, si_codebook_size=16))
    one.encoder.load_state_dict(vq.encoder.state_dict())
    one.decoder.load_state_dict(vq.decoder.state_dict())
    with torch.no_grad():
        one.quantizer.si.weight.copy_(vq.quantizer.codebook.weight)
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


def test_code_replacement_revives_dead_codes():
    torch.manual_seed(0)
    book = msf.Codebook(8, 4)
    with torch.no_grad():
        book.weight.copy_(torch.randn(8, 4))
        book.weight[5:] = 100.0  # far from every encoder output: never matched
    vectors = torch.randn(256, 4)
    indices = msf.match_logits(vectors, book.codes()).argmax(1)
    assert not (indices >= 5).any()
    book.track(indices, vectors)
    assert book.maintain(replace=False) == 0  # counting alone replaces nothing
    assert book.dead_codes()[5:].all() and not book.dead_codes()[:5].any()
    book.track(indices, vectors)
    assert book.maintain(replace=True) == 3
    assert (book.weight[5:].abs() < 10).all()  # re-initialised from encoder outputs
    revived = msf.match_logits(vectors, book.codes()).argmax(1)
    assert (revived >= 5).any()  # and now in use
    assert not book.dead_codes().any()  # with a grace period


def test_usage_share_is_bias_corrected():
    book = msf.Codebook(4, 2)
    book.track(torch.tensor([0, 0, 0, 1]), torch.zeros(4, 2))
    book.maintain(replace=False)
    torch.testing.assert_close(book.usage_share(), torch.tensor([0.75, 0.25, 0.0, 0.0]))


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
    assert cosine_anneal(3, 0, 1.0, 0.0) == 0.0
    assert cosine_anneal(1, 4, 1.0, 0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_pca_colours_range_and_shape():
    colours = msf.pca_colours(torch.randn(2, 4, 5, 8))
    assert colours.shape == (2, 3, 4, 5) and colours.min() >= 0 and colours.max() <= 1
