"""Linear Monge-Kantorovitch (MKL) colour transfer (Pitie & Kokaram 2007, "The linear Monge-Kantorovitch linear
colour mapping for example-based colour transfer", IET CVMP).

The polyp method colour-matches each styled image to its target this way (methods.md section 1.5). The pixels'
colours are modelled as Gaussians: source N(mu_s, C_s), reference N(mu_r, C_r). The map x -> (x - mu_s) T + mu_r
with the symmetric positive semi-definite

    T = C_s^{-1/2} (C_s^{1/2} C_r C_s^{1/2})^{1/2} C_s^{-1/2}

is the one among linear maps sending the first Gaussian to the second (T C_s T = C_r) that moves colours least in
mean squared distance (the Monge-Kantorovitch solution for Gaussians; the paper's eq. 8).

Conventions:
- colours are the last axis (3 channels); every pixel counts once; covariances are population covariances
  (normalised by the pixel count);
- square roots are symmetric, from an eigen-decomposition with negative round-off eigenvalues set to 0; the inverse
  square root floors the eigenvalues at ``1e-10`` times the largest (and at least ``1e-30``), so a flat or singular
  source (a constant channel, a grey image) maps without dividing by zero;
- a uint8 source gives a uint8 result (rounded to nearest, clipped to 0..255); a float source gives a float result of
  its dtype, unclipped; any other source (other integer types) gives float64, unclipped. The arithmetic is float64.

Written from the paper: the project does not depend on the ``color-matcher`` package (GPL-3.0), whose ``method='mkl'``
the seed calls.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mkl_transfer", "mkl_transform"]

_EIG_FLOOR = 1e-10


def _sym_sqrt(matrix: np.ndarray, inverse: bool = False) -> np.ndarray:
    """The symmetric square root (or inverse square root) of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    values = np.clip(values, 0.0, None)
    if inverse:
        values = 1.0 / np.sqrt(np.maximum(values, max(_EIG_FLOOR * float(values.max()), 1e-30)))
    else:
        values = np.sqrt(values)
    return (vectors * values) @ vectors.T


def _pixels(image: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim < 2 or array.shape[-1] != 3:
        raise ValueError(f"{name} must have its 3 colour channels last, e.g. (H, W, 3); got shape {array.shape}.")
    pixels = array.reshape(-1, 3).astype(np.float64)
    if pixels.shape[0] == 0:
        raise ValueError(f"{name} has no pixels.")
    return pixels


def mkl_transform(source: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu_s, T, mu_r) of the MKL map x -> (x - mu_s) T + mu_r, in float64, from the two images' pixel colours."""
    src, ref = _pixels(source, "source"), _pixels(reference, "reference")
    mu_s, mu_r = src.mean(axis=0), ref.mean(axis=0)
    cov_s = np.cov(src, rowvar=False, bias=True)
    cov_r = np.cov(ref, rowvar=False, bias=True)
    root_s, inv_root_s = _sym_sqrt(cov_s), _sym_sqrt(cov_s, inverse=True)
    middle = _sym_sqrt(root_s @ cov_r @ root_s)
    transform = inv_root_s @ middle @ inv_root_s
    return mu_s, (transform + transform.T) / 2.0, mu_r


def mkl_transfer(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`source` with its colours mapped so that their mean and covariance are `reference`'s (module docstring).

    Args:
        source: the image to recolour, (..., 3) uint8 or float.
        reference: the image whose colour statistics to take, (..., 3) uint8 or float; its size may differ.
    """
    source = np.asarray(source)
    mu_s, transform, mu_r = mkl_transform(source, reference)
    out = (source.reshape(-1, 3).astype(np.float64) - mu_s) @ transform + mu_r
    out = out.reshape(source.shape)
    if source.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if np.issubdtype(source.dtype, np.floating):
        return out.astype(source.dtype)
    return out
