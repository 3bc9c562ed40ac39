"""Stage 2: train an object-centric model (SLATE, STEVE, SlotDiffusion, DINOSAUR, SysBinder, OGDR) under the
guidance of a frozen, pretrained VAE.

    python train_ocl.py configs/slate_msf_shapes.yaml [--key value ...]
    torchrun --nproc_per_node K train_ocl.py configs/steve_msf_movid.yaml

Adam with warm-up + cosine, AMP on GPU, clipping (1.0 images, 0.02 videos in the configs), validation with ARI,
ARIfg, mIoU and mBO (metrics.py), PNG figures, atomic checkpoints (last K and best.pt),
exact `--resume`, DDP with the loss computed inside the wrapped module's forward.
"""

import math
import os
import re
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import model as models
import msf
from checkpoints import complete_config, old_defaults
from config import TRAINING_OPTIONS, load_config, option, save_config, schedule_options
from data import check_resumed_data, eval_loader, training_loaders
from devices import autocast
from errors import UserError, run_main
from figures import save_figures
from files import atomic_torch_save
from metrics import IGNORE, score_batch, segments_at
from runs import (CHECKPOINT_PATTERN, check_finite_state, load_checkpoint, load_weights, progress_bar, save_checkpoint,
                  share_frozen_weights, slim_checkpoint)
from schedules import set_scheduled_lr
from training import (checkpoint_payload, finish_run, gather_rng_states, optimizer_and_rng, optimizer_step,
                      record_training, record_validation, start_run, stop_on_non_finite)

# ----------------------------------------------------------------------------------------------------------------
# Config: the model's keys (model.OCL_OPTIONS) plus these. Defaults are the paper's schedule (README, "Configs").

TRAIN_OPTIONS = {
    **TRAINING_OPTIONS,
    "resolution": option(128, "input resolution (the data is resized on the fly if stored otherwise)", min=1),
    **schedule_options(out_dir="runs/ocl", steps=50000, batch_size=32, lr=2e-4, val_every=1000, val_batch_size=32),
    "best_metric": option("ari+ari_fg", "validation metric that selects best.pt",
                          choices=("ari", "ari_fg", "miou", "mbo", "ari+ari_fg")),
}
OPTIONS = {**models.OCL_OPTIONS, **TRAIN_OPTIONS}
# Model entries that never change in training, saved once per run directory instead of in every checkpoint.
FROZEN_PREFIXES = ("vae.", "encoder.backbone.dino.")
MODEL_KEYS = list(models.OCL_OPTIONS) + ["resolution"]


# ----------------------------------------------------------------------------------------------------------------
# The frozen guidance VAE named by the config (model.build_model then checks the method against the data).

def load_guidance_vae(config: dict):
    """The frozen VAE named by `vae_ckpt`, checked against the OCL config; None for DINOSAUR."""
    patch = re.search(r"patch(\d+)", config["dino_model"])  # timm names carry the ViT's patch size
    if config["encoder"] == "dino_biglittle" and patch and config["resolution"] % int(patch.group(1)):
        raise UserError(f"the DINO encoder ({config['dino_model']}) cuts images into {patch.group(1)}-pixel patches, "
                        f"which do not divide resolution {config['resolution']}; use a multiple of {patch.group(1)}")
    if config["method"] == "dinosaur":
        if config["guidance"] != "none":
            raise UserError("DINOSAUR reconstructs DINO features and takes no VAE guidance; set guidance: none")
        if config["encoder"] != "dino_biglittle":
            raise UserError("DINOSAUR needs the DINO encoder (encoder: dino_biglittle)")
        return None, None
    if config["method"] == "mixture" and config["mixture_target"] == "pixels":
        if config["guidance"] != "none":
            raise UserError("mixture_target: pixels reconstructs the images without a VAE; set guidance: none")
        return None, None
    if config["guidance"] == "none":
        raise UserError(f"method {config['method']} needs VAE guidance: set guidance to vq, grouped or msf")
    if not config["vae_ckpt"]:
        raise UserError(f"method {config['method']} needs vae_ckpt: the VAE checkpoint (or run directory) made by "
                        f"pretrain_vae.py")
    state = load_checkpoint(config["vae_ckpt"], kind="vae")
    vae_config = complete_config(state["config"], msf.VAE_OPTIONS, state["path"])
    if vae_config["quantizer"] != config["guidance"]:
        raise UserError(f"{state['path']} is a '{vae_config['quantizer']}' VAE but the config asks for guidance: "
                        f"{config['guidance']}; point vae_ckpt at a {config['guidance']} VAE")
    if config["method"] == "ogdr" and config["guidance"] != "grouped":
        raise UserError("OGDR is SLATE guided by grouped codes: set guidance: grouped")
    if config["method"] == "slotdiffusion" and vae_config["code_dim"] > 16:
        raise UserError(f"SlotDiffusion diffuses the VAE latent; {state['path']} has code_dim {vae_config['code_dim']},"
                        f" use a c=4 VAE (configs/vae_*_c4_*.yaml)")
    vae_resolution = state["data"]["resolution"]
    if vae_resolution != config["resolution"]:
        raise UserError(f"{state['path']} was pretrained at {vae_resolution}px but the OCL config uses resolution "
                        f"{config['resolution']}; use the same resolution for both stages")
    vae = msf.build_vae(vae_config)
    load_weights(vae, state["model"], state["path"])
    return vae, state


def check_resumed_vae(state, vae, vae_state) -> None:
    """Refuse to resume on another guidance VAE than the one the checkpoint trained with (vae_ckpt retrained or
    replaced since): the checkpoint keeps that VAE's weights, which would not fit the new VAE's shapes or silently
    take the place of its weights."""
    if state is None or vae is None:
        return
    saved = {key[len("vae."):]: value for key, value in state["model"].items() if key.startswith("vae.")}
    changed = sorted(set(saved) ^ set(vae.state_dict())) + [  # other entries, or other weights (buffers may move)
        name for name, value in vae.named_parameters()
        if name in saved and (saved[name].shape != value.shape or not torch.equal(saved[name], value.detach()))]
    if saved and changed:
        raise UserError(f"checkpoint {state['path']} was trained with another guidance VAE than {vae_state['path']} "
                        f"holds now (it was retrained or replaced since: {changed[0]} differs); put the VAE the run "
                        f"was trained with back there, or start afresh in another --out_dir")


@torch.no_grad()
def measure_latent_scale(model: models.OCLModel, dataset, device, samples: int = 32) -> float:
    """Std of the latent SlotDiffusion diffuses (`diffusion_target`) over the first training samples
    (deterministic, the same on every rank)."""
    frames = []
    for index in range(min(samples, len(dataset))):
        sample = dataset[(index, index)]
        frames.append(sample["video"] if "video" in sample else sample["image"][None])
    latent = model.diffusion_latent(torch.cat(frames).to(device))
    return float(latent.float().std().clamp_min(1e-6))


TARGET_CACHE_MIB = 1024  # the most memory kept for the training images' targets (TargetCache)


class TargetCache:
    """What the decoder reconstructs of each training image, kept once computed: the frozen VAE's guidance of an
    image does not change, yet an epoch-based loop would recompute it every epoch (the binding configuration sees
    each of its 4000 images 20 times). Only for models whose `target_is_cacheable`: the guidance vectors of the
    mixture decoder, the guidance tokens (vectors and code indices) of SLATE's decoder, SlotDiffusion's latent. A
    sample's target is computed the first time it is drawn, in the batch it is drawn in, so training draws the same
    random numbers as without the cache. Per process: each DDP rank keeps the samples it draws."""

    def __init__(self, model: models.OCLModel, num_samples: int, example):
        self.model, self.example = model, example
        self.stores = [t.new_zeros((num_samples,) + tuple(t.shape[1:])) for t in self.tensors(example)]
        self.known = torch.zeros(num_samples, dtype=torch.bool, device=self.stores[0].device)

    @staticmethod
    def tensors(target) -> list:
        """The per-sample tensors of a target: itself, or a guidance dict's vectors and indices of every scale (its
        group sizes are the same for every image)."""
        return [target] if torch.is_tensor(target) else list(target["vectors"]) + list(target["indices"])

    def rebuild(self, tensors: list):
        """A target of the example's form from its per-sample tensors."""
        if torch.is_tensor(self.example):
            return tensors[0]
        scales = len(self.example["vectors"])
        return {"vectors": tensors[:scales], "indices": tensors[scales:], "group_sizes": self.example["group_sizes"]}

    @classmethod
    def for_training(cls, model: models.OCLModel, dataset, device, log):
        """A cache for `dataset`'s targets, or None when they are not a pure function of the image or would take
        more than TARGET_CACHE_MIB."""
        if not model.target_is_cacheable():
            return None
        with torch.no_grad():
            example = model.target(dataset[(0, 0)]["image"][None].to(device))
        mib = len(dataset) * sum(t[0].numel() * t.element_size() for t in cls.tensors(example)) / 2 ** 20
        if mib > TARGET_CACHE_MIB:
            log.info(f"not caching the training targets: {mib:.0f} MiB > {TARGET_CACHE_MIB} MiB")
            return None
        what = {"guidance_vectors": "guidance vectors", "guidance": "guidance tokens", "latent": "latents"}
        log.info(f"caching the frozen VAE's {what[model.decoder.reads]} of the {len(dataset)} training images as they "
                 f"are first drawn ({mib:.1f} MiB)")
        return cls(model, len(dataset), example)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, indices: torch.Tensor):
        """The targets of (b,3,H,W) training frames with dataset indices (b,)."""
        missing = ~self.known[indices]
        if missing.any():
            chosen = indices[missing]
            for store, computed in zip(self.stores, self.tensors(self.model.target(frames[missing]))):
                store[chosen] = computed
            self.known[chosen] = True
        return self.rebuild([store[indices] for store in self.stores])


def restore_best(out_dir: str, best_step, d, log) -> None:
    """On resume, recreate a missing best.pt from the checkpoint of the stored best step (kept from pruning)."""
    best_path = os.path.join(out_dir, "best.pt")
    source = os.path.join(out_dir, CHECKPOINT_PATTERN.format(step=best_step)) if best_step else ""
    if d.is_main and best_step and not os.path.isfile(best_path) and os.path.isfile(source):
        state = load_checkpoint(source, kind="ocl")  # with its frozen weights put back
        state.pop("path")
        atomic_torch_save(slim_checkpoint(state), best_path)
        log.info(f"recreated best.pt from {source}")


# ----------------------------------------------------------------------------------------------------------------
# Validation: metrics on the slot masks, reduced over ranks.

METRICS = ("ari", "ari_fg", "miou", "mbo", "mask_entropy")  # percent; mask_entropy of ln(slots), see metrics.py


@torch.no_grad()
def validate(model: models.OCLModel, loader, d, dtype) -> dict:
    """Mask metrics in percent, the decoder loss, and the loss with every image's slots swapped for another
    image's (`val_loss_shuffled_slots`; the gap `val_slot_gain` is what the slots tell the decoder beyond its
    context: near 0 means the slots are ignored; token decoders split it into `val_slot_gain_objects` and
    `val_slot_gain_background`, per token on objects / on the background), averaged over the split and reduced
    over ranks."""
    model.eval()
    # Running totals by name (every rank holds the same names, so they reduce as one vector): each metric's sum and
    # scored count; the loss and the batches; the shuffled loss and the batches that had one; the token gain and
    # the token count on objects and on the background.
    names = [f"{m}_{part}" for m in METRICS for part in ("sum", "count")] + [
        "loss", "batches", "shuffled", "shuffled_batches", "gain_objects", "objects", "gain_background", "background"]
    totals = dict.fromkeys(names, 0.0)
    for batch in loader:
        scores, stats, batch = score_batch(model, batch, d.device, dtype, shuffled_slots=True)
        for name in METRICS:
            valid = ~torch.isnan(scores[name])
            totals[f"{name}_sum"] += float(scores[name][valid].sum())
            totals[f"{name}_count"] += int(valid.sum())
        totals["loss"] += float(stats["loss"])
        totals["batches"] += 1
        if "loss_shuffled_slots" in stats:
            totals["shuffled"] += float(stats["loss_shuffled_slots"])
            totals["shuffled_batches"] += 1
        if "token_slot_gain" in stats:  # split by the ground truth at the token grid (segments_at: block majority)
            gain = stats["token_slot_gain"].double().cpu()
            side = math.isqrt(gain.shape[1])
            truth = segments_at(batch["segment"].flatten(0, -3).cpu(), (side, side)).flatten(1)
            known = truth != IGNORE
            for part, where in (("objects", (truth > 0) & known), ("background", (truth == 0) & known)):
                totals[f"gain_{part}"] += float(gain[where].sum())
                totals[part] += int(where.sum())
    if d.enabled:
        reduced = torch.tensor([totals[n] for n in names], dtype=torch.float64, device=d.device)
        torch.distributed.all_reduce(reduced)
        totals = dict(zip(names, reduced.tolist()))
    model.train()
    result = {f"val_{name}": 100 * totals[f"{name}_sum"] / totals[f"{name}_count"] if totals[f"{name}_count"] > 0
              else float("nan") for name in METRICS}
    result["val_loss"] = totals["loss"] / max(1.0, totals["batches"])
    if 0 < totals["shuffled_batches"] == totals["batches"]:  # every batch had one (it takes two images): like with like
        result["val_loss_shuffled_slots"] = totals["shuffled"] / totals["shuffled_batches"]
        result["val_slot_gain"] = result["val_loss_shuffled_slots"] - result["val_loss"]
        for part in ("objects", "background"):
            if totals[part] > 0:  # per token of the first guidance scale lying on objects / on the background
                result[f"val_slot_gain_{part}"] = totals[f"gain_{part}"] / totals[part]
    return result


# From this fraction of a run on, a validation whose masks are still this uniform, or whose slots the decoder ignores
# (their gain under this share of the loss with another image's slots), means nothing is binding. Every run of the
# binding ladder that bound was under 90 % entropy by half its length (the demo's MSF model 42 % at step 2500 of 5500,
# SLATE on the easy data 87 % at 3000 of 6000); rung 6, which did not bind, was at 99.5 % (README, "When slots do
# not bind").
UNBOUND_CHECK_FRACTION = 0.5
UNBOUND_ENTROPY = 95.0  # percent of ln(slots)
IGNORED_SLOT_GAIN = 0.01


def binding_warning(metrics: dict, step: int, steps: int) -> str:
    """One sentence when the validation after `step` of `steps` says the slots are not binding, else ''."""
    if step < UNBOUND_CHECK_FRACTION * steps:
        return ""
    where = f"at step {step} of {steps} ({100 * step / steps:.0f} % of the run)"
    advice = ("; README, 'When slots do not bind', says what the masks mean and which settings to change first "
              "(object size against the resolution, the decoder, batch and learning rate, length)")
    entropy = metrics.get("val_mask_entropy", float("nan"))
    if entropy > UNBOUND_ENTROPY:
        return (f"WARNING: the slots are not binding: {where} the validation mask entropy is {entropy:.1f} % of "
                f"ln(slots), above {UNBOUND_ENTROPY:.0f} % (uniform masks: no slot holds a region)" + advice)
    gain, shuffled = metrics.get("val_slot_gain"), metrics.get("val_loss_shuffled_slots")
    if gain is not None and shuffled and abs(shuffled) > 0 and gain < IGNORED_SLOT_GAIN * abs(shuffled):
        return (f"WARNING: the slots are not binding: {where} the slot gain is {gain:.4g}, under "
                f"{100 * IGNORED_SLOT_GAIN:.0f} % of the loss with another image's slots ({shuffled:.4g}): the "
                f"decoder ignores the slots" + advice)
    return ""


def best_value(metrics: dict, name: str) -> float:
    if name == "ari+ari_fg":
        return metrics["val_ari"] + metrics["val_ari_fg"]
    return metrics[f"val_{name}"]


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    config = load_config(OPTIONS, argv, description=__doc__)
    # DDP, the run directory and the checkpoint to resume from (None for a fresh start) with its step; the latent
    # scale is measured, not chosen, so it may differ.
    d, log, state, start_step = start_run(config, "ocl", [k for k in MODEL_KEYS if k != "latent_scale"],
                                          old_defaults(models.OCL_OPTIONS))
    loader, val, val_path = training_loaders(config, d, start_step)
    check_resumed_data(state, loader.dataset, config)  # the same path may hold regenerated data
    video = loader.dataset.is_video

    # Model: the global seed gives every rank, whatever the world size, the same initial weights.
    vae, vae_state = load_guidance_vae(config)
    check_resumed_vae(state, vae, vae_state)
    torch.manual_seed(config["seed"])
    model = models.build_model(config, video, vae).to(d.device)
    # SlotDiffusion's latent scale is measured on a fresh start; a resumed run takes it from the checkpoint.
    if config["method"] == "slotdiffusion" and not config["latent_scale"] and state is None:
        config["latent_scale"] = measure_latent_scale(model, loader.dataset, d.device)
        model.decoder.latent_scale.fill_(config["latent_scale"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    # From here on each rank draws its own noise (slot queries, dropout, diffusion); resume restores it.
    optimizer, dtype, scaler = optimizer_and_rng(trainable, config, d, model, state, log)
    best, best_step = float("-inf"), None
    if state is not None:
        best, best_step = state.get("best", best), state.get("best_step")
        restore_best(config["out_dir"], best_step, d, log)
        config["latent_scale"] = state["config"]["latent_scale"]
    ddp_model = DDP(model) if d.enabled else model  # buffers (frozen VAE, latent scale) are equal on every rank
    if d.is_main:
        save_config(config, os.path.join(config["out_dir"], "config.yaml"))
    log.info(f"{config['method']} + {config['guidance']} guidance: "
             f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable parameters, {len(loader.dataset)} "
             f"{'videos' if video else 'images'} at {config['resolution']}px, {d.world_size} process(es) on {d.device}")
    figure_batch = next(iter(eval_loader(val_path, 4, 0, d, config["resolution"], 4)))
    target_cache = TargetCache.for_training(model, loader.dataset, d.device, log)

    def checkpoint(step: int, metrics: dict) -> None:
        nonlocal best, best_step
        states = gather_rng_states(d)
        value = best_value(metrics, config["best_metric"])
        improved = value > best
        if improved:
            best, best_step = value, step
        if not d.is_main:
            return
        payload = {**checkpoint_payload("ocl", model, optimizer, scaler, step, config, states,
                                        config["resolution"], loader.dataset.fingerprint),
                   "best": best, "best_step": best_step, "metrics": metrics, "video": video,
                   "vae_config": vae.config if vae is not None else None,
                   "vae_ckpt": vae_state["path"] if vae_state else None}
        # best.pt first, a slim self-contained export: a kill between the two files leaves no checkpoint that counts
        # a best that best.pt lacks. Frozen weights (DINO, the guidance VAE) go to one file per run.
        if improved:
            atomic_torch_save(slim_checkpoint(payload), os.path.join(config["out_dir"], "best.pt"))
        path = save_checkpoint(share_frozen_weights(payload, config["out_dir"], FROZEN_PREFIXES), config["out_dir"],
                               step, config["keep_checkpoints"], best_step)
        log.info(f"saved {path}" + (f" and best.pt ({config['best_metric']} {value:.2f})" if improved else ""))

    # The loop: every schedule is a pure function of the step, so resume is exact.
    steps = config["steps"]
    progress = progress_bar(steps, start_step, f"train_ocl {config['method']}", d.is_main)
    batches = iter(loader)
    last_time = time.perf_counter()
    warned = False  # the not-binding warning, once per process
    for step in range(start_step, steps):
        lr = set_scheduled_lr(optimizer, step, config)
        sigma = models.query_sigma(step, steps, config)
        batch = {k: v.to(d.device, non_blocking=True) for k, v in next(batches).items()}
        target = target_cache(batch["image"], batch["index"]) if target_cache else None
        with autocast(d.device, dtype):
            loss, stats, _ = ddp_model(batch, sigma, target=target)
        stop_on_non_finite(loss, step, d, config["out_dir"])
        grad_norm = optimizer_step(loss, trainable, optimizer, scaler, config["grad_clip"])
        model.update_ema()
        progress.update(1)
        if step % config["log_every"] == 0 or step == steps - 1:
            now = time.perf_counter()
            entry = record_training(log, stats, d, step, (now - last_time) / (1 if step == start_step
                                                                              else config["log_every"]),
                                    lr=lr, sigma=sigma, grad_norm=grad_norm)
            last_time = now
            progress.set_postfix(loss=f"{entry['loss']:.4f}")
        if (step + 1) % config["val_every"] == 0 or step == steps - 1:
            metrics = validate(model, val, d, dtype)
            record_validation(log, metrics, step)
            warning = binding_warning(metrics, step + 1, steps)
            if warning and not warned:
                log.info(warning)
                warned = True
            check_finite_state(model, {"val_loss": metrics["val_loss"]}, step + 1, config["out_dir"])
            checkpoint(step + 1, metrics)
            if d.is_main:  # after the checkpoint, so a figure that runs out of memory (many slots) loses no step; the
                # random numbers it draws (SlotDiffusion samples) are given back, so the checkpoint resumes exactly
                with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
                    for path in save_figures(model, figure_batch, d.device,
                                             os.path.join(config["out_dir"], "figures", f"step_{step + 1:07d}")):
                        log.image("figures/" + (path.rsplit("_", 1)[-1][:-4] if video else "validation"), path,
                                  step + 1)
    progress.close()
    if start_step >= steps:
        log.info(f"nothing to do: the checkpoint is at step {start_step} of {steps}")
    finish_run(log, d, config["out_dir"])


if __name__ == "__main__":
    run_main(main)
