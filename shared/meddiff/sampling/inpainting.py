"""RePaint's known-region merge (Lugmayr et al. 2022, eq. 8-9), an after-step hook of `meddiff.sampling.sample`.

After every move down to t_next, the known pixels are replaced by the given image noised to t_next with fresh
noise (x^known_{t-1} ~ q(x_{t-1} | x_0)); at the clean end (t_next = -1) they are the given image itself. Where
``mask`` is 1 the pixel is known. The jumps back up (resampling) are the scheduler's (`RePaintScheduler`).
"""

from __future__ import annotations

import torch

__all__ = ["KnownRegionMerge"]


class KnownRegionMerge:
    """``(x, t_next, generator) -> mask * noised(known, t_next) + (1 - mask) * x``.

    Args:
        known: the image whose known pixels are kept, (B, C, *spatial), in the model's data range.
        mask: 1 where a pixel is known, 0 where it is generated; broadcastable to `known`.
        scheduler: the sampling scheduler (its `add_noise` gives q(x_t | x_0)).
    """

    def __init__(self, known: torch.Tensor, mask: torch.Tensor, scheduler) -> None:
        self.known, self.scheduler = known.float(), scheduler
        self.mask = mask.float().to(known.device).expand_as(self.known)
        if not ((self.mask == 0) | (self.mask == 1)).all():
            raise ValueError("the inpainting mask must hold only 0 (generate) and 1 (keep).")

    def __call__(self, x: torch.Tensor, t_next: int, generator: torch.Generator | None) -> torch.Tensor:
        if t_next < 0:
            known = self.known
        else:
            noise = torch.randn(self.known.shape, generator=generator, device=self.known.device)
            t = torch.full((self.known.shape[0],), t_next, device=self.known.device, dtype=torch.long)
            known = self.scheduler.add_noise(self.known, noise, t).float()
        return self.mask * known + (1.0 - self.mask) * x
