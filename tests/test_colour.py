"""`meddiff.colour.mkl_transfer` against exact answers: the mapped colours' mean and covariance, identities, a
diagonal case with a hand-computed map, and the uint8 path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from meddiff.colour import mkl_transfer, mkl_transform


def stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
    return pixels.mean(axis=0), np.cov(pixels, rowvar=False, bias=True)


def correlated_image(rng: np.random.Generator, shape: tuple[int, int], mixing: np.ndarray, offset) -> np.ndarray:
    return rng.normal(size=(*shape, 3)) @ mixing + np.asarray(offset)


def test_float_output_has_the_reference_mean_and_covariance():
    rng = np.random.default_rng(0)
    source = correlated_image(rng, (24, 20), np.array([[0.2, 0.05, 0.0], [0.0, 0.1, 0.03], [0.02, 0.0, 0.15]]), 0.4)
    reference = correlated_image(
        rng, (16, 30), np.array([[0.1, -0.04, 0.02], [0.03, 0.2, 0.0], [0.0, 0.05, 0.08]]), 0.6
    )
    out = mkl_transfer(source.astype(np.float32), reference.astype(np.float32))
    assert out.dtype == np.float32 and out.shape == source.shape
    out64 = mkl_transfer(source, reference)
    assert out64.dtype == np.float64
    mean_o, cov_o = stats(out64)
    mean_r, cov_r = stats(reference)
    np.testing.assert_allclose(mean_o, mean_r, atol=1e-6, rtol=0)
    np.testing.assert_allclose(cov_o, cov_r, atol=1e-6, rtol=0)
    # T is symmetric positive definite and T C_s T = C_r
    _, transform, _ = mkl_transform(source, reference)
    np.testing.assert_allclose(transform, transform.T, atol=1e-12)
    assert np.linalg.eigvalsh(transform).min() > 0
    np.testing.assert_allclose(transform @ stats(source)[1] @ transform, cov_r, atol=1e-10)


def test_identity_when_source_is_reference():
    rng = np.random.default_rng(1)
    image = rng.random((10, 12, 3))
    np.testing.assert_allclose(mkl_transfer(image, image), image, atol=1e-9)
    _, transform, _ = mkl_transform(image, image)
    np.testing.assert_allclose(transform, np.eye(3), atol=1e-9)


def test_diagonal_covariances_give_the_ratio_of_standard_deviations():
    # the 8 corners of the cube {-1, 1}^3: mean 0 and covariance exactly I
    corners = np.array(list(itertools.product([-1.0, 1.0], repeat=3))).reshape(2, 4, 3)
    mu_s, sd_s = np.array([0.2, 0.5, 0.3]), np.array([0.1, 0.05, 0.2])
    mu_r, sd_r = np.array([0.6, 0.1, 0.4]), np.array([0.3, 0.02, 0.1])
    source = mu_s + sd_s * corners
    reference = mu_r + sd_r * corners[:, ::-1]  # same statistics, pixels in another order
    _, transform, _ = mkl_transform(source, reference)
    np.testing.assert_allclose(transform, np.diag(sd_r / sd_s), atol=1e-12)
    np.testing.assert_allclose(mkl_transfer(source, reference), mu_r + sd_r * corners, atol=1e-12)


def test_uint8_in_uint8_out_rounded_and_clipped():
    rng = np.random.default_rng(2)
    source = rng.integers(60, 120, size=(16, 16, 3)).astype(np.uint8)
    reference = np.clip(rng.normal(220, 60, size=(16, 16, 3)), 0, 255).astype(np.uint8)
    out = mkl_transfer(source, reference)
    assert out.dtype == np.uint8 and out.shape == source.shape
    exact = mkl_transfer(source.astype(np.float64), reference.astype(np.float64))
    assert exact.max() > 255  # the test exercises the clip
    np.testing.assert_array_equal(out, np.clip(np.rint(exact), 0, 255).astype(np.uint8))


def test_singular_source_covariance_stays_finite():
    source = np.zeros((4, 4, 3))
    source[..., 0] = np.linspace(0, 1, 16).reshape(4, 4)  # channels 1 and 2 constant
    reference = np.random.default_rng(3).random((4, 4, 3))
    out = mkl_transfer(source, reference)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.reshape(-1, 3).mean(axis=0), reference.reshape(-1, 3).mean(axis=0), atol=1e-9)


def test_bad_shapes():
    with pytest.raises(ValueError, match="3 colour channels last"):
        mkl_transfer(np.zeros((4, 4)), np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="reference"):
        mkl_transfer(np.zeros((4, 4, 3)), np.zeros((3, 4, 4)))
