"""The trainers' shared steps (pretrain_vae.py, train_ocl.py): set-up (DDP, run directory, log, checkpoint to resume),
the optimizer and each rank's random state, the optimisation step, what a checkpoint holds, the log rows and the
end of a run. Each trainer's main calls them in its own order."""

import torch
import torch.distributed as dist

from config import RESUME_FREE_KEYS
from devices import (Dist, all_finite, amp_dtype, cleanup_distributed, deterministic_algorithms, reduce_mean,
                     setup_distributed)
from errors import UserError
from runs import (TRAINING_ONLY_KEYS, RunLog, check_same_config, claim_run_dir, list_checkpoints, load_checkpoint,
                  load_weights, record_environment, release_run_dir)


# ----------------------------------------------------------------------------------------------------------------
# Resuming a run exactly: the checkpoint to continue from, and every rank's random state.

def resume_state(config: dict, kind: str, model_keys, old_defaults: dict = None) -> tuple:
    """(checkpoint dict or None, start step) for `resume`: a path, 'auto' (the latest checkpoint in out_dir if
    there is one, else a fresh start) or empty. The checkpoint's model keys must match the config; a key of
    `old_defaults` that the checkpoint's config lacks (an option added since, checkpoints.old_defaults) counts as
    that default, which is what the checkpoint was trained with."""
    resume = config["resume"]
    if resume == "auto":
        resume = config["out_dir"] if list_checkpoints(config["out_dir"]) else ""
    if not resume:
        return None, 0
    state = load_checkpoint(resume, kind=kind)
    if any(key not in state for key in TRAINING_ONLY_KEYS):
        raise UserError(f"{state['path']} is an export for evaluation (best.pt) without the optimizer and RNG state "
                        f"that a resume needs; resume from one of the run's ckpt_*.pt files")
    saved = {**(old_defaults or {}), **state["config"]}
    check_same_config(saved, config, model_keys, f"checkpoint {state['path']}")
    changed = [key for key in config if key not in RESUME_FREE_KEYS and key not in config["allow_changed"]
               and key in saved and saved[key] != config[key]]
    if changed:
        listed = ", ".join(f"{key} {saved[key]!r} -> {config[key]!r}" for key in changed)
        raise UserError(f"checkpoint {state['path']} was trained with other settings that change the run's "
                        f"trajectory ({listed}); resume with the checkpoint's settings, accept them with "
                        f"--allow_changed {','.join(changed)}, or start afresh in another --out_dir")
    return state, state["step"]


def restore_training_state(state: dict, model, optimizer, scaler, rank: int, log: RunLog) -> None:
    """Load a checkpoint's weights, optimizer and grad-scaler state and this rank's RNG state, so the run continues
    exactly where it stopped (with more ranks than the checkpoint has RNG states, the extra ones take the last),
    and cut the run's log back to the checkpoint's step."""
    load_weights(model, state["model"], state["path"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
    log.rewind(state["step"])
    log.info(f"resumed from {state['path']} at step {state['step']}")


def gather_rng_states(d: "Dist") -> list:
    """Every rank's RNG state (rank order), for a checkpoint that resumes each rank exactly."""
    states = [rng_state()]
    if d.enabled:
        states = [None] * d.world_size
        dist.all_gather_object(states, rng_state())
    return states


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# The optimisation step shared by the two trainers.

def optimizer_step(loss, parameters, optimizer, scaler, clip: float) -> float:
    """Backward, unscale, clip the global L2 norm, step; returns the pre-clip gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    return float(norm)


# ----------------------------------------------------------------------------------------------------------------
# The trainers' set-up and bookkeeping: small steps each trainer's main calls in its own order.

def start_run(config: dict, kind: str, model_keys, old_defaults: dict = None) -> tuple:
    """DDP under torchrun (one process per GPU) or one process, deterministic kernels, the run directory claimed and
    locked, its log, and the checkpoint to resume from: (d, log, checkpoint dict or None, start step). Rank 0
    records the environment in out_dir/environment.json (runs.record_environment). `old_defaults`: as
    resume_state."""
    d = setup_distributed(config["device"], config["ddp_timeout_minutes"])
    deterministic_algorithms(d.device)  # bit-identical runs and resumes on multi-threaded CPUs
    claim_run_dir(config, d)  # refuses another run's directory, and locks this one
    log = RunLog(config["out_dir"], d.is_main)
    state, start_step = resume_state(config, kind, model_keys, old_defaults)
    if d.is_main:
        record_environment(config["out_dir"], d.device, resumed=state is not None)
    return d, log, state, start_step


def adam(parameters, lr: float) -> torch.optim.Adam:
    """Adam as every trainer runs it: fused, one pass over all parameters per step instead of a dozen small
    operations per tensor (CPU and GPU alike). On the CPU, SlotDiffusion's 508 parameter tensors took 15 ms a step
    instead of 41, SLATE's 84 took 0.8 ms instead of 4.3 (`python bench.py adam_step`)."""
    return torch.optim.Adam(parameters, lr=lr, fused=True)


def optimizer_and_rng(parameters, config: dict, d: Dist, model, state, log: RunLog) -> tuple:
    """Adam, the AMP dtype and its grad scaler, and each rank's own noise from here on: seeded with
    seed * world_size + rank on a fresh start, restored with the weights and optimizer on resume."""
    optimizer = adam(parameters, config["lr"])
    dtype = amp_dtype(config["amp"], d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    if state is None:
        torch.manual_seed(config["seed"] * d.world_size + d.rank)
    else:
        restore_training_state(state, model, optimizer, scaler, d.rank, log)
    return optimizer, dtype, scaler


def checkpoint_payload(kind: str, model, optimizer, scaler, step: int, config: dict, rng: list,
                       resolution: int, fingerprint=None) -> dict:
    """What every checkpoint holds: the weights, the optimizer and scaler state, every rank's RNG state, the config
    and the data it trained on (with the training split's fingerprint, which a resume checks)."""
    return {"kind": kind, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "config": config, "rng": rng,
            "data": {"data_dir": config["data_dir"], "train": config["train_split"], "val": config["val_split"],
                     "resolution": resolution, "fingerprint": fingerprint}}


def stop_on_non_finite(loss, step: int, d: Dist, out_dir: str) -> None:
    """Stop every rank together on a non-finite loss, naming the step."""
    if not all_finite(loss, d):
        raise UserError(f"non-finite loss at step {step} ({float(loss.detach())}); lower lr or check the data; the "
                        f"last checkpoint in {out_dir} is intact")


def record_training(log: RunLog, stats: dict, d: Dist, step: int, seconds_per_step: float, **values) -> dict:
    """Log one training step: its stats averaged over ranks with `values`, to log.jsonl and log.txt."""
    entry = reduce_mean(stats, d)
    entry.update(step=step + 1, **values, seconds_per_step=seconds_per_step)
    log.record(entry)
    log.info(f"step {step + 1}: loss {entry['loss']:.4g}, lr {entry['lr']:.3g}, grad_norm {entry['grad_norm']:.3g}",
             echo=False)
    return entry


def record_validation(log: RunLog, metrics: dict, step: int) -> None:
    """Log the validation metrics after `step`, to log.jsonl and log.txt."""
    log.record({"step": step + 1, **metrics})
    log.info(f"step {step + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def finish_run(log: RunLog, d: Dist, out_dir: str) -> None:
    """Close the log, unlock the run directory and leave the process group."""
    log.close()
    release_run_dir(out_dir)
    cleanup_distributed(d)
