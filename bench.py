"""Benchmarks, nanoGPT style: one line per figure, `name: value`, ratios measured side by side in one run.

    python bench.py                 # every figure at CPU-friendly sizes (each under a minute on 2 cores)
    python bench.py NAME [NAME ...] # only these figures
    python bench.py --full          # paper-size settings, for a GPU

Ratios are measured in one process with the two sides interleaved, because shared machines are noisy.
"""

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

import data
import model as models
import msf
import prepare_data
import pretrain_vae
import train_ocl
from config import load_config
from devices import amp_dtype, autocast, pick_device
from errors import UserError, run_main
from runs import share_frozen_weights, slim_checkpoint
from training import adam, rng_state

ROOT = os.path.dirname(os.path.abspath(__file__))
FIGURES = {}


def figure(function):
    """Register a benchmark; it returns a dict of name -> value to print."""
    FIGURES[function.__name__] = function
    return function


# ----------------------------------------------------------------------------------------------------------------
# Data loading.

@figure
def loader_images_per_s(args):
    """Decoded and normalised 128x128 images per second through OCLDataset + DataLoader with 2 workers."""
    with tempfile.TemporaryDirectory() as tmp:
        prepare_data.write_synthetic("shapes", tmp, {"train": 512}, seed=0, min_objects=2, max_objects=6,
                                     frames=0, workers=2, progress=False)
        dataset = data.OCLDataset(os.path.join(tmp, "train.lmdb"), train=True)
        sampler = data.StepSampler(len(dataset), 64, seed=0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, sampler=sampler, num_workers=2,
                                             persistent_workers=True, prefetch_factor=4)
        iterator = iter(loader)
        for _ in range(5):  # warm up the workers
            next(iterator)
        batches = 60 if args.full else 30
        start = time.perf_counter()
        images = 0
        for _ in range(batches):
            images += next(iterator)["image"].shape[0]
        elapsed = time.perf_counter() - start
        del iterator, loader
    return {"loader_images_per_s": round(images / elapsed)}


# ----------------------------------------------------------------------------------------------------------------
# The VAE: MSF step cost relative to the VQ-VAE, and the batched fusion against a per-scale loop.

def vae_config(quantizer: str) -> dict:
    """The paper's VAE: 64 channels, c = 256, 4096 codes (VQ) or 64 x 64 combinations (MSF, N = 3)."""
    return dict({k: o.default for k, o in msf.VAE_OPTIONS.items()}, quantizer=quantizer, gumbel=False)


def shapes_vae_config(quantizer: str) -> dict:
    """The CPU-sized VAE of configs/vae_<quantizer>_shapes.yaml (its model keys), Gumbel off as in vae_config."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"vae_{quantizer}_shapes.yaml")
    config = load_config(pretrain_vae.OPTIONS, [path, "--gumbel", "false"])
    return {k: config[k] for k in msf.VAE_OPTIONS}


def time_interleaved(functions: dict, repeats: int, warmup: int = 2, sync=None) -> dict:
    """Median seconds per call of each function, calls interleaved so machine noise hits all of them alike."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            if sync:
                sync()
            start = time.perf_counter()
            function()
            if sync:
                sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def training_step(loss_fn, parameters, device, dtype):
    """A closure doing one Adam step on `loss_fn()` under autocast (dtype None: full precision)."""
    optimizer = adam(list(parameters), 1e-4)

    def step():
        with autocast(device, dtype):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def vae_step(name: str, device, full: bool):
    """One training step of the paper-width VAE with quantiser `name` on random 128x128 images (batch 64 with
    --full, 8 otherwise)."""
    torch.manual_seed(0)
    images = torch.rand(64 if full else 8, 3, 128, 128, device=device) * 2 - 1
    model = msf.build_vae(vae_config(name)).to(device)
    return training_step(lambda: model(images)[0], model.parameters(), device, amp_dtype("auto", device))


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure_peak_gib(builder, name: str, device: str, full: bool) -> float:
    """Run in a fresh process: the peak memory of building `builder(name, device, full)` (a module-level function
    returning a training step) and taking two steps, model, optimizer state, inputs and activations included.
    CUDA: the caching allocator's peak. CPU (Linux): the peak resident set (VmHWM) above the resident set right
    after the imports, with the peak reset there. Not getrusage's ru_maxrss: a spawned child inherits its parent's
    resident set at fork time as its starting maximum."""
    # bench.py imports the networks' modules at its top, so their import cost is in the baseline, not the peak.
    device = torch.device(device)
    baseline = _proc_status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set (Linux >= 4.0)
    except OSError:
        pass  # VmHWM then also covers the imports, which peak far below a training step
    step = builder(name, device, full)
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return (_proc_status_bytes("VmHWM") - baseline) / 2 ** 30


def peak_memory(builder, names: tuple, device, full: bool, prefix: str) -> dict:
    """Peak memory of each variant's training step, each measured in its own fresh process (a shared process
    would keep the other model's memory and the allocator's high-water mark), and their ratio."""
    if device.type == "cpu" and not os.path.exists("/proc/self/status"):
        return {}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the caller's freed timing models back to the driver for the children
    peaks = {}
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for name in names:
            peaks[name] = pool.apply(_measure_peak_gib, (builder, name, str(device), full))
    result = {f"{prefix}_peak_gib_{name}": round(peak, 3) for name, peak in peaks.items()}
    result[f"{prefix}_peak_memory_ratio"] = round(peaks[names[1]] / peaks[names[0]], 3)
    return result


@figure
def msf_vae_step_ratio(args):
    """Training step time (forward, backward, Adam) of the MSF VAE (N=3) / the VQ-VAE at paper width, 128x128
    input, batch 64 with --full (GPU) or 8 (CPU); and each step's peak memory."""
    device = args.device
    steps = {name: vae_step(name, device, args.full) for name in ("vq", "msf")}
    timings = time_interleaved(steps, repeats=20 if args.full else 5, sync=_sync(device))
    result = {"vae_step_s_vq": round(timings["vq"], 4), "vae_step_s_msf": round(timings["msf"], 4),
              "msf_vae_step_ratio": round(timings["msf"] / timings["vq"], 3)}
    del steps
    return dict(result, **peak_memory(vae_step, ("vq", "msf"), device, args.full, "vae"))


def _layout_cases(device) -> dict:
    """name -> (module, input builder, loss of the output): every convolution path at the size it trains at on the
    CPU (the easy / shapes configs)."""
    torch.manual_seed(0)
    vae = msf.build_vae(load_config(pretrain_vae.OPTIONS, [os.path.join(ROOT, "configs", "vae_msf_easy.yaml")]))
    images = torch.rand(32, 3, 32, 32, device=device) * 2 - 1
    codes = torch.randn(32, 64, 8, 8, device=device)
    slots = torch.randn(16 * 6, 64, 4, 4, device=device)
    latent = torch.randn(16, 64, 16, 16, device=device)
    unet = models.SlotUNet(64, 32, 64)
    unet_slots, unet_t = torch.randn(16, 6, 64, device=device), torch.randint(0, 1000, (16,), device=device)
    return {"vae_encoder": (vae.encoder, images), "vae_decoder": (vae.decoder, codes),
            "cnn_encoder": (models.NaiveCNN(32, 64, 2), images[:16]),
            "broadcast_cnn_decoder": (models.BroadcastCNNDecoder(64, 64, 8, 32).net, slots),
            "slot_unet": (lambda x: unet(x, unet_t, unet_slots), latent, unet)}


def _layout_step(module, x, owner=None, layout=torch.contiguous_format):
    """Forward and backward of `module` on `x` stored in `layout`."""
    x = x.contiguous(memory_format=layout).requires_grad_()
    parameters = list((owner or module).parameters())

    def step():
        for p in parameters:
            p.grad = None
        module(x).square().mean().backward()

    return step


@figure
def conv_layout(args):
    """Forward + backward time of every convolution path with its input channels-last / NCHW (below 1: channels-last
    faster), at 1 and 2 threads, side by side; the choice each module makes follows these figures."""
    result, threads = {}, torch.get_num_threads()
    cases = _layout_cases(args.device)
    for count in (1, 2):
        torch.set_num_threads(count)
        steps = {}
        for name, (module, x, *owner) in cases.items():
            for layout in (torch.contiguous_format, torch.channels_last):
                steps[name, layout] = _layout_step(module, x, owner[0] if owner else None, layout)
        timings = time_interleaved(steps, repeats=7)
        for name in cases:
            result[f"{name}_channels_last_ratio_{count}t"] = round(
                timings[name, torch.channels_last] / timings[name, torch.contiguous_format], 3)
    torch.set_num_threads(threads)
    return result


def _vae_layout_step(config_name: str, overrides: dict, batch: int, before: bool):
    """A training step of configs/CONFIG_NAME.yaml's VAE with `overrides`, with the channels-last layout (the code as
    it is) or `before` it (msf.channels_last as the identity: the encoder's NCHW output reaches the quantiser and
    the decoder as strided views)."""
    config = load_config(pretrain_vae.OPTIONS, [os.path.join(ROOT, "configs", config_name + ".yaml"), "--gumbel",
                                                "false"])
    config.update(overrides)
    torch.manual_seed(0)
    model = msf.build_vae({k: config[k] for k in msf.VAE_OPTIONS})
    side = config["resolution"] or 128  # 0: as stored, 128 px for every converted dataset
    images = torch.rand(batch, 3, side, side) * 2 - 1
    step = training_step(lambda: model(images)[0], model.parameters(), torch.device("cpu"), None)
    if not before:
        return step

    def step_before():
        original, msf.channels_last = msf.channels_last, lambda x: x
        try:
            step()
        finally:
            msf.channels_last = original

    return step_before


@figure
def vae_step_layout(args):
    """The whole MSF VAE training step, channels-last now / NCHW before (below 1: faster now), at 1 and 2 threads:
    the ClevrTex config (128 px, batch 16) in the paper's mode (concat·W) and with the release's `fusion: mean`,
    and the easy config (32 px, batch 32). CPU only."""
    result, threads = {}, torch.get_num_threads()
    cases = {"clevrtex_paper": ("vae_msf_clevrtex", {}, 16), "clevrtex_mean": ("vae_msf_clevrtex", {"fusion": "mean"},
                                                                                 16),
             "easy": ("vae_msf_easy", {}, 32)}
    for count in (1, 2):
        torch.set_num_threads(count)
        steps = {(name, before): _vae_layout_step(config, overrides, batch, before)
                 for name, (config, overrides, batch) in cases.items() for before in (False, True)}
        timings = time_interleaved(steps, repeats=5)
        for name in cases:
            result[f"vae_step_{name}_now_vs_before_{count}t"] = round(timings[name, False] / timings[name, True], 3)
    torch.set_num_threads(threads)
    return result


def fuse_per_scale_loop(z_list, codes, mode="adjacent"):
    """The comparison point: the official code's structure. For every target scale, resize each candidate scale
    to it (pool finer, upsample coarser), match the stack against the codebook, keep the most confident."""
    fused = []
    for n in range(len(z_list)):
        candidates = []
        for k in msf._candidate_scales(n, len(z_list), mode):
            vectors = z_list[k]
            if k < n:
                vectors = F.avg_pool2d(vectors.permute(0, 3, 1, 2), 2 ** (n - k)).permute(0, 2, 3, 1)
            elif k > n:
                vectors = vectors.repeat_interleave(2 ** (k - n), 1).repeat_interleave(2 ** (k - n), 2)
            candidates.append(vectors)
        stack = torch.stack(candidates)  # (K,b,h,w,c)
        probs = torch.softmax(msf.match_logits(stack.reshape(-1, stack.shape[-1]), codes), 1)
        confidence, index = probs.max(1)
        winner = confidence.view(stack.shape[:-1]).argmax(0)
        fused.append(index.view(stack.shape[:-1]).gather(0, winner[None])[0])
    return fused


@figure
def fusion_speedup_vs_loop(args):
    """Inter-scale fusion (Eq. 4) of N=3 scales: the batched version vs the per-scale loop, same inputs."""
    device = args.device
    batch = 64 if args.full else 16
    generator = torch.Generator(device="cpu").manual_seed(0)
    z = [torch.randn(batch, 32 // 2 ** n, 32 // 2 ** n, 256, generator=generator).to(device) for n in range(3)]
    codes = torch.randn(64, 256, generator=generator).to(device)
    result = {}
    for mode, suffix in (("adjacent", ""), ("all", "_all")):  # Eq. 4's adjacent scales; the official every scale
        batched = msf.fuse_inter_scale(z, codes, mode, return_vectors=False)[0]
        looped = fuse_per_scale_loop(z, codes, mode)
        agree = sum(int((a == b).sum()) for a, b in zip(batched, looped)) / sum(a.numel() for a in batched)
        with torch.no_grad():
            timings = time_interleaved(
                {"batched": lambda: msf.fuse_inter_scale(z, codes, mode, return_vectors=False),
                 "loop": lambda: fuse_per_scale_loop(z, codes, mode)},
                repeats=50 if args.full else 20, sync=_sync(device))
        result.update({f"fusion_s_batched{suffix}": round(timings["batched"], 5),
                       f"fusion_s_loop{suffix}": round(timings["loop"], 5),
                       f"fusion_speedup_vs_loop{suffix}": round(timings["loop"] / timings["batched"], 2),
                       f"fusion_agreement{suffix}": round(agree, 6)})
    return result


# ----------------------------------------------------------------------------------------------------------------
# OCL: the frozen guidance must be cheap — SLATE + MSF step / SLATE + VQ step.

def ocl_config(guidance: str, full: bool) -> dict:
    """SLATE as in the paper (--full: DINO big-little, 256-d, 4-layer decoder, 128 px) or the CPU-sized shapes
    config (naive CNN, 64 px)."""
    config = {k: o.default for k, o in models.OCL_OPTIONS.items()}
    config.update(method="slate", guidance=guidance, resolution=128, dino_pretrained=False)
    if not full:
        config.update(encoder="cnn", cnn_channels=32, encoder_stride=2, num_slots=7, slot_dim=64, decoder_dim=128,
                      decoder_layers=2, resolution=64)
    return config


def ocl_step(guidance: str, device, full: bool):
    """One SLATE training step (forward incl. the frozen VAE's guidance, backward, Adam): paper size with --full
    (DINO ViT-S/8 big-little, 128 px, batch 32), else the shapes config (64 px, batch 16)."""
    config = ocl_config(guidance, full)
    vae_settings = vae_config(guidance) if full else shapes_vae_config(guidance)
    torch.manual_seed(0)
    vae = msf.build_vae(vae_settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DINO without pretrained weights: fine for timing
        ocl = models.OCLModel(config, vae).to(device)
    images = torch.rand(32 if full else 16, 3, config["resolution"], config["resolution"], device=device) * 2 - 1
    trainable = [p for p in ocl.parameters() if p.requires_grad]
    return training_step(lambda: ocl({"image": images}, 0.5)[0], trainable, device, amp_dtype("auto", device))


@figure
def ocl_step_ratio_msf_vs_vq(args):
    """SLATE training step with MSF guidance / with VQ guidance, and each step's peak memory; with --full also
    iterations per second of paper-size SLATE + MSF."""
    device = args.device
    steps = {guidance: ocl_step(guidance, device, args.full) for guidance in ("vq", "msf")}
    timings = time_interleaved(steps, repeats=20 if args.full else 5, sync=_sync(device))
    result = {"ocl_step_s_vq": round(timings["vq"], 4), "ocl_step_s_msf": round(timings["msf"], 4),
              "ocl_step_ratio_msf_vs_vq": round(timings["msf"] / timings["vq"], 3)}
    if args.full:
        result["slate_msf_paper_size_it_per_s"] = round(1 / timings["msf"], 2)
    del steps
    return dict(result, **peak_memory(ocl_step, ("vq", "msf"), device, args.full, "ocl"))


def config_model(name: str, device, **overrides) -> tuple:
    """(config, model) of the OCL config configs/NAME.yaml with `overrides`, guided by an untrained VAE of the VAE
    config named after its `vae_ckpt` run directory (e.g. configs/vae_msf_c4_easy.yaml), seeded for repeatable
    figures."""
    config = load_config(train_ocl.OPTIONS, [os.path.join(ROOT, "configs", name + ".yaml")])
    config.update(overrides)
    vae_config = os.path.join(ROOT, "configs", os.path.basename(config["vae_ckpt"]) + ".yaml")
    torch.manual_seed(0)
    vae = msf.build_vae(load_config(pretrain_vae.OPTIONS, [vae_config]))
    return config, models.OCLModel(config, vae, video=config["method"] == "steve").to(device)


def config_step(name: str, device, cached_target: bool = False, **overrides):
    """One training step of the OCL config configs/NAME.yaml as it trains (its batch, resolution and widths, with
    `overrides`; config_model); `cached_target`: with the decoder's target computed beforehand, as
    train_ocl.TargetCache gives it after the first epoch."""
    config, ocl = config_model(name, device, **overrides)
    side, b = config["resolution"], config["batch_size"]
    if ocl.video:  # clips of num_frames frames with the first frame's boxes (x0, y0, x1, y1 in [0, 1])
        corners = torch.rand(b, config["num_slots"], 2, 2, device=device).sort(2).values
        batch = {"video": torch.rand(b, config["num_frames"], 3, side, side, device=device) * 2 - 1,
                 "bbox": corners.flatten(2)[:, None].expand(-1, config["num_frames"], -1, -1)}
    else:
        batch = {"image": torch.rand(b, 3, side, side, device=device) * 2 - 1}
    trainable = [p for p in ocl.parameters() if p.requires_grad]
    target = ocl.target(batch["image"]) if cached_target and ocl.target_is_cacheable() else None
    return training_step(lambda: ocl(batch, 0.5, target=target)[0], trainable, device, amp_dtype("auto", device))


@figure
def ocl_steps_per_s(args):
    """Training steps per second of the binding configuration (mixture_msf_easy: Slot Attention + the CNN mixture
    decoder over MSF guidance, 32 px, batch 16), the speed-up of train_ocl's target cache on it (MSF and VQ
    guidance), and of SLATE + MSF at the shapes config (64 px, batch 16) with the speed-up of SLATE's
    decoder_dropout 0.0 over 0.1 (all measured side by side)."""
    steps = {"mixture": config_step("mixture_msf_easy", args.device),
             "mixture_cached": config_step("mixture_msf_easy", args.device, cached_target=True),
             "mixture_vq": config_step("mixture_vq_easy", args.device),
             "mixture_vq_cached": config_step("mixture_vq_easy", args.device, cached_target=True),
             "mixture_mlp": config_step("mixture_msf_easy", args.device, mixture_decoder="mlp", mixture_hidden=256),
             0.0: config_step("slate_msf_shapes", args.device, decoder_dropout=0.0),
             0.1: config_step("slate_msf_shapes", args.device, decoder_dropout=0.1)}
    timings = time_interleaved(steps, repeats=5, sync=_sync(args.device))
    return {"mixture_msf_easy_steps_per_s": round(1 / timings["mixture"], 3),
            "mixture_msf_easy_target_cache_speedup": round(timings["mixture"] / timings["mixture_cached"], 3),
            "mixture_vq_easy_target_cache_speedup": round(timings["mixture_vq"] / timings["mixture_vq_cached"], 3),
            "mixture_msf_easy_mlp_decoder_steps_per_s": round(1 / timings["mixture_mlp"], 3),
            "ocl_steps_per_s": round(1 / timings[0.0], 3),
            "ocl_step_speedup_dropout_0_vs_0.1": round(timings[0.1] / timings[0.0], 3)}


@figure
def method_steps_per_s(args):
    """Training steps per second of each method's CPU configuration on `shapes_easy` (configs/M_msf_easy.yaml: its
    batch, resolution and widths, the target cache on where train_ocl uses it; STEVE on clips of its easy videos),
    and each one's step time over the mixture decoder's, side by side; at 1 thread, as the CPU runs train two at a
    time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    methods = ("mixture", "slate", "ogdr", "sysbinder", "slotdiffusion", "steve")  # each one's configs/M_msf_easy.yaml
    steps = {m: config_step(f"{m}_msf_easy", args.device, cached_target=True) for m in methods}
    timings = time_interleaved(steps, repeats=5, sync=_sync(args.device))
    torch.set_num_threads(threads)
    result = {f"{m}_msf_easy_steps_per_s_1t": round(1 / timings[m], 3) for m in methods}
    result.update({f"{m}_msf_easy_step_vs_mixture": round(timings[m] / timings["mixture"], 3)
                   for m in methods if m != "mixture"})
    return result


@figure
def adam_step(args):
    """One Adam step over the trainable parameters of each method's CPU configuration (configs/M_msf_easy.yaml),
    torch's per-tensor loop (its default on the CPU) against the fused step train_ocl.py and pretrain_vae.py take
    (training.adam), side by side at 1 thread; the ratio is loop time over fused time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = {}
    for method in ("mixture", "slate", "slotdiffusion"):
        _, ocl = config_model(f"{method}_msf_easy", torch.device("cpu"))
        trainable = [p for p in ocl.parameters() if p.requires_grad]
        for p in trainable:
            p.grad = torch.randn_like(p)
        steps = {"loop": torch.optim.Adam(trainable, lr=1e-4, foreach=False).step,
                 "fused": adam(trainable, 1e-4).step}
        timings = time_interleaved(steps, repeats=20, sync=None)
        result[f"{method}_adam_tensors"] = len(trainable)
        result[f"{method}_adam_fused_ms"] = round(timings["fused"] * 1000, 2)
        result[f"{method}_adam_loop_vs_fused"] = round(timings["loop"] / timings["fused"], 2)
    torch.set_num_threads(threads)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Disk use of a run (README, "Disk").

def checkpoint_files(config_name: str, directory: str) -> dict:
    """Sizes in MiB of what an OCL run writes per checkpoint for configs/CONFIG_NAME.yaml and its VAE config, built
    without training (DINO random, offline) after one Adam step (so the optimizer holds its moments)."""
    config = load_config(train_ocl.OPTIONS, [f"configs/{config_name}.yaml", "--dino_pretrained", "false"])
    vae_config = load_config(pretrain_vae.OPTIONS, [f"configs/{os.path.basename(config['vae_ckpt'])}.yaml"])
    torch.manual_seed(0)
    vae = msf.build_vae(vae_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DINO without pretrained weights: the same size
        ocl = models.build_model(config, False, vae)
    trainable = [p for p in ocl.parameters() if p.requires_grad]
    optimizer = adam(trainable, 1e-4)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    payload = {"kind": "ocl", "model": ocl.state_dict(), "optimizer": optimizer.state_dict(),
               "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "step": 1000, "config": config,
               "rng": [rng_state()], "best": 0.0, "metrics": {}, "video": False, "vae_config": vae.config,
               "vae_ckpt": config["vae_ckpt"], "data": {"data_dir": config["data_dir"]}}
    paths = {name: os.path.join(directory, f"{config_name}_{name}.pt") for name in ("full", "ckpt", "best")}
    torch.save(payload, paths["full"])
    torch.save(share_frozen_weights(payload, directory, train_ocl.FROZEN_PREFIXES), paths["ckpt"])
    torch.save(slim_checkpoint(payload), paths["best"])
    frozen = [n for n in os.listdir(directory) if n.startswith("frozen-")]
    sizes = {name: os.path.getsize(path) / 2 ** 20 for name, path in paths.items()}
    sizes["frozen"] = sum(os.path.getsize(os.path.join(directory, n)) for n in frozen) / 2 ** 20
    for name in list(paths.values()) + [os.path.join(directory, n) for n in frozen]:
        os.remove(name)
    return sizes


@figure
def checkpoint_mib(args):
    """Checkpoint sizes and disk per run (keep_checkpoints checkpoints + best.pt [+ the frozen file]) for the shapes
    and the paper-size SLATE + MSF configs: before (every checkpoint and best.pt held the whole model, optimizer,
    scaler and RNG state; 25 kept) and now (frozen weights once per run, best.pt slim; the config's keep)."""
    result = {}
    with tempfile.TemporaryDirectory() as directory:
        for name in ("slate_msf_shapes", "slate_msf_clevrtex"):
            sizes = checkpoint_files(name, directory)
            keep = load_config(train_ocl.OPTIONS, [f"configs/{name}.yaml"])["keep_checkpoints"]
            result.update({f"{name}_ckpt_mib_before": round(sizes["full"], 1),
                           f"{name}_run_gib_before_keep25": round(26 * sizes["full"] / 1024, 2),
                           f"{name}_ckpt_mib": round(sizes["ckpt"], 1), f"{name}_best_mib": round(sizes["best"], 1),
                           f"{name}_frozen_mib": round(sizes["frozen"], 1),
                           f"{name}_run_gib_keep{keep}": round((keep * sizes["ckpt"] + sizes["best"]
                                                               + sizes["frozen"]) / 1024, 2)})
    return result


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"figures to run (default all): {', '.join(FIGURES)}")
    parser.add_argument("--full", action="store_true", help="paper-size settings (use on a GPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    args.device = pick_device(args.device)
    wanted = args.names or list(FIGURES)
    unknown = [name for name in wanted if name not in FIGURES]
    if unknown:
        raise UserError(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    print(f"device: {torch.cuda.get_device_name(args.device) if args.device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    for name in wanted:
        for key, value in FIGURES[name](args).items():
            print(f"{key}: {value}", flush=True)


if __name__ == "__main__":
    run_main(main)
