"""`meddiff.morphology` against hand-written answers (OpenCV's MORPH_ELLIPSE elements, unreflected anchor, border)."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.morphology import dilate, ellipse, erode, open_mask


def grid(text: str) -> np.ndarray:
    return np.array([[c == "X" for c in line.strip()] for line in text.strip().splitlines()])


def test_ellipse_5x5():
    expected = grid(
        """
        ..X..
        XXXXX
        XXXXX
        XXXXX
        ..X..
        """
    )
    assert ellipse(5).dtype == bool
    np.testing.assert_array_equal(ellipse(5), expected)


def test_ellipse_even_sizes_are_asymmetric():
    np.testing.assert_array_equal(
        ellipse(4),
        grid(
            """
            ..X.
            XXXX
            XXXX
            XXXX
            """
        ),
    )
    np.testing.assert_array_equal(
        ellipse(6),
        grid(
            """
            ...X..
            .XXXXX
            XXXXXX
            XXXXXX
            XXXXXX
            .XXXXX
            """
        ),
    )
    e16 = ellipse(16)
    assert e16.shape == (16, 16)
    # first row: the single pixel (0, 8); row 8 full; column 0 where round(sqrt(64 - dy^2)) >= 8, i.e. |dy| <= 2
    np.testing.assert_array_equal(np.flatnonzero(e16[0]), [8])
    assert e16[8].all()
    np.testing.assert_array_equal(np.flatnonzero(e16[:, 0]), [6, 7, 8, 9, 10])
    # row 1 (dy = -7): dx = round(sqrt(15)) = 4, columns 4..12
    np.testing.assert_array_equal(np.flatnonzero(e16[1]), np.arange(4, 13))
    assert ellipse(1).tolist() == [[True]]
    with pytest.raises(ValueError):
        ellipse(0)


def test_dilate_uses_the_unreflected_element_and_anchor():
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[3, 3] = 1
    expected = grid(
        """
        ........
        ........
        ..XXXX..
        ..XXXX..
        ..XXXX..
        ...X....
        ........
        ........
        """
    )
    out = dilate(mask, 4)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out.astype(bool), expected)


@pytest.mark.parametrize("size", [16, 20])
def test_dilate_single_pixel_is_the_reflected_ellipse(size):
    mask = np.zeros((48, 48), dtype=bool)
    mask[24, 24] = True
    a, n = size // 2, size
    expected = np.zeros_like(mask)
    top = 24 + a - (n - 1)
    expected[top : top + n, top : top + n] = ellipse(size)[::-1, ::-1]
    np.testing.assert_array_equal(dilate(mask, size), expected)


def test_erode_and_open():
    blob = np.zeros((9, 9), dtype=bool)
    blob[2:7, 2:7] = ellipse(5)
    speck = np.zeros_like(blob)
    speck[0, 8] = True
    # the opening of the element by itself is the element; an isolated pixel disappears
    np.testing.assert_array_equal(open_mask(blob | speck, 5), blob)
    eroded = np.zeros_like(blob)
    eroded[4, 4] = True
    np.testing.assert_array_equal(erode(blob, 5), eroded)


def test_border_does_not_erode():
    full = np.ones((6, 7), dtype=np.int64)
    np.testing.assert_array_equal(open_mask(full, 16), full)
    assert open_mask(full, 16).dtype == np.int64
    half = np.zeros((20, 20), dtype=np.uint8)
    half[:, :10] = 1  # touches three image edges: the opening keeps it whole
    np.testing.assert_array_equal(open_mask(half, 5), half)


def test_non_binary_mask_is_refused():
    with pytest.raises(ValueError, match="only 0 and 1"):
        dilate(np.array([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="2-D"):
        open_mask(np.zeros((2, 2, 2), dtype=bool))
