"""Every way a condition reaches a diffusion network, used by training and by sampling alike.

A `Conditioning` turns ``(x_t, condition)`` into the network's call ``network(input, timesteps=t, **kwargs)``:

=========  ===============================================  =======================================  ==============
mode       condition                                        network call                             null condition
=========  ===============================================  =======================================  ==============
concat     (B, C, *spatial), e.g. an encoded mask or image  ``network(cat([x_t, c]), t)``            `null_value`
seg        (B, L, *spatial) one-hot label map (SPADE)       ``network(x_t, t, seg=c)``               `null_value`
context    (B, S, D) cross-attention context                ``network(x_t, t, context=c)``           `null_value`
class      (B,) integer class index                         ``network(x_t, t, class_labels=c)``      `null_class`
latent     (B, D) vector, broadcast over the grid           ``network(cat([x_t, c[..., None, ..]]), t)``  `null_value`
none       None                                             ``network(x_t, t)``                      None
=========  ===============================================  =======================================  ==============

The null condition is what classifier-free guidance (Ho & Salimans 2022) pairs with the condition: a map filled
with `null_value` (SDM, Wang et al. 2022, feeds an all-zero label map), or the extra class index `null_class` a
class-conditioned network was trained with. `batched` stacks a condition and its null along the batch so that
guidance costs one network call. `concat_inputs` is the one channel concatenation of the library (CIMD's denoiser
stacks its image and, for the cVAE design, its broadcast latent with it).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MODES", "Conditioning", "concat_inputs"]

MODES = ("concat", "seg", "context", "class", "latent", "none")


def concat_inputs(x: torch.Tensor, *conditions: torch.Tensor | None) -> torch.Tensor:
    """``cat([x, c_1, c_2, ...], dim=1)`` in x's dtype; a (B, D) vector is broadcast over x's spatial grid."""
    parts = [x]
    for c in conditions:
        if c is None:
            continue
        c = c.to(device=x.device, dtype=x.dtype)
        if c.ndim == 2 and x.ndim > 2:
            c = c.view(*c.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
        if c.shape[0] != x.shape[0] or c.shape[2:] != x.shape[2:]:
            raise ValueError(f"a condition of shape {tuple(c.shape)} cannot be concatenated to x {tuple(x.shape)}.")
        parts.append(c)
    return torch.cat(parts, dim=1) if len(parts) > 1 else x


class Conditioning:
    """How a condition is given to a network (see the module docstring for the modes).

    Args:
        mode: one of "concat", "seg", "context", "class", "latent", "none".
        null_value: fill value of the null condition for map and vector modes (classifier-free guidance).
        null_class: the class index a class-conditioned network was trained to read as "no class" (mode "class").
        channels_last: give the network its input in channels-last memory format.
    """

    def __init__(
        self, mode: str = "concat", null_value: float = 0.0, null_class: int | None = None, channels_last: bool = False
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown conditioning mode {mode!r}: choose one of {', '.join(MODES)}.")
        self.mode, self.null_value, self.null_class, self.channels_last = (
            mode,
            float(null_value),
            null_class,
            channels_last,
        )

    def __repr__(self) -> str:
        return f"Conditioning(mode={self.mode!r})"

    def network_inputs(self, x: torch.Tensor, condition: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The network's first argument and its conditioning keyword arguments for ``(x_t, condition)``."""
        if self.mode == "none":
            return self._layout(x), {}
        if condition is None:
            raise ValueError(f"conditioning mode {self.mode!r} needs a condition; got None.")
        if self.mode in ("concat", "latent"):
            return self._layout(concat_inputs(x, condition)), {}
        if self.mode == "seg":
            return self._layout(x), {"seg": self._layout(condition.to(x.dtype))}
        if self.mode == "context":
            return self._layout(x), {"context": condition.to(x.dtype)}
        return self._layout(x), {"class_labels": condition.long()}

    def __call__(self, network: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor, condition: Any) -> Any:
        """``network(input, timesteps=t, **kwargs)`` with the condition placed as the mode says."""
        inputs, kwargs = self.network_inputs(x, condition)
        return network(inputs, timesteps=timesteps, **kwargs)

    def null(self, condition: Any) -> Any:
        """The null condition matching `condition` (same shape, dtype and device)."""
        if self.mode == "none":
            return None
        if self.mode == "class":
            if self.null_class is None:
                raise ValueError("classifier-free guidance with class conditioning needs `null_class`.")
            return torch.full_like(condition, self.null_class)
        return torch.full_like(condition, self.null_value)

    def drop(self, condition: Any, keep: torch.Tensor) -> Any:
        """`condition` where ``keep`` (B,) is True, the null condition elsewhere (condition dropout in training)."""
        if self.mode == "none":
            return None
        null = self.null(condition)
        return torch.where(keep.view(-1, *([1] * (condition.ndim - 1))).to(condition.device), condition, null)

    @staticmethod
    def batched(condition: Any, other: Any) -> Any:
        """Two conditions stacked along the batch (for one network call); None stays None."""
        return None if condition is None else torch.cat([condition, other], dim=0)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x
