"""Where and how a process computes: its device and rank (DDP from torchrun's environment, a plain single process
otherwise, as in nanoGPT), deterministic CPU kernels, mixed precision, and the reductions over ranks that keep every
rank's decision the same."""

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from errors import UserError


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: DDP from torchrun's environment, plain single process otherwise (nanoGPT).

@dataclass
class Dist:
    enabled: bool
    rank: int
    local_rank: int
    world_size: int
    device: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def setup_distributed(device_name: str, timeout_minutes: float = 20) -> Dist:
    """Initialise the process group when launched by torchrun (gloo on CPU, nccl on GPU); a collective that waits
    longer than `timeout_minutes` for a stalled rank fails instead of blocking the others for torch's default."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(False, 0, 0, 1, pick_device(device_name))
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(True, rank, local_rank, world_size, device)


def deterministic_algorithms(device) -> None:
    """On the CPU, ask torch for deterministic kernels: the backward of an index (codes[indices], gather) otherwise
    accumulates in a thread-dependent order, and two runs on several threads drift apart after a few steps. (CUDA
    runs are not promised bit-identical: some of their kernels have no deterministic version.)"""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)


def cleanup_distributed(d: Dist) -> None:
    """Leave the process group, if this process joined one."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Mixed precision.

def amp_dtype(setting: str, device):
    """Autocast dtype for `amp: auto|bf16|fp16|off`; None means full precision (the CPU default)."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def autocast(device, dtype):
    """Mixed precision in `dtype` (from amp_dtype) on `device`; dtype None runs in full precision."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------------------------------
# Reductions over ranks: every rank takes the same decision and logs the same numbers.

def all_finite(value, d: Dist) -> bool:
    """True when `value` is finite on every rank (all ranks stop together otherwise)."""
    flag = torch.tensor([float(torch.isfinite(value.detach()).all())], device=value.device)
    if d.enabled:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def reduce_mean(values: dict, d: Dist) -> dict:
    """Average a dict of scalars over ranks (for logging)."""
    if not d.enabled or not values:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], device=d.device)
    dist.all_reduce(stacked)
    return {k: float(v) / d.world_size for k, v in zip(keys, stacked.tolist())}
