"""Guidance as denoiser wrappers: classifier-free (one batched call) and classifier-gradient guidance.

Both return a `meddiff.sampling.loop.Denoiser`, so any scheduler and start can be guided.

- `classifier_free`: eps = eps(x, null) + s * (eps(x, c) - eps(x, null)) (Ho & Salimans 2022, eq. 6 written with
  s = 1 + w): s = 0 is the unconditional model, s = 1 the conditional one, s > 1 strengthens the condition. The
  condition and its null run as one batch of 2B through `meddiff.conditioning.Conditioning`, so it works for every
  mode, SPADE's ``seg`` included (MONAI 1.6's `DiffusionInferer.sample` fills only ``conditioning`` and passes the
  SPADE map unguided). With `eps_channels` set (learned-sigma models output 2C channels), only the first
  `eps_channels` are guided; the variance channels are the conditional model's, as in SDM's sampler. `scale` may
  be one number or one per sample (a (B,) sequence or tensor: a sweep over s in one batch, as the nuclei seed's
  synthetic sets mix s = 1.3 ... 1.6).
- `classifier_gradient`: eps_hat = eps - s * sqrt(1 - alpha_bar_t) * grad_x log p(y | x_t, t) (Dhariwal & Nichol
  2021, Algorithm 2; for an exact score it shifts the ancestral step's mean by s * Sigma * grad as in their
  Algorithm 1). Gradients are enabled inside the wrapper only; the denoiser stays under ``no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from meddiff.conditioning import Conditioning
from meddiff.sampling.loop import Denoiser

__all__ = ["LogProb", "class_log_prob", "classifier_free", "classifier_gradient", "conditioned"]

# log_prob(x_t, t) -> (B,) log p(y | x_t, t) for the wanted y
LogProb = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def conditioned(network: torch.nn.Module, conditioning: Conditioning, condition: Any) -> Denoiser:
    """The plain conditional denoiser ``(x, t) -> network(x with condition, t)`` in the network's dtype."""
    dtype = next(network.parameters()).dtype

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return conditioning(network, x.to(dtype), t, condition).float()

    return denoise


def classifier_free(
    network: torch.nn.Module,
    conditioning: Conditioning,
    condition: Any,
    scale: float | Sequence[float] | torch.Tensor,
    eps_channels: int | None = None,
) -> Denoiser:
    """Classifier-free guidance with scale `scale` (see the module docstring); s = 1 costs one plain call."""
    scales = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    if scales.numel() > 1 and (scales == scales[0]).all():
        scales = scales[:1]
    if scales.numel() == 1 and float(scales) == 1.0:
        return conditioned(network, conditioning, condition)
    null = conditioning.null(condition)
    if scales.numel() == 1 and float(scales) == 0.0:
        return conditioned(network, conditioning, null)
    both = Conditioning.batched(condition, null)
    dtype = next(network.parameters()).dtype

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = conditioning(network, torch.cat([x, x]).to(dtype), torch.cat([t, t]), both).float()
        cond, uncond = out.chunk(2)
        k = cond.shape[1] if eps_channels is None else eps_channels
        s = scales.to(out.device).view(-1, *([1] * (out.ndim - 1)))
        guided = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1) if k < cond.shape[1] else guided

    return denoise


def classifier_gradient(
    denoiser: Denoiser, log_prob: LogProb, scheduler, scale: float, eps_channels: int | None = None
) -> Denoiser:
    """Classifier guidance of an epsilon-predicting `denoiser` by ``grad_x log_prob(x_t, t)`` (module docstring)."""
    if getattr(scheduler, "prediction_type", "epsilon") != "epsilon":
        raise ValueError("classifier_gradient guides epsilon-predicting models only.")
    scale = float(scale)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = denoiser(x, t).float()
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            grad = torch.autograd.grad(log_prob(x_in, t).sum(), x_in)[0]
        alpha_bar = scheduler.alphas_cumprod.to(x.device)[t.long()].float()
        shift = scale * (1.0 - alpha_bar).sqrt().view(-1, *([1] * (x.ndim - 1))) * grad
        k = out.shape[1] if eps_channels is None else eps_channels
        return torch.cat([out[:, :k] - shift, out[:, k:]], dim=1) if k < out.shape[1] else out - shift

    return denoise


def class_log_prob(classifier: torch.nn.Module, labels: torch.Tensor) -> LogProb:
    """log p(y | x_t, t) of a noise-aware classifier ``classifier(x, timesteps=t) -> logits (B, K)`` for `labels`."""
    dtype = next(classifier.parameters()).dtype

    def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = classifier(x.to(dtype), timesteps=t).float()
        return torch.log_softmax(logits, dim=1).gather(1, labels.long().view(-1, 1).to(x.device))[:, 0]

    return log_prob
