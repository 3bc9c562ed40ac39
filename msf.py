"""The multi-scale fusion (MSF) VQ-VAE and its baselines, Zhao et al. ICLR 2025.

One VAE class covers the three guidance kinds an OCL model can be trained with:
  vq       one codebook of 4096 codes (the VQ-VAE baseline, SlotDiffusion's guidance);
  grouped  OGDR-style grouped codes: Z·pinv(W) split into groups, one 64-code codebook each, concat·W;
  msf      image pyramid + inter-scale fusion over a shared codebook (Eq. 4) + intra-scale fusion (Eq. 5).

Reading order: schedules, encoder/decoder, matching (Eq. 1), codebooks with code replacement, the three
quantisers (the batched inter-scale fusion is `fuse_inter_scale`), the VAE, and the config keys.
Tensors inside the quantisers are channels-last, (b, h, w, c).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn as nn
import torch.nn.functional as F

from config import option
from errors import UserError
from schedules import cosine_anneal


# ================================================================================================================
# Schedules: pure functions of the step (resume is exact, and tests can check them directly).

def residual_alpha(step: int, total_steps: int, config: dict) -> float:
    """Weight of the continuous Z in the decoder input alpha·Z + (1-alpha)·X, cosine-annealed 1 -> 0 (OGDR)."""
    if not config["residual_anneal"]:
        return 0.0
    return cosine_anneal(step, int(total_steps * config["residual_anneal_fraction"]), 1.0, 0.0)


def gumbel_temperature(step: int, total_steps: int, config: dict) -> float:
    """Scale of the Gumbel noise added to the matching logits; 0 means plain argmax matching.

    paper matching: in units of each vector's logit spread (the std of -||z - c|| over the codes), so a temperature
    means the same whatever the codes' scale; cosine-annealed start -> end over `gumbel_anneal_fraction` of training.
    official matching: the release multiplies its chi-normalised logits by a factor that grows 1 -> 2 over the whole
    run (cosine in log space) before adding unit Gumbel noise; the equivalent noise scale is 1 / factor.
    """
    if not config["gumbel"]:
        return 0.0
    if config["matching"] == "official":
        return 1.0 / math.exp(cosine_anneal(step, total_steps, 0.0, math.log(2.0)))
    anneal = int(total_steps * config["gumbel_anneal_fraction"])
    return cosine_anneal(step, anneal, config["gumbel_temperature_start"], config["gumbel_temperature_end"])


# ================================================================================================================
# Encoder and decoder: SLATE's dVAE layout (Singh et al. 2022a), 4x spatial down/up-sampling.
# The encoder sees 4x4-pixel patches only, which is exactly why a pyramid helps it: a token of scale n covers
# 4·2^(n-1) pixels of the original image.

class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch: under DDP every rank normalises with the
    mean and variance of all ranks' samples (sums all-reduced, with gradients), so K processes train exactly as one
    process with the same global batch. torch's SyncBatchNorm does the same on GPUs only; this also runs on gloo."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels, dtype, x = x.shape[1], x.dtype, x.float()  # statistics in float32 also under bf16 autocast
        count = x.new_full((1,), x.numel() // channels)
        sums = torch.cat([x.sum((0, 2, 3)), x.square().sum((0, 2, 3)), count])  # (2c + 1,)
        sums = dist_nn.all_reduce(sums)  # the global batch's sums; backward sums the ranks' gradients
        total = sums[-1]
        mean = sums[:channels] / total
        var = (sums[channels:2 * channels] / total - mean.square()).clamp_min(0)
        with torch.no_grad():  # running statistics as BatchNorm2d keeps them: unbiased variance, momentum
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * total / (total - 1).clamp_min(1), self.momentum)
        scale = self.weight / torch.sqrt(var + self.eps)
        return (x * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]).to(dtype)


class ConvBlock(nn.Sequential):
    """Conv (no bias) -> norm -> ReLU. SLATE's norm is GroupNorm with one group, which normalises each image's
    feature map as a whole; `batch` normalises each channel over the batch instead (measured: README, "Design
    decisions")."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, norm: str = "group"):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
                         GlobalBatchNorm2d(out_channels) if norm == "batch" else nn.GroupNorm(1, out_channels),
                         nn.ReLU(inplace=True))


class Encoder(nn.Sequential):
    """(b,3,H,W) -> (b,c,H/4,W/4)."""

    def __init__(self, width: int, code_dim: int, norm: str = "group"):
        super().__init__(ConvBlock(3, width, 4, 4, norm=norm),
                         *[ConvBlock(width, width, 1, norm=norm) for _ in range(5)],
                         nn.Conv2d(width, code_dim, 1))


class Decoder(nn.Sequential):
    """(b,c,h,w) -> (b,3,4h,4w)."""

    def __init__(self, width: int, code_dim: int, norm: str = "group"):
        def block(i, o, k, *padding):
            return ConvBlock(i, o, k, 1, *padding, norm=norm)

        super().__init__(block(code_dim, width, 1),
                         block(width, width, 3, 1), block(width, width, 1), block(width, width, 1),
                         block(width, width * 4, 1), nn.PixelShuffle(2),
                         block(width, width, 3, 1), block(width, width, 1), block(width, width, 1),
                         block(width, width * 4, 1), nn.PixelShuffle(2),
                         nn.Conv2d(width, 3, 1))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A (b,c,h,w) tensor stored channels-last (NHWC). oneDNN's channels-last convolutions, GroupNorm, BatchNorm and
    PixelShuffle ran the VAE's encoder and decoder faster than NCHW on the CPU (`python bench.py conv_layout`), and
    the (b,h,w,c) vectors the quantiser works on are then plain views: free for a contiguous (b,h,w,c) tensor."""
    return x.contiguous(memory_format=torch.channels_last)


def image_pyramid(images: torch.Tensor, num_scales: int, kind: str = "paper") -> list:
    """paper: T_1 = images, T_n = T_{n-1} bilinearly halved (an exact 2x2 mean, so T_n is the 2^(n-1) box average).
    official: T_n = bilinear resize of the input by 2^-(n-1) in one step, as the release does; without antialiasing
    that samples the central 2x2 of each 2^(n-1) block (T_3 is not the 4x4 mean)."""
    if kind == "official":
        return [images] + [F.interpolate(images, scale_factor=2.0 ** -n, mode="bilinear", align_corners=False)
                           for n in range(1, num_scales)]
    pyramid = [images]
    for _ in range(1, num_scales):
        pyramid.append(F.interpolate(pyramid[-1], scale_factor=0.5, mode="bilinear", align_corners=False))
    return pyramid


# ================================================================================================================
# Matching (Eq. 1): P = softmax_m(-||Z - C||_2), I = argmax_m P, X = C[I].

def chi_distance_std(dim: int) -> float:
    """Std of the distance between two N(0, I_dim) vectors / sqrt(2) (a chi distribution); the official code
    divides similarities by it."""
    mean = math.sqrt(2) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))
    return math.sqrt(max(dim - mean ** 2, 1e-12))


def squared_code_distances(vectors: torch.Tensor, codes: torch.Tensor, out: torch.Tensor = None,
                           vector_norms: torch.Tensor = None) -> torch.Tensor:
    """Squared Euclidean distances (M, m) between vectors (M, c) and codes (m, c), float32, one matmul."""
    vectors, codes = vectors.float(), codes.float()
    squared = torch.addmm(codes.pow(2).sum(1)[None], vectors, codes.t(), alpha=-2, out=out)  # |c|^2 - 2 z·c
    if vector_norms is None:
        vector_norms = torch.linalg.vector_norm(vectors, dim=1).square_()
    squared += vector_norms[:, None]
    return squared.clamp_min_(0)


def logits_from_squared(squared: torch.Tensor, dim: int, matching: str = "paper",
                        temperature: float = 0.0) -> torch.Tensor:
    """Matching logits from squared distances, in place: -distance (paper, Eq. 1) or -distance / chi std
    (official), plus Gumbel noise in training, so that argmax samples from softmax(logits / noise scale)
    (Gumbel-max); temperature 0 is plain argmax matching.

    The paper's logits are in absolute units: the gap between the nearest and the second code is ~1e-3 with fresh
    codes and ~0.1 later, so noise of a fixed size would make early matches random and late ones exact. Its noise
    is therefore scaled by each row's spread (std over the codes): temperature 1 is noise as wide as the logits.
    The official logits are chi-normalised; as in the release they are multiplied by 1 / temperature before unit
    Gumbel noise is added, so the softmax that Eq. 4 compares is the release's gumbel_softmax."""
    logits = squared.sqrt_().neg_()
    if matching == "official":
        logits /= chi_distance_std(dim)
    if temperature > 0:
        gumbel = torch.empty_like(logits).uniform_(1e-9, 1 - 1e-9).log_().neg_().log_().neg_()  # Gumbel(0, 1)
        if matching == "official":  # the release: gumbel_softmax(factor * logits), factor = 1 / temperature
            logits.div_(temperature).add_(gumbel)
        else:  # the spread of a row, estimated on up to 256 codes (plenty for a std, and 16x cheaper at m = 4096)
            logits += gumbel.mul_(temperature * logits[:, :256].std(1, keepdim=True))
    return logits


def log_max_probability(logits: torch.Tensor) -> tuple:
    """log max_m softmax(logits) and its argmax, per row of (M, m) logits, accurate when the match is confident.

    `max - logsumexp` in float32 cancels to ~1e-6 absolute error while log max P is -1e-5 .. -1e-10 for confident
    matches, which decides Eq. 4's winner at random; -log1p(sum over m != argmax of exp(l_m - l_max)) keeps the
    small sum's relative precision."""
    best_logit, best = logits.max(1)
    others = torch.exp(logits - best_logit[:, None])
    others.scatter_(1, best[:, None], 0.0)
    return -torch.log1p(others.sum(1)), best


@torch.no_grad()
def match_logits(vectors: torch.Tensor, codes: torch.Tensor, matching: str = "paper",
                 temperature: float = 0.0) -> torch.Tensor:
    """Matching logits (M, m) of vectors (M, c) against codes (m, c); see `logits_from_squared`. Only indices come
    out of matching, so no graph is kept (gradients flow through the straight-through estimator and VQ losses)."""
    return logits_from_squared(squared_code_distances(vectors, codes), codes.shape[1], matching, temperature)


@torch.no_grad()
def match_indices(vectors: torch.Tensor, codes: torch.Tensor, matching: str = "paper",
                  temperature: float = 0.0) -> tuple:
    """(sampled, nearest), both (M,): the argmax of `match_logits` with the given noise, and the nearest code (the
    same tensor when temperature is 0), from one distance computation and without the square root for the latter."""
    squared = squared_code_distances(vectors, codes)
    nearest = squared.argmin(1)
    if temperature == 0:
        return nearest, nearest
    return logits_from_squared(squared, codes.shape[1], matching, temperature).argmax(1), nearest


# ================================================================================================================
# Codebooks, with the code replacing trick (dead codes re-initialised from recent encoder outputs).

class Codebook(nn.Module):
    """m codes of dimension c: plain learnable vectors, or SimVQ (a frozen N(0,1) basis through a learnable
    linear map, the official code's parametrisation).

    Plain codes start from data: the first training batch's encoder outputs (rank 0's draw on every rank), since
    codes drawn around zero lie far from the encoder's outputs and most never win a match. Dead codes are replaced
    by the code replacing trick (the paper's alternative to a utilisation loss): every `replace_every` steps, a code
    used less than `dead_fraction` of a uniform share over that window is reset to a recent encoder output.
    """

    def __init__(self, num_codes: int, dim: int, kind: str = "plain", basis_dim: int = 1024):
        super().__init__()
        self.num_codes, self.dim, self.kind = num_codes, dim, kind
        if kind == "plain":
            self.weight = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes))
        elif kind == "simvq":
            self.register_buffer("basis", torch.randn(num_codes, basis_dim))
            self.project = nn.Linear(basis_dim, dim)
        else:
            raise ValueError(f"unknown codebook kind {kind}")
        self.register_buffer("initialised", torch.tensor(kind != "plain"))
        # Usage over the current replacement window, summed over ranks in `maintain` (saved, so resume is exact).
        self.register_buffer("window_counts", torch.zeros(num_codes))
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("step_counts", torch.zeros(num_codes), persistent=False)
        self.recent = []  # random samples of this step's matched vectors, one per `track` call (i.e. per scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before data initialisation and windowed replacement hold trained codes.
        state_dict.setdefault(prefix + "initialised", torch.tensor(True))
        state_dict.setdefault(prefix + "window_counts", torch.zeros(self.num_codes))
        state_dict.setdefault(prefix + "window_steps", torch.zeros((), dtype=torch.long))
        for old in ("usage", "usage_steps"):
            state_dict.pop(prefix + old, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def codes(self) -> torch.Tensor:
        """(m, c)"""
        return self.weight if self.kind == "plain" else self.project(self.basis)

    @torch.no_grad()
    def initialise_from(self, vectors: list) -> None:
        """Set plain codes to random rows of the given tensors (..., c), an equal share from each (one per scale
        the codebook serves), jittered so that repeated rows differ. Under DDP the rows of every rank are gathered
        and rank 0's draw is copied to all, so replicas start equal (and as one process with the same global batch
        would)."""
        if bool(self.initialised):
            return
        shares = [self.num_codes // len(vectors) + (i < self.num_codes % len(vectors)) for i in range(len(vectors))]
        picked = []
        for v, share in zip(vectors, shares):
            flat = v.detach().reshape(-1, self.dim).float()
            if dist.is_available() and dist.is_initialized():  # draw from the global batch, as one process would
                gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, flat.contiguous())
                flat = torch.cat(gathered)
            if flat.shape[0] >= share:
                picked.append(flat[torch.randperm(flat.shape[0], device=flat.device)[:share]])
            else:
                picked.append(flat[torch.randint(flat.shape[0], (share,), device=flat.device)])
        fresh = torch.cat(picked)
        fresh += 1e-2 * fresh.std() * torch.randn_like(fresh)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(fresh, 0)
        self.weight.data.copy_(fresh)
        self.initialised.fill_(True)

    def track(self, indices: torch.Tensor, vectors: torch.Tensor) -> None:
        """Record a training step's assignments and keep a random sample of the vectors that were matched; each call
        (each scale of a shared codebook) contributes its own sample, so fresh codes come from every scale."""
        self.step_counts += torch.bincount(indices.reshape(-1), minlength=self.num_codes).float()
        flat = vectors.detach().reshape(-1, self.dim).float()
        keep = max(1024, 2 * self.num_codes)
        self.recent.append(flat[torch.randperm(flat.shape[0], device=flat.device)[:keep]])

    def dead_codes(self, dead_fraction: float = 0.03) -> torch.Tensor:
        """Codes used less than `dead_fraction` of a uniform share in the current window, (m,) bool."""
        total = self.window_counts.sum()
        if total == 0:
            return torch.zeros(self.num_codes, dtype=torch.bool, device=self.window_counts.device)
        return self.window_counts < dead_fraction * total / self.num_codes

    @torch.no_grad()
    def maintain(self, replace: bool, replace_every: int = 100, dead_fraction: float = 0.03) -> torch.Tensor:
        """Fold this step's counts (all ranks) into the window; at the window's end, if `replace`, reset the dead
        codes to random recent encoder outputs (rank 0 draws, every rank copies) and start a new window. Returns the
        (m,) bool mask of replaced codes, whose optimiser state the caller resets (`reset_optimizer_rows`)."""
        counts = self.step_counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        self.step_counts.zero_()
        self.window_counts += counts
        self.window_steps += 1
        pool, self.recent = self.recent, []  # this step's vectors only, so resume stays exact
        replaced = torch.zeros(self.num_codes, dtype=torch.bool, device=counts.device)
        if int(self.window_steps) < replace_every:
            return replaced
        if replace and self.kind == "plain" and pool:
            replaced = self.dead_codes(dead_fraction)
            num_dead = int(replaced.sum())
            if num_dead:
                pool = torch.cat(pool)
                picks = torch.randint(pool.shape[0], (num_dead,), device=pool.device)
                fresh = pool[picks] + 1e-2 * pool.std() * torch.randn(num_dead, self.dim, device=pool.device)
                if dist.is_available() and dist.is_initialized():
                    dist.broadcast(fresh, 0)
                self.weight.data[replaced] = fresh.to(self.weight.dtype)
        self.window_counts.zero_()
        self.window_steps.zero_()
        return replaced


@torch.no_grad()
def reset_optimizer_rows(optimizer: torch.optim.Optimizer, parameter: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero the optimiser's per-element state (Adam's moments) of the given rows of a parameter, so a replaced
    code does not keep moving with the momentum of the dead code it replaces."""
    for value in optimizer.state.get(parameter, {}).values():
        if torch.is_tensor(value) and value.shape == parameter.shape:
            value[rows] = 0


def codebook_stats(indices: torch.Tensor, num_codes: int) -> dict:
    """Share of codes used in a batch and the perplexity of the assignment distribution."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).float()
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return {"used": float((counts > 0).float().mean()), "perplexity": float(perplexity)}


# ================================================================================================================
# Quantiser output, shared by the three kinds.

@dataclass
class Quantized:
    decoder_inputs: list  # per scale (b,h,w,c): the VAE decoder's input, straight-through and residual mixed
    guidance: list  # per scale (b,h,w,c): the discrete representation X_n (no residual), detached from Z
    indices: list  # per scale (b,h,w,G) LongTensor: code index per group (G = 1 for vq / msf without intra)
    group_sizes: list  # per scale [m_1, ..., m_G]: codebook size of each group (combined vocab = product)
    loss: torch.Tensor  # codebook + commitment terms summed over scales
    stats: dict = field(default_factory=dict)
    assignments: list = field(default_factory=list)  # (codebook, indices) pairs: what was matched against what
    parts: dict = field(default_factory=dict)  # MSF analysis: before/after inter-scale fusion, scale-variant


def vq_losses(continuous: torch.Tensor, quantized: torch.Tensor, beta: float) -> torch.Tensor:
    """VQ-VAE codebook term ||sg(z) - q||^2 plus commitment beta·||z - sg(q)||^2."""
    return F.mse_loss(quantized, continuous.detach()) + beta * F.mse_loss(continuous, quantized.detach())


def official_vae_losses(continuous: torch.Tensor, quantized: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The release's VAE terms on the (mean-fused) encoding z and quantisation q, channels-last (b,h,w,c):
    alignment ||q - sg(z)||^2, commitment beta·||z - sg(alpha·z + (1-alpha)·q)||^2 towards the residual mix the
    decoder sees (so it vanishes while alpha is 1), and 0.1·||z - sg(group_norm(z))||^2 holding z near unit scale."""
    residual = alpha * continuous + (1 - alpha) * quantized
    normalised = F.group_norm(continuous.detach().permute(0, 3, 1, 2), 1).permute(0, 2, 3, 1)
    return (F.mse_loss(quantized, continuous.detach()) + beta * F.mse_loss(continuous, residual.detach())
            + 0.1 * F.mse_loss(continuous, normalised))


def paper_terms(continuous: torch.Tensor, codes: torch.Tensor, nearest: torch.Tensor, book: "Codebook", beta: float,
                training: bool) -> torch.Tensor:
    """The paper's VQ terms against the *nearest* code, and the usage count of that code.

    Gumbel noise decides which code the decoder sees; the codebook and commitment terms and the dead-code count
    use the noise-free match. With codes drawn from the data, the commitment term towards a sampled code would pull
    every encoding towards some other image's encodings and blur them (measured: reconstruction MSE 0.068 instead
    of 0.031 after 100 steps on `shapes`)."""
    if training:
        book.track(nearest, continuous)
    return vq_losses(continuous, codes[nearest], beta)


def straight_through(continuous: torch.Tensor, quantized: torch.Tensor, alpha: float) -> torch.Tensor:
    """Forward alpha·z + (1-alpha)·q (annealed residual), backward the identity to z. Where no gradient is recorded
    (guidance, evaluation) it is the mixed value itself, exactly: z + (q - z) may differ from q in the last bit."""
    mixed = quantized if alpha == 0 else alpha * continuous + (1 - alpha) * quantized
    if not (torch.is_grad_enabled() and continuous.requires_grad):
        return mixed
    return continuous + (mixed - continuous).detach()


class VectorQuantizer(nn.Module):
    """The VQ-VAE baseline: one codebook, nearest code (Eq. 1-2)."""

    def __init__(self, dim: int, num_codes: int, codebook: str, basis_dim: int, matching: str, beta: float,
                 losses: str = "paper"):
        super().__init__()
        self.codebook = Codebook(num_codes, dim, codebook, basis_dim)
        self.matching, self.beta, self.losses = matching, beta, losses

    def codebooks(self) -> list:
        return [self.codebook]

    def forward(self, z_list: list, alpha: float = 0.0, temperature: float = 0.0) -> Quantized:
        (z,) = z_list  # (b,h,w,c)
        if self.training:
            self.codebook.initialise_from([z])
        codes = self.codebook.codes()
        indices, nearest = (i.view(z.shape[:-1]) for i in  # (b,h,w)
                            match_indices(z.reshape(-1, z.shape[-1]), codes, self.matching, temperature))
        quantized = codes[indices]
        if self.losses == "official":
            if self.training:
                self.codebook.track(indices, z)
            loss = official_vae_losses(z, quantized, alpha, self.beta)
        else:
            loss = paper_terms(z, codes, nearest, self.codebook, self.beta, self.training)
        return Quantized([straight_through(z, quantized, alpha)], [quantized.detach()], [indices[..., None]],
                         [[self.codebook.num_codes]], loss,
                         {"codes": codebook_stats(indices, self.codebook.num_codes)}, [(self.codebook, indices)])


class ProjectPinv(nn.Module):
    """The invertible project-up / project-down pair of OGDR (Eq. 3 and 5): up = Z·pinv(W), down = Y·W, with
    W (g·c, c) trainable, so down(up(Z)) = Z whenever W has full column rank."""

    def __init__(self, dim: int, groups: int = 2):
        super().__init__()
        # A random W with orthonormal columns: pinv(W) = W^T at init, so up() keeps norms (and with them the scale
        # that data-initialised codes and distances see), W is perfectly conditioned, and the groups start as
        # different projections of Z. Stacked identities would make every group an exact copy of Z, so the
        # scale-invariant and scale-variant halves would start indistinguishable. (The release's LinearPinv uses
        # nn.Linear's random init plus a bias; the paper's Eq. 3/5 have no bias, nor does this.)
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(groups * dim, dim)).Q)  # (g·c, c)

    def inverse(self) -> torch.Tensor:
        """pinv(W) (c, g·c): an SVD, so a caller projecting several scales computes it once and passes it to `up`."""
        return torch.linalg.pinv(self.weight.float())

    def up(self, z: torch.Tensor, inverse: torch.Tensor = None) -> torch.Tensor:
        """(…, c) -> (…, g·c)"""
        return z @ (self.inverse() if inverse is None else inverse).to(z.dtype)

    def down(self, y: torch.Tensor) -> torch.Tensor:
        """(…, g·c) -> (…, c)"""
        return y @ self.weight.to(y.dtype)


class GroupedQuantizer(nn.Module):
    """OGDR-style grouped codes: Z·pinv(W) chunked into G groups, each matched with its own codebook of
    codebook_size^(1/G) codes, concatenated and projected back with W."""

    def __init__(self, dim: int, combinations: int, groups: int, codebook: str, basis_dim: int, matching: str,
                 beta: float, losses: str = "paper"):
        super().__init__()
        size = round(combinations ** (1 / groups))
        if size ** groups != combinations:
            raise UserError(f"codebook_size {combinations} is not a perfect power of num_groups={groups}")
        self.project = ProjectPinv(dim, groups)
        self.groups = nn.ModuleList([Codebook(size, dim, codebook, basis_dim) for _ in range(groups)])
        self.matching, self.beta, self.dim, self.losses = matching, beta, dim, losses

    def codebooks(self) -> list:
        return list(self.groups)

    def forward(self, z_list: list, alpha: float = 0.0, temperature: float = 0.0) -> Quantized:
        (z,) = z_list
        parts = self.project.up(z).split(self.dim, -1)  # G x (b,h,w,c)
        continuous, quantized, indices, loss, stats = [], [], [], 0.0, {}
        for g, (part, book) in enumerate(zip(parts, self.groups)):
            if self.training:
                book.initialise_from([part])
            codes = book.codes()
            index, nearest = (i.view(part.shape[:-1]) for i in
                              match_indices(part.reshape(-1, self.dim), codes, self.matching, temperature))
            q = codes[index]
            if self.losses == "paper":
                loss = loss + paper_terms(part, codes, nearest, book, self.beta, self.training)
            elif self.training:
                book.track(index, part)
            continuous.append(part), quantized.append(q), indices.append(index)
            stats[f"group{g}"] = codebook_stats(index, book.num_codes)
        pre, post = torch.cat(continuous, -1), torch.cat(quantized, -1)
        if self.losses == "official":  # on the project-up space, as the release's grouped VAE
            loss = official_vae_losses(pre, post, alpha, self.beta)
        return Quantized([self.project.down(straight_through(pre, post, alpha))], [self.project.down(post).detach()],
                         [torch.stack(indices, -1)], [[b.num_codes for b in self.groups]], loss, stats,
                         list(zip(self.groups, indices)))


# ---------------------------------------------------------------------------------------------------------------
# Inter-scale fusion (Eq. 4), batched.

def _candidate_scales(scale: int, num_scales: int, mode: str) -> list:
    """Scales whose super-pixels vote for scale `scale` (0-based), in the order that wins exact ties: adjacent
    (paper) itself first, then finer, then coarser; all (official) finest first, as the release stacks them."""
    if mode == "none":
        return [scale]
    if mode == "adjacent":
        return [scale] + [k for k in (scale - 1, scale + 1) if 0 <= k < num_scales]
    return list(range(num_scales))


def fuse_inter_scale(z_list: list, codes: torch.Tensor, mode: str = "adjacent", matching: str = "paper",
                     temperature: float = 0.0, return_vectors: bool = True):
    """Eq. 4 for all scales at once: I_n(i,j) = argmax_m max_k P_k(m), over candidate scales k of scale n.

    z_list: N tensors (b, h/2^(n-1), w/2^(n-1), c) of scale-invariant vectors; codes (m, c).
    A finer scale's candidate for super-pixel (i,j) is its 2x2 block (2^(n-k) block for `all`) averaged, a coarser
    scale's is the super-pixel covering (i,j). ONE distance computation (a single matmul) serves every candidate:
    the own vectors of all scales are matched; a pooled finer candidate's distances follow from its block's own
    distances; and a coarser candidate is the coarser scale's own super-pixel, so its match is reused by nearest
    upsampling. No Python loop touches pixels, and the matching itself has no per-scale loop.

    Returns per scale: fused indices (b,h,w); the winning candidate's continuous vector (b,h,w,c) (the straight-
    through estimator and the VQ losses pair the code with the vector that chose it), or None without
    `return_vectors`; the own-scale indices before fusion (b,h,w); and which candidate won (b,h,w), an index
    into `_candidate_scales`.
    """
    num_scales = len(z_list)
    # pooled[(n, k)]: scale k's vectors (k finer than n) averaged over 2^(n-k) blocks, at scale n's resolution
    pooled = {}
    for n in range(num_scales):
        for k in _candidate_scales(n, num_scales, mode):
            if k < n:
                pooled[(n, k)] = F.avg_pool2d(z_list[k].permute(0, 3, 1, 2), 2 ** (n - k)).permute(0, 2, 3, 1)
    with torch.no_grad():
        confidence, best, own_sizes, pooled_sizes = _candidate_matches(z_list, pooled, codes, matching, temperature)
    maps = list(z_list) + list(pooled.values())
    results = [(c.view(m.shape[:3]), i.view(m.shape[:3]))
               for c, i, m in zip(confidence.split(own_sizes + pooled_sizes), best.split(own_sizes + pooled_sizes),
                                  maps)]
    own, pooled_results = results[:num_scales], dict(zip(pooled, results[num_scales:]))

    fused, winners, vectors = [], [], []
    for n in range(num_scales):
        candidate_conf, candidate_idx = [], []
        for k in _candidate_scales(n, num_scales, mode):
            if k == n:
                conf, idx = own[n]
            elif k < n:
                conf, idx = pooled_results[(n, k)]
            else:  # the covering coarser super-pixel: its own match, nearest-upsampled
                f = 2 ** (k - n)
                conf, idx = (t.repeat_interleave(f, 1).repeat_interleave(f, 2) for t in own[k])
            candidate_conf.append(conf), candidate_idx.append(idx)
        winner = torch.stack(candidate_conf, -1).argmax(-1)  # (b,h,w): the most confident candidate decides
        fused.append(torch.stack(candidate_idx, -1).gather(-1, winner[..., None])[..., 0])
        winners.append(winner)
        vectors.append(_winning_vectors(z_list, pooled, n, winner, mode) if return_vectors else None)
    return fused, vectors, [o[1] for o in own], winners


def _candidate_matches(z_list: list, pooled: dict, codes: torch.Tensor, matching: str, temperature: float):
    """log max_m P and argmax_m P (flat) of every own and pooled candidate, from one matmul."""
    # The one matmul: own vectors of every scale against the codebook, into a buffer that also takes the pooled
    # candidates' rows. A block mean v = mean_i z_i needs no matmul of its own, since
    #   ||v - c||^2 = mean_i ||z_i - c||^2 - (mean_i ||z_i||^2 - ||v||^2),
    # so its squared distances are the own ones average-pooled, minus the block's spread.
    dim = codes.shape[1]
    own_sizes = [z.shape[0] * z.shape[1] * z.shape[2] for z in z_list]
    pooled_sizes = [v.shape[0] * v.shape[1] * v.shape[2] for v in pooled.values()]
    squared = torch.empty(sum(own_sizes) + sum(pooled_sizes), codes.shape[0], device=codes.device)
    own_flat = torch.cat([z.reshape(-1, dim) for z in z_list]).float()
    own_norms = torch.linalg.vector_norm(own_flat, dim=1).square_()
    own_squared = squared_code_distances(own_flat, codes, out=squared[:sum(own_sizes)], vector_norms=own_norms)
    own_maps = [(d.view(*z.shape[:3], -1), q.view(z.shape[:3]))
                for d, q, z in zip(own_squared.split(own_sizes), own_norms.split(own_sizes), z_list)]
    offset = sum(own_sizes)
    for ((n, k), vectors), size in zip(pooled.items(), pooled_sizes):
        f = 2 ** (n - k)
        distances, norms = own_maps[k]
        block_distances = F.avg_pool2d(distances.permute(0, 3, 1, 2), f).permute(0, 2, 3, 1)
        spread = F.avg_pool2d(norms[:, None], f)[:, 0] - torch.linalg.vector_norm(vectors.float(), dim=-1).square()
        squared[offset:offset + size] = (block_distances - spread[..., None]).reshape(size, -1).clamp_min(0)
        offset += size
    logits = logits_from_squared(squared, dim, matching, temperature)  # (M, m), every candidate once
    if matching == "official":
        # The release compares float32 softmax probabilities: confident candidates saturate at exactly 1.0 and the
        # tie goes to the first of them, the finest scale (see `_candidate_scales`). Reproduced as it is.
        confidence, best = torch.softmax(logits, 1).max(1)
    else:
        confidence, best = log_max_probability(logits)  # log max_m P, with P = softmax(logits)
    return confidence, best, own_sizes, pooled_sizes


def _winning_vectors(z_list: list, pooled: dict, n: int, winner: torch.Tensor, mode: str) -> torch.Tensor:
    """Scale n's own vectors with the positions won by another candidate overwritten by that candidate's vector;
    only the won positions are gathered, so no upsampled copy of a coarser scale is ever built."""
    vectors = z_list[n].clone()
    for position, k in enumerate(_candidate_scales(n, len(z_list), mode)):
        if k == n:
            continue
        b, i, j = (winner == position).nonzero(as_tuple=True)
        if k < n:
            vectors[b, i, j] = pooled[(n, k)][b, i, j]
        else:
            f = 2 ** (k - n)
            vectors[b, i, j] = z_list[k][b, torch.div(i, f, rounding_mode="floor"), torch.div(j, f, rounding_mode="floor")]
    return vectors


def inter_scale_indices(z: list, codebook: torch.Tensor) -> list:
    """Eq. 4 with argmax matching: z is N tensors (b, h/2^(n-1), w/2^(n-1), c), codebook (m, c);
    returns N LongTensors (b, h_n, w_n) of fused code indices (adjacent scales as candidates)."""
    with torch.no_grad():
        return fuse_inter_scale(z, codebook, "adjacent", "paper", 0.0, return_vectors=False)[0]


def _identity(y):
    return y


class MultiScaleQuantizer(nn.Module):
    """MSF: split Z_n into scale-invariant / scale-variant halves (Eq. 3), fuse the invariant half across scales
    over one shared codebook (Eq. 4), match the variant half with a per-scale codebook, and recombine (Eq. 5)."""

    def __init__(self, dim: int, num_scales: int, si_size: int, sv_sizes: list, inter_scale_fusion: bool,
                 intra_scale_fusion: bool, sv_codebook: str, fusion: str, candidates: str, codebook: str,
                 basis_dim: int, matching: str, beta: float, losses: str = "paper"):
        super().__init__()
        self.dim, self.num_scales, self.matching, self.beta, self.losses = dim, num_scales, matching, beta, losses
        self.mode = candidates if inter_scale_fusion else "none"
        self.intra = intra_scale_fusion
        self.fusion = fusion
        self.split = intra_scale_fusion and fusion == "concat_pinv"
        if self.split:
            self.project = ProjectPinv(dim, 2)
        self.si = Codebook(si_size, dim, codebook, basis_dim)
        if intra_scale_fusion:
            # "shared": one scale-variant codebook for every scale (ablation); "specified": one per scale
            count = 1 if sv_codebook == "shared" else num_scales
            self.sv = nn.ModuleList([Codebook(sv_sizes[n], dim, codebook, basis_dim) for n in range(count)])

    def codebooks(self) -> list:
        return [self.si] + (list(self.sv) if self.intra else [])

    def _sv_codebook(self, scale: int) -> Codebook:
        return self.sv[scale if len(self.sv) > 1 else 0]

    def forward(self, z_list: list, alpha: float = 0.0, temperature: float = 0.0) -> Quantized:
        if self.split:
            inverse = self.project.inverse()  # one SVD for every scale
            halves = [self.project.up(z, inverse).split(self.dim, -1) for z in z_list]
            z_si, z_sv = [h[0] for h in halves], [h[1] for h in halves]
        else:  # `mean` fusion (official code) and intra-scale fusion off: both halves are Z itself
            z_si, z_sv = list(z_list), list(z_list)

        if self.training:
            self.si.initialise_from(z_si)
            if self.intra:
                for n, book in enumerate(self.sv):
                    book.initialise_from(z_sv if len(self.sv) == 1 else [z_sv[n]])
        codes_si = self.si.codes()
        fused, winners_z, own_idx, _ = fuse_inter_scale(z_si, codes_si, self.mode, self.matching, temperature)
        if self.losses == "paper" and temperature > 0:  # the noise-free fusion, for the VQ terms (`paper_terms`)
            nearest, nearest_z = fuse_inter_scale(z_si, codes_si, self.mode, self.matching, 0.0)[:2]
        else:
            nearest, nearest_z = fused, winners_z
        loss, stats, parts, assignments = 0.0, {}, {"si_before": [], "si_after": [], "sv": []}, []
        decoder_inputs, guidance, indices, group_sizes = [], [], [], []
        for n in range(self.num_scales):
            q_si = codes_si[fused[n]]  # X_si dot of scale n: the fused scale-invariant code
            if self.losses == "paper":
                loss = loss + paper_terms(nearest_z[n], codes_si, nearest[n], self.si, self.beta, self.training)
            elif self.training:
                self.si.track(fused[n], winners_z[n])
            stats[f"si_scale{n + 1}"] = codebook_stats(fused[n], self.si.num_codes)
            assignments.append((self.si, fused[n]))
            parts["si_before"].append(codes_si[own_idx[n]].detach())
            parts["si_after"].append(q_si.detach())
            if not self.intra:
                pre, post = winners_z[n], q_si
                index, sizes = fused[n][..., None], [self.si.num_codes]
                combine = _identity
            else:
                book = self._sv_codebook(n)
                codes_sv = book.codes()
                index_sv, nearest_sv = (i.view(z_sv[n].shape[:-1]) for i in match_indices(
                    z_sv[n].reshape(-1, self.dim), codes_sv, self.matching, temperature))
                q_sv = codes_sv[index_sv]
                if self.losses == "paper":
                    loss = loss + paper_terms(z_sv[n], codes_sv, nearest_sv, book, self.beta, self.training)
                elif self.training:
                    book.track(index_sv, z_sv[n])
                stats[f"sv_scale{n + 1}"] = codebook_stats(index_sv, book.num_codes)
                assignments.append((book, index_sv))
                parts["sv"].append(q_sv.detach())
                index, sizes = torch.stack([fused[n], index_sv], -1), [self.si.num_codes, book.num_codes]
                if self.split:  # Eq. 5: X_n = concat(X_si, X_sv)·W
                    pre, post = torch.cat([winners_z[n], z_sv[n]], -1), torch.cat([q_si, q_sv], -1)
                    combine = self.project.down
                else:  # official code: plain mean of the shared and the specific vector
                    pre, post = (winners_z[n] + z_sv[n]) / 2, (q_si + q_sv) / 2
                    combine = _identity
            if self.losses == "official":  # on the fused encoding and quantisation the decoder path uses
                loss = loss + official_vae_losses(pre, post, alpha, self.beta)
            decoder_inputs.append(combine(straight_through(pre, post, alpha)))
            # Without the residual the decoder input has post's value (exactly where no gradient is recorded, as for
            # the guidance an OCL model reads; within rounding in a VAE training step), so no second projection pass.
            guidance.append(decoder_inputs[-1].detach() if alpha == 0 else combine(post).detach())
            indices.append(index)
            group_sizes.append(sizes)
        return Quantized(decoder_inputs, guidance, indices, group_sizes, loss, stats, assignments, parts)


# ================================================================================================================
# The VAE.

class VAE(nn.Module):
    """Shared encoder over the image pyramid, a quantiser, and a shared decoder that reconstructs every scale."""

    def __init__(self, config: dict):
        super().__init__()
        # Keys not given take their defaults, like keyword arguments (the tests build small VAEs from a few keys); a
        # checkpoint's config is completed, or refused, by checkpoints.complete_config before it gets here.
        config = {**{key: o.default for key, o in VAE_OPTIONS.items()}, **config}
        self.config = config
        c = config["code_dim"]
        self.kind = config["quantizer"]
        self.num_scales = config["num_scales"] if self.kind == "msf" else 1
        self.encoder = Encoder(config["vae_width"], c, config["vae_norm"])
        self.decoder = Decoder(config["vae_width"], c, config["vae_norm"])
        common = dict(codebook=config["codebook"], basis_dim=config["simvq_basis_dim"], matching=config["matching"],
                      beta=config["commitment"], losses=config["vae_losses"])
        if self.kind == "vq":
            self.quantizer = VectorQuantizer(c, config["codebook_size"], **common)
        elif self.kind == "grouped":
            self.quantizer = GroupedQuantizer(c, config["codebook_size"], config["num_groups"], **common)
        else:
            si_size, sv_sizes = msf_codebook_sizes(config)
            self.quantizer = MultiScaleQuantizer(
                c, self.num_scales, si_size, sv_sizes, config["inter_scale_fusion"], config["intra_scale_fusion"],
                config["sv_codebook"], config["fusion"], config["candidates"], **common)

    def encode(self, images: torch.Tensor, num_scales: int = None) -> tuple:
        """Pyramid and per-scale continuous Z: lists of (b,3,H_n,W_n) and (b,h_n,w_n,c)."""
        pyramid = image_pyramid(images, num_scales or self.num_scales, self.config["pyramid"])
        # channels-last in, so the encoder's convolutions run NHWC and its (b,c,h,w) output permuted to (b,h,w,c)
        # is contiguous, and so is every vector the quantiser builds from it
        return pyramid, [self.encoder(channels_last(t)).permute(0, 2, 3, 1) for t in pyramid]

    def forward(self, images: torch.Tensor, alpha: float = 0.0, temperature: float = 0.0,
                return_reconstructions: bool = False):
        """Training loss: per-scale reconstruction MSE of T_n plus the codebook and commitment terms."""
        pyramid, z = self.encode(images)
        with torch.autocast(images.device.type, enabled=False):  # distances and argmins in float32
            quantized = self.quantizer([v.float() for v in z], alpha, temperature)
        reconstructions = [self.decoder(channels_last(x.permute(0, 3, 1, 2))) for x in quantized.decoder_inputs]
        recon_losses = [F.mse_loss(r.float(), t.float()) for r, t in zip(reconstructions, pyramid)]
        loss = sum(recon_losses) + quantized.loss
        stats = {"loss": loss.detach(), "vq_loss": quantized.loss.detach()}
        for n, value in enumerate(recon_losses):
            stats[f"recon_mse_scale{n + 1}"] = value.detach()
        for name, book_stats in quantized.stats.items():
            stats[f"{name}_perplexity"] = book_stats["perplexity"]
        if return_reconstructions:
            return loss, stats, quantized, reconstructions
        return loss, stats

    @torch.no_grad()
    def quantize(self, images: torch.Tensor, temperature: float = 0.0) -> Quantized:
        """Quantisation of every scale without residual: argmax matching, or Gumbel-sampled with `temperature`."""
        _, z = self.encode(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.quantizer([v.float() for v in z], 0.0, temperature)

    @torch.no_grad()
    def guidance(self, images: torch.Tensor, scales=(1,), temperature: float = 0.0) -> dict:
        """What an OCL decoder is guided by: for each requested scale, the fused discrete vectors (b,h,w,c), the
        code indices per group (b,h,w,G) and the group sizes. The decoder is not run. `temperature` > 0 samples
        the matches (the release does so while training an OCL model: Gumbel on 5x its normalised logits)."""
        if max(scales) > self.num_scales:
            raise UserError(f"guidance scale {max(scales)} asked of a VAE with {self.num_scales} scale(s)")
        quantized = self.quantize(images, temperature)
        return {"vectors": [quantized.guidance[s - 1] for s in scales],
                "indices": [quantized.indices[s - 1] for s in scales],
                "group_sizes": [quantized.group_sizes[s - 1] for s in scales]}

    @torch.no_grad()
    def decode(self, vectors: torch.Tensor) -> torch.Tensor:
        """(b,h,w,c) guidance vectors -> (b,3,4h,4w) image."""
        return self.decoder(channels_last(vectors.permute(0, 3, 1, 2)))

    def codebooks(self) -> list:
        return self.quantizer.codebooks()


def msf_codebook_sizes(config: dict) -> tuple:
    """Shared (scale-invariant) and per-scale (scale-variant) codebook sizes; by default sqrt(codebook_size) each,
    so the combinations per scale equal the VQ baseline's 4096."""
    root = math.isqrt(config["codebook_size"])
    si_size = config["si_codebook_size"] or root
    sv = config["sv_codebook_sizes"] or [root]
    if len(sv) == 1:
        sv = sv * config["num_scales"]
    if len(sv) != config["num_scales"]:
        raise UserError(f"sv_codebook_sizes has {len(sv)} entries for num_scales={config['num_scales']}")
    return si_size, sv


# ================================================================================================================
# Config keys of the VAE (pretrain_vae.py adds the training keys; checkpoints store all of them).

VAE_OPTIONS = {
    "quantizer": option("msf", "guidance kind: vq (one codebook), grouped (OGDR), msf", choices=("vq", "grouped", "msf")),
    "code_dim": option(256, "code dimension c: 256 for transformer decoders, 4 for diffusion", min=1),
    "vae_width": option(64, "channels of the encoder/decoder conv blocks", min=1),
    "vae_norm": option("group", "norm of the conv blocks: SLATE's GroupNorm(1) (each image's map as a whole) or "
                                "BatchNorm over the global batch", choices=("group", "batch")),
    "codebook_size": option(4096, "vq: number of codes; grouped/msf: number of code combinations", min=1),
    "num_groups": option(2, "grouped: number of groups (codebook_size^(1/groups) codes each)", min=1),
    "num_scales": option(3, "msf: pyramid scales N (1 = no pyramid); vq and grouped always use one scale", min=1,
                         max=4),
    "inter_scale_fusion": option(True, "msf: fuse the scale-invariant half across scales (Eq. 4)"),
    "intra_scale_fusion": option(True, "msf: split into invariant/variant halves and recombine (Eq. 3, 5)"),
    "sv_codebook": option("specified", "msf: one scale-variant codebook per scale, or one shared",
                          choices=("specified", "shared")),
    "fusion": option("concat_pinv", "msf intra-scale fusion: concat·W with pinv split (paper) or mean (official)",
                     choices=("concat_pinv", "mean")),
    "candidates": option("adjacent", "msf inter-scale candidates: adjacent scales (Eq. 4) or all (official)",
                         choices=("adjacent", "all")),
    "si_codebook_size": option(0, "msf: shared codebook size (0 = sqrt(codebook_size))", min=0),
    "sv_codebook_sizes": option([], "msf: per-scale codebook sizes, one value or one per scale (empty = sqrt)",
                                type="int_list", min=1),
    "codebook": option("plain", "code parametrisation: plain vectors or simvq (frozen basis + linear, official)",
                       choices=("plain", "simvq")),
    "simvq_basis_dim": option(1024, "simvq: dimension of the frozen random basis", min=1),
    "matching": option("paper", "logits: -L2 distance (paper) or divided by the chi std (official)",
                       choices=("paper", "official")),
    "commitment": option(0.25, "commitment loss weight beta", min=0.0),
    "vae_losses": option("paper", "paper: VQ codebook + commitment per codebook; official: the release's alignment, "
                                  "commitment towards the residual and group-norm terms on the fused vectors",
                         choices=("paper", "official")),
    "pyramid": option("paper", "msf pyramid: paper (repeated 2x bilinear halving = box means) or official "
                               "(one bilinear resize per scale)", choices=("paper", "official")),
    "gumbel": option(True, "Gumbel sampling of the code match during pretraining"),
    "gumbel_temperature_start": option(1.0, "paper matching: Gumbel noise at step 0, in units of the logits' spread",
                                       min=0.0),
    "gumbel_temperature_end": option(0.0, "paper matching: Gumbel noise at the end of its anneal", min=0.0),
    "gumbel_anneal_fraction": option(0.5, "paper matching: fraction of training over which the noise is annealed "
                                          "(official matching follows the release: 1 / (1 -> 2) over the whole run)",
                                     min=0.0, max=1.0),
    "residual_anneal": option(True, "decoder input alpha·Z + (1-alpha)·X with alpha cosine-annealed 1 -> 0"),
    "residual_anneal_fraction": option(0.5, "fraction of training over which alpha goes from 1 to 0", min=0.0,
                                       max=1.0),
    "code_replacement": option(True, "re-initialise dead codes from recent encoder outputs"),
    "replace_every": option(100, "steps per code-replacement window (dead codes are replaced at its end)", min=1),
    "dead_fraction": option(0.03, "a code is dead when its use over a window falls under this fraction of uniform",
                            min=0.0, max=1.0),
}


def check_vae_config(config: dict, resolution: int) -> None:
    """Assert the VAE config's invariants before anything is built (clear errors instead of shape failures)."""
    scales = config["num_scales"] if config["quantizer"] == "msf" else 1
    if not 1 <= scales <= 4:
        raise UserError(f"num_scales must be 1..4, got {scales}")
    if resolution % (4 * 2 ** (scales - 1)):
        raise UserError(f"resolution {resolution} must be divisible by 4·2^(num_scales-1) = {4 * 2 ** (scales - 1)}")
    if config["code_replacement"] and config["codebook"] == "simvq":
        raise UserError("code_replacement needs codebook: plain (SimVQ codes are a function of a frozen basis)")
    if config["quantizer"] == "msf":
        msf_codebook_sizes(config)
        if not config["intra_scale_fusion"] and config["fusion"] == "mean":
            raise UserError("fusion: mean is an intra-scale fusion; it needs intra_scale_fusion: true")


def build_vae(config: dict) -> VAE:
    return VAE(config)


# ================================================================================================================
# Visualisation of code maps: DINO-style PCA colouring (first three principal components as RGB).

@torch.no_grad()
def pca_colours(vectors: torch.Tensor) -> torch.Tensor:
    """(b,h,w,c) vectors -> (b,3,h,w) colours in [0,1]; the PCA basis is shared by the whole batch so colours are
    comparable across images."""
    b, h, w, c = vectors.shape
    flat = vectors.reshape(-1, c).float()
    flat = flat - flat.mean(0)
    components = min(3, c)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    projected = flat @ v[:components].t()
    if components < 3:
        projected = F.pad(projected, (0, 3 - components))
    low, high = projected.quantile(0.01, 0), projected.quantile(0.99, 0)
    colours = ((projected - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    return colours.reshape(b, h, w, 3).permute(0, 3, 1, 2)
