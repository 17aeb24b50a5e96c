"""Top-1/top-5 evaluation of a PyTorch model on a loader of (image, target, index) batches."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..distributed import DistEnv, all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv | None = None,
             autocast: torch.autocast | None = None, layout: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> dict[str, float]:
    """Metrics over the whole split: each process evaluates its shard, sums are reduced over processes."""
    env = env or DistEnv()
    was_training = model.training
    model.eval()
    sums = {"loss": 0.0, "correct1": 0.0, "correct5": 0.0, "count": 0.0}
    for images, targets, _ in loader:
        images, targets = images.to(env.device, non_blocking=True), targets.to(env.device, non_blocking=True)
        if layout is not None:
            images = layout(images)
        if autocast is not None:
            with autocast:
                logits = model(images)
        else:
            logits = model(images)
        logits = logits.float()
        sums["loss"] += F.cross_entropy(logits, targets, reduction="sum").item()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top5.eq(targets[:, None])
        sums["correct1"] += hits[:, 0].sum().item()
        sums["correct5"] += hits.any(dim=-1).sum().item()
        sums["count"] += len(targets)
    model.train(was_training)
    sums = all_reduce_sum(sums, env)
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss"] / n, "top1": 100 * sums["correct1"] / n, "top5": 100 * sums["correct5"] / n,
            "count": int(sums["count"])}
