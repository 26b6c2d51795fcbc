"""Collapse signals of a distribution-matching method (DINO Sec. 5.3 "Avoiding collapse").

Pure functions of device tensors returning fp32 device scalars: no host sync. The method computes them on
log steps; `fastdino.engine.health.HealthMonitor` reads them from the logged metrics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def distribution_signals(log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """log_probs: (N, K) log-probabilities of N rows (log_softmax output). Entropies in nats:

    entropy: mean over rows of H(p_i) = -sum_k p_ik log p_ik (log K = uniform, 0 = one-hot rows);
    mean_entropy: H of the batch mean (1/N) sum_i p_i (low = one dimension takes the mass of the whole batch);
    each also as a ratio to log K.
    """
    with torch.autocast(log_probs.device.type, enabled=False):
        log_p = log_probs.float()  # (N, K)
        p = log_p.exp()
        log_k = math.log(log_p.shape[-1])
        entropy = -(p * log_p).sum(-1).mean()
        p_mean = p.mean(0)  # (K,)
        mean_entropy = -torch.special.xlogy(p_mean, p_mean).sum()
    return {
        "entropy": entropy, "entropy_ratio": entropy / log_k,
        "mean_entropy": mean_entropy, "mean_entropy_ratio": mean_entropy / log_k,
    }


@torch.no_grad()
def feature_spread(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """features: (N, D). Std across the batch of the L2-normalised rows, averaged over the D dimensions
    (unbiased, N >= 2): 0 when every row points the same way; 1/sqrt(D) when the rows are spread evenly
    over the sphere, so `std_ratio` = std * sqrt(D) is about 1 for well-spread features."""
    with torch.autocast(features.device.type, enabled=False):
        z = F.normalize(features.float(), dim=-1)  # (N, D)
        std = z.std(dim=0).mean()
    return {"std": std, "std_ratio": std * math.sqrt(features.shape[-1])}
