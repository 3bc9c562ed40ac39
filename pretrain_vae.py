"""Stage 1: pretrain the guidance VAE (VQ-VAE, grouped OGDR codes, or MSF) on images or video frames.

    python pretrain_vae.py configs/vae_msf_shapes.yaml [--key value ...]
    torchrun --nproc_per_node K pretrain_vae.py configs/vae_msf_clevrtex.yaml

Per scale n: reconstruction MSE of T_n plus the VQ codebook and commitment terms (msf.VAE.forward). Adam with linear
warm-up and cosine decay, AMP on GPU, global-norm clipping, code replacement, validation with per-scale MSE and
codebook usage, PNG grids of reconstructions and code maps, atomic checkpoints (last K kept), exact `--resume`.
"""

import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import msf
from checkpoints import old_defaults
from config import TRAINING_OPTIONS, load_config, option, save_config, schedule_options
from data import check_resumed_data, eval_loader, training_loaders
from devices import autocast
from errors import run_main
from grids import save_labelled_grid
from runs import check_finite_state, progress_bar, save_checkpoint
from schedules import set_scheduled_lr
from training import (checkpoint_payload, finish_run, gather_rng_states, optimizer_and_rng, optimizer_step,
                      record_training, record_validation, start_run, stop_on_non_finite)

# ----------------------------------------------------------------------------------------------------------------
# Config: the VAE's keys (msf.VAE_OPTIONS) plus these. Defaults are the paper's schedule (README, "Configs").

TRAIN_OPTIONS = {
    **TRAINING_OPTIONS,
    "resolution": option(0, "input resolution (0 = as stored; the CPU demo trains at 64)", min=0),
    **schedule_options(out_dir="runs/vae", steps=30000, batch_size=64, lr=2e-3, val_every=600, val_batch_size=64),
}
OPTIONS = {**msf.VAE_OPTIONS, **TRAIN_OPTIONS}
MODEL_KEYS = list(msf.VAE_OPTIONS)


# ----------------------------------------------------------------------------------------------------------------
# Helpers.

def frames_of(batch: dict) -> torch.Tensor:
    """Images (b,3,H,W), or video clips (b,T,3,H,W) flattened to frames."""
    if "video" in batch:
        return batch["video"].flatten(0, 1)
    return batch["image"]


@torch.no_grad()
def validate(model: msf.VAE, loader, d, dtype) -> dict:
    """Per-scale reconstruction MSE and codebook usage over the validation split (all ranks reduced)."""
    model.eval()
    sums = torch.zeros(model.num_scales + 1, device=d.device, dtype=torch.float64)  # per-scale SE, pixel count
    psnr = torch.zeros(model.num_scales + 1, device=d.device, dtype=torch.float64)  # per-scale PSNR sum, images
    books = model.codebooks()
    counts = [torch.zeros(b.num_codes, device=d.device) for b in books]
    for batch in loader:
        images = frames_of(batch).to(d.device, non_blocking=True)
        with autocast(d.device, dtype):
            _, _, quantized, recons = model(images, return_reconstructions=True)
        pyramid = msf.image_pyramid(images, model.num_scales, model.config["pyramid"])
        for n, (r, t) in enumerate(zip(recons, pyramid)):
            per_image = (r.float() - t).square().flatten(1).mean(1).double()  # MSE of each image at this scale
            sums[n] += per_image.sum() * images[0].numel()  # as squared errors at full resolution
            psnr[n] += (10 * torch.log10(4.0 / per_image.clamp_min(1e-10))).sum()  # peak-to-peak range 2 ([-1, 1])
        sums[-1] += images.numel()
        psnr[-1] += images.shape[0]
        for book, indices in quantized.assignments:
            count = counts[books.index(book)]
            count += torch.bincount(indices.reshape(-1), minlength=book.num_codes).float()
    if d.enabled:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(psnr)
        for count in counts:
            torch.distributed.all_reduce(count)
    model.train()
    result = {f"val_recon_mse_scale{n + 1}": float(sums[n] / sums[-1]) for n in range(model.num_scales)}
    result.update({f"val_psnr_scale{n + 1}": float(psnr[n] / psnr[-1]) for n in range(model.num_scales)})
    for i, (book, count) in enumerate(zip(books, counts)):
        p = count / count.sum().clamp_min(1)
        result[f"val_codebook{i}_usage"] = float((count > 0).float().mean())
        result[f"val_codebook{i}_perplexity"] = float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))
    return result


@torch.no_grad()
def save_figure(model: msf.VAE, images: torch.Tensor, path: str) -> None:
    """Rows, each labelled: input, reconstruction of every scale (upsampled), PCA-coloured code map of every
    scale."""
    model.eval()
    _, _, quantized, recons = model(images, return_reconstructions=True)
    model.train()
    size = images.shape[-1]
    rows, labels = [images.float().clamp(-1, 1) * 0.5 + 0.5], ["input"]
    for n, r in enumerate(recons):
        rows.append(F.interpolate(r.float().clamp(-1, 1) * 0.5 + 0.5, size=size, mode="nearest"))
        labels.append(f"reconstruction, scale {n + 1}")
    for n, g in enumerate(quantized.guidance):  # PCA of non-finite codes would fail (LinAlgError): grey instead
        finite = bool(torch.isfinite(g).all())
        colours = msf.pca_colours(g) if finite else torch.full((g.shape[0], 3, *g.shape[1:3]), 0.5)
        rows.append(F.interpolate(colours.to(images.device), size=size, mode="nearest"))
        labels.append(f"code map, scale {n + 1} (PCA)")
    save_labelled_grid(rows, labels, path)


def warn_collapsed_codebooks(metrics: dict, log, threshold: float = 0.10) -> None:
    """One loud line per codebook that uses under `threshold` of its codes on validation: its tokens carry
    little information, and an OCL model guided by them has little to bind to."""
    for key, usage in metrics.items():
        if key.endswith("_usage") and usage < threshold:
            book = key[len("val_"):-len("_usage")]
            log.info(f"WARNING: {book} is collapsed: {100 * usage:.1f}% of its codes are used on validation "
                     f"(perplexity {metrics[key.replace('_usage', '_perplexity')]:.1f}); train longer, or check the "
                     f"Gumbel and code-replacement settings, before using this VAE as guidance")


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    config = load_config(OPTIONS, argv, description=__doc__)
    # DDP, the run directory and the checkpoint to resume from (None for a fresh start) with its step.
    d, log, state, start_step = start_run(config, "vae", MODEL_KEYS, old_defaults(msf.VAE_OPTIONS))
    loader, val, val_path = training_loaders(config, d, start_step)
    check_resumed_data(state, loader.dataset, config)  # the same path may hold regenerated data
    resolution = loader.dataset.resolution  # resolution 0 trains at the stored size
    msf.check_vae_config(config, resolution)

    # Model: the global seed gives every rank, whatever the world size, the same initial weights. From then on each
    # rank draws its own noise (Gumbel, code replacement); resume restores that state.
    torch.manual_seed(config["seed"])
    model = msf.build_vae(config).to(d.device)
    optimizer, dtype, scaler = optimizer_and_rng(model.parameters(), config, d, model, state, log)
    with warnings.catch_warnings():  # torch >= 2.10 deprecates the flag; its replacement is missing in older torch
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        # Codebook usage statistics are per rank and reduced explicitly; rank 0's must not overwrite them.
        ddp_model = DDP(model, broadcast_buffers=False) if d.enabled else model
    if d.is_main:
        save_config(config, os.path.join(config["out_dir"], "config.yaml"))
    log.info(f"VAE {config['quantizer']}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
             f"{len(loader.dataset)} training samples at {resolution}px, {d.world_size} process(es) on {d.device}")
    first = next(iter(eval_loader(val_path, 8, 0, d, resolution, 8)))
    figure_images = (first["video"][:, 0] if "video" in first else first["image"]).to(d.device)

    def checkpoint(step: int) -> str:
        states = gather_rng_states(d)
        if not d.is_main:
            return ""
        return save_checkpoint(checkpoint_payload("vae", model, optimizer, scaler, step, config, states, resolution,
                                                  loader.dataset.fingerprint),
                               config["out_dir"], step, config["keep_checkpoints"])

    # The loop: every schedule is a pure function of the step, so resume is exact.
    steps = config["steps"]
    progress = progress_bar(steps, start_step, "pretrain_vae", d.is_main)
    batches = iter(loader)
    last_time, replaced, metrics = time.perf_counter(), 0, None
    for step in range(start_step, steps):
        lr = set_scheduled_lr(optimizer, step, config)
        alpha = msf.residual_alpha(step, steps, config)
        temperature = msf.gumbel_temperature(step, steps, config)
        images = frames_of(next(batches)).to(d.device, non_blocking=True)
        with autocast(d.device, dtype):
            loss, stats = ddp_model(images, alpha, temperature)
        stop_on_non_finite(loss, step, d, config["out_dir"])
        grad_norm = optimizer_step(loss, model.parameters(), optimizer, scaler, config["grad_clip"])
        for book in model.codebooks():
            reset = book.maintain(config["code_replacement"], config["replace_every"], config["dead_fraction"])
            if reset.any():
                msf.reset_optimizer_rows(optimizer, book.weight, reset)
                replaced += int(reset.sum())
        progress.update(1)

        if step % config["log_every"] == 0 or step == steps - 1:
            now = time.perf_counter()
            entry = record_training(log, stats, d, step, (now - last_time) / (1 if step == start_step
                                                                              else config["log_every"]),
                                    lr=lr, alpha=alpha, temperature=temperature, grad_norm=grad_norm,
                                    replaced_codes=replaced)
            last_time, replaced = now, 0
            progress.set_postfix(loss=f"{entry['loss']:.4f}", replaced=entry["replaced_codes"])
        if (step + 1) % config["val_every"] == 0 or step == steps - 1:
            metrics = validate(model, val, d, dtype)
            record_validation(log, metrics, step)
            check_finite_state(model, {k: v for k, v in metrics.items() if "recon_mse" in k}, step + 1,
                               config["out_dir"])
            path = checkpoint(step + 1)
            if path:
                log.info(f"saved {path}")
            if d.is_main:  # after the checkpoint, so a figure that runs out of memory loses no step; any random
                # numbers it draws are given back, so the checkpoint resumes exactly
                figure = os.path.join(config["out_dir"], "figures", f"step_{step + 1:07d}.png")
                with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
                    save_figure(model, figure_images, figure)
                log.image("figures/validation", figure, step + 1)
    progress.close()
    if start_step >= steps:
        log.info(f"nothing to do: the checkpoint is at step {start_step} of {steps}")
    elif metrics is not None:
        warn_collapsed_codebooks(metrics, log)
    finish_run(log, d, config["out_dir"])


if __name__ == "__main__":
    run_main(main)
