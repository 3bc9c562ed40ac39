"""SlotDiffusion's DDPM against diffusers (the independent oracle): schedules, q_sample, the DDPM ancestral step
and whole DDIM / DDPM trajectories; then the slot-conditioned UNet, the loss and the sampler."""

import pytest
import torch

from model import EMA, DDPMSchedule, SlotUNet, diffusion_loss, sample

diffusers = pytest.importorskip("diffusers")

# (beta_schedule, beta_start, beta_end): diffusers' defaults, and the SlotDiffusion / MSF release's LDM schedule.
SCHEDULES = pytest.mark.parametrize("beta_schedule", [("linear", 1e-4, 0.02), ("scaled_linear", 1e-4, 0.02),
                                                      ("scaled_linear", 0.0015, 0.0195)], ids=str)


def oracle_ddpm(beta_schedule, beta_start=1e-4, beta_end=0.02):
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=beta_start,
                                   beta_end=beta_end, clip_sample=False,
                                   variance_type="fixed_small", prediction_type="epsilon")


def oracle_ddim(beta_schedule, beta_start=1e-4, beta_end=0.02):
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=beta_start,
                                   beta_end=beta_end, clip_sample=False,
                                   set_alpha_to_one=True, prediction_type="epsilon")


def fake_eps(x_t):
    """A fixed stand-in for the denoiser, so trajectories depend only on the update rule."""
    return 0.1 * x_t + 0.05 * torch.tanh(x_t)


def tiny_unet(seed=0, channels=32, slot_dim=16):
    """A small SlotUNet whose zero-initialised output conv is randomised, so slots reach the output at init."""
    torch.manual_seed(seed)
    unet = SlotUNet(4, channels, slot_dim, heads=4)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    return unet


# ------------------------------------------------------------------------------------------------ schedule

@SCHEDULES
def test_schedule_buffers_match_diffusers(beta_schedule):
    ours, oracle = DDPMSchedule(1000, *beta_schedule), oracle_ddpm(*beta_schedule)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == torch.float32
        torch.testing.assert_close(getattr(ours, name), getattr(oracle, name), atol=1e-6, rtol=0)


def test_schedule_rejects_unknown_name_and_is_not_saved():
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMSchedule(1000, "cosine")
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        DDPMSchedule(1000, "linear", 0.02, 1e-4)
    assert DDPMSchedule(10).state_dict() == {}  # a pure function of the config


@SCHEDULES
def test_add_noise_matches_diffusers(beta_schedule):
    torch.manual_seed(0)
    x0, noise = torch.randn(6, 4, 5, 5), torch.randn(6, 4, 5, 5)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = DDPMSchedule(1000, *beta_schedule).add_noise(x0, noise, t)
    torch.testing.assert_close(ours, oracle_ddpm(*beta_schedule).add_noise(x0, noise, t), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 10, 50, 999, 1000])
def test_timesteps_match_ddim_leading_spacing(n):
    oracle = oracle_ddim("linear")
    oracle.set_timesteps(n)
    assert torch.equal(DDPMSchedule(1000).timesteps(n), oracle.timesteps)


def test_timesteps_reject_bad_counts():
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDPMSchedule(100).timesteps(101)


# ------------------------------------------------------------------------------------------------ reverse steps

@SCHEDULES
@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_ddpm_variance_matches_diffusers(beta_schedule, t):
    ours = DDPMSchedule(1000, *beta_schedule).ddpm_variance(t)
    torch.testing.assert_close(ours, oracle_ddpm(*beta_schedule)._get_variance(t), atol=1e-8, rtol=1e-5)


@SCHEDULES
@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_ddpm_step_matches_diffusers(beta_schedule, t):
    """Same model output, same injected noise (the same seeded generator); at t = 0 the step is noise-free."""
    torch.manual_seed(1)
    x_t, eps = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    ours = DDPMSchedule(1000, *beta_schedule).ddpm_step(eps, t, x_t, generator=torch.Generator().manual_seed(7))
    expected = oracle_ddpm(*beta_schedule).step(eps, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_ddpm_step_mean_and_noise_scale():
    """Without a shared generator: the step's spread around its noise-free mean has the posterior variance."""
    schedule = DDPMSchedule(1000)
    x_t, eps = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64)
    mean = oracle_ddpm("linear").step(eps, 0, x_t).prev_sample  # t = 0 is deterministic ...
    torch.testing.assert_close(schedule.ddpm_step(eps, 0, x_t), mean, atol=1e-5, rtol=1e-5)
    draws = torch.stack([schedule.ddpm_step(eps, 500, x_t) for _ in range(4)])  # ... t = 500 is not
    assert draws.var(0).mean().item() == pytest.approx(schedule.ddpm_variance(500).item(), rel=0.05)


@SCHEDULES
def test_full_ddpm_trajectory_matches_diffusers(beta_schedule):
    ours, oracle = DDPMSchedule(1000, *beta_schedule), oracle_ddpm(*beta_schedule)
    x = y = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    ours_generator, oracle_generator = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for t in range(999, -1, -1):
        x = ours.ddpm_step(fake_eps(x), t, x, generator=ours_generator)
        y = oracle.step(fake_eps(y), t, y, generator=oracle_generator).prev_sample
    assert x.abs().max() > 0.1
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@SCHEDULES
@pytest.mark.parametrize("n", [50, 7])
def test_ddim_trajectory_matches_diffusers(beta_schedule, n):
    ours, oracle = DDPMSchedule(1000, *beta_schedule), oracle_ddim(*beta_schedule)
    oracle.set_timesteps(n)
    x = y = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    timesteps = ours.timesteps(n).tolist()
    for i, t in enumerate(timesteps):
        x = ours.step(fake_eps(x), t, x, timesteps[i + 1] if i + 1 < n else -1)
        y = oracle.step(fake_eps(y), t, y, eta=0.0).prev_sample
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_ddim_final_step_returns_x0_estimate():
    schedule = DDPMSchedule(1000)
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    x_t = schedule.add_noise(x0, noise, torch.tensor([300, 300]))
    torch.testing.assert_close(schedule.step(noise, 300, x_t, -1), x0, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ SlotUNet

@pytest.mark.parametrize("side", [8, 16])
def test_unet_shape_and_slot_gradient(side):
    unet = tiny_unet()
    x, t = torch.randn(2, 4, side, side), torch.tensor([3, 900])
    slots = torch.randn(2, 5, 16, requires_grad=True)
    out = unet(x, t, slots)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert slots.grad is not None and slots.grad.abs().sum() > 0 and torch.isfinite(slots.grad).all()


def test_unet_uses_slots_and_timestep_and_ignores_slot_order():
    unet = tiny_unet().eval()
    x, t, slots = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 5, 16)
    with torch.no_grad():
        out = unet(x, t, slots)
        assert not torch.allclose(out, unet(x, t, torch.randn(2, 5, 16)), atol=1e-4)
        assert not torch.allclose(out, unet(x, torch.tensor([600, 600]), slots), atol=1e-4)
        # Slots enter only through cross-attention (no slot position): a set, not a sequence.
        torch.testing.assert_close(unet(x, t, slots[:, torch.randperm(5)]), out, atol=1e-5, rtol=1e-4)


def test_unet_zero_initialised_output_and_bad_size():
    unet = SlotUNet(4, 32, 16)
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 3, 16))
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(AssertionError, match="divisible by 4"):
        unet(torch.randn(1, 4, 10, 10), torch.tensor([5]), torch.randn(1, 3, 16))


# ------------------------------------------------------------------------------------------------ loss and sampler

def test_diffusion_loss_overfits_one_batch():
    unet = tiny_unet()
    schedule = DDPMSchedule(1000)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    slots = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def fixed_loss():  # the same timesteps and noise every time
        torch.manual_seed(123)
        return torch.stack([diffusion_loss(unet, schedule, x0, slots) for _ in range(4)]).mean()

    with torch.no_grad():
        before = fixed_loss().item()
    optimizer = torch.optim.Adam([*unet.parameters(), slots], lr=2e-3)
    torch.manual_seed(0)
    for _ in range(30):
        loss = diffusion_loss(unet, schedule, x0, slots)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert slots.grad.abs().sum() > 0
    with torch.no_grad():
        after = fixed_loss().item()
    assert after < 0.8 * before, (before, after)


def test_sample_shape_determinism_and_finiteness():
    unet, schedule = tiny_unet().eval(), DDPMSchedule(1000)
    slots = torch.randn(2, 3, 16)

    def draw(seed):
        return sample(unet, schedule, slots, (2, 4, 8, 8), num_inference_steps=4,
                      generator=torch.Generator().manual_seed(seed))

    first, again, other = draw(0), draw(0), draw(1)
    assert first.shape == (2, 4, 8, 8) and first.dtype == slots.dtype and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.allclose(first, other)


def test_sample_matches_diffusers_ddim_loop():
    """sample() with a fake denoiser equals the textbook diffusers loop (same initial noise, DDIM eta = 0)."""
    class FakeUNet(torch.nn.Module):
        def forward(self, x, t, slots):
            assert t.dtype == torch.long and t.shape == (x.shape[0],)
            return fake_eps(x) + 0.01 * slots.mean((1, 2))[:, None, None, None]

    slots, shape = torch.randn(2, 3, 16), (2, 4, 4, 4)
    ours = sample(FakeUNet(), DDPMSchedule(1000, "scaled_linear"), slots, shape, num_inference_steps=20,
                  generator=torch.Generator().manual_seed(9))
    oracle = oracle_ddim("scaled_linear")
    oracle.set_timesteps(20)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    for t in oracle.timesteps:
        x = oracle.step(FakeUNet()(x, t.repeat(2), slots), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ EMA of the denoiser

def test_ema_follows_the_hand_computed_update():
    """LitEma's rule: at update n, d = min(decay, (1 + n) / (10 + n)) and shadow <- d shadow + (1 - d) live."""
    torch.manual_seed(0)
    live = torch.nn.Linear(3, 2)
    ema = EMA(live, decay=0.5)  # (1 + n) / (10 + n) passes 0.5 at n = 8: both branches of the min are taken
    expected = {name: p.detach().clone() for name, p in live.named_parameters()}
    assert all(not p.requires_grad for p in ema.module.parameters()) and all(p.requires_grad for p in live.parameters())
    for n in range(1, 13):
        with torch.no_grad():
            for p in live.parameters():
                p.copy_(torch.randn_like(p))
        ema.update(live)
        d = min(0.5, (1 + n) / (10 + n))
        for name, p in live.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p.detach()
        for name, shadow in ema.module.named_parameters():
            torch.testing.assert_close(shadow, expected[name], atol=1e-6, rtol=1e-6)
    assert int(ema.updates) == 12
    ema.train()
    assert not ema.module.training  # the averaged copy only ever samples
    state = ema.state_dict()
    assert set(state) == {"updates", "module.weight", "module.bias"}
    restored = EMA(torch.nn.Linear(3, 2), decay=0.5)
    restored.load_state_dict(state)
    assert int(restored.updates) == 12 and torch.equal(restored.module.weight, ema.module.weight)
