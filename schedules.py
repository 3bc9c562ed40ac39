"""Schedules: pure functions of the global step, so a resumed run continues them exactly."""

import math


def warmup_cosine(step: int, total: int, peak: float, warmup_fraction: float = 0.05, final_ratio: float = 1e-3) -> float:
    """Linear warm-up from 0 over `warmup_fraction` of `total`, then cosine from `peak` to `peak * final_ratio`."""
    warmup = max(1, int(round(total * warmup_fraction)))
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    final = peak * final_ratio
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def set_scheduled_lr(optimizer, step: int, config: dict) -> float:
    """Give every parameter group the config's warm-up + cosine learning rate at `step`; returns it."""
    lr = warmup_cosine(step, config["steps"], config["lr"], config["warmup_fraction"], config["lr_final_ratio"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def cosine_anneal(step: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` at step 0 to `end` at `total`, constant after."""
    if total <= 0:
        return end
    progress = min(1.0, max(0.0, step / total))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))
