"""Learning-rate schedules used by the LongLoRA recipes."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def get_constant_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, last_epoch: int = -1
) -> LambdaLR:
    """Linear warm-up to the optimizer's learning rate, then constant (the LongLoRA paper's schedule).

    Step ``s`` (0-based) uses ``lr * min(1, (s + 1) / num_warmup_steps)``: the first step already moves
    the weights (unlike schedules that start at exactly 0) and step ``num_warmup_steps - 1`` reaches the
    full rate.

    Args:
        optimizer: the optimizer whose learning rate is scheduled.
        num_warmup_steps: steps of linear warm-up; 0 means constant from the start.
        last_epoch: index of the last completed step, for resuming (-1 for a fresh run).

    Returns:
        The scheduler; call ``step()`` once after each optimizer step.

    Raises:
        ValueError: if ``num_warmup_steps`` is negative.
    """
    if num_warmup_steps < 0:
        raise ValueError(f"num_warmup_steps={num_warmup_steps} must be >= 0")

    def lr_lambda(step: int) -> float:
        if num_warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / num_warmup_steps)

    return LambdaLR(optimizer, lr_lambda, last_epoch=last_epoch)
