"""Built-in demo data: breast-MRI-like multi-class phantom volumes written in the NIfTI (MSD) layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from monai.data.synthetic import create_test_image_3d
from scipy.ndimage import gaussian_filter

from meddiff.io import atomic_write

__all__ = ["make_phantom_dataset", "make_phantom_volume"]

# class intensities before noise: background, breast (fat), blood vessels, fibroglandular tissue
_INTENSITY = np.array([0.02, 0.35, 1.0, 0.75], dtype=np.float32)


def make_phantom_volume(
    size: int = 64, depth: int = 16, rng: np.random.RandomState | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, depth) phantom: image in [0,1] and labels 0 bg, 1 breast, 2 vessels, 3 FGT.

    The breast is a half ellipsoid against the chest wall; fibroglandular tissue is the blobs of MONAI's
    `create_test_image_3d` inside it; vessels are thin random lines through it.
    """
    rng = rng or np.random.RandomState(0)
    x, y, z = np.meshgrid(np.arange(size), np.arange(size), np.arange(depth), indexing="ij")
    a, b = size * rng.uniform(0.38, 0.46), size * rng.uniform(0.5, 0.7)
    breast = ((x - size / 2) / a) ** 2 + ((y - size) / b) ** 2 + ((z - depth / 2) / (depth * 0.7)) ** 2 <= 1.0
    label = breast.astype(np.uint8)
    _, blobs = create_test_image_3d(
        size,
        size,
        depth,
        num_objs=12,
        rad_max=max(2, min(size // 8, (depth - 1) // 2)),
        rad_min=1,
        num_seg_classes=1,
        random_state=rng,
    )
    shrunk = ((x - size / 2) / (a * 0.8)) ** 2 + ((y - size) / (b * 0.8)) ** 2 <= 1.0
    label[(blobs > 0) & breast & shrunk] = 3
    for _ in range(rng.randint(2, 5)):
        x0, slope = rng.uniform(size * 0.25, size * 0.75), rng.uniform(-1.5, 1.5)
        line = np.abs(x - (x0 + slope * (y - size))) <= 0.8
        label[line & breast & (label != 3)] = 2
    image = gaussian_filter(_INTENSITY[label], sigma=0.7) + rng.normal(0.0, 0.03, label.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


def _write_nifti(array: np.ndarray, path: Path, spacing: tuple[float, float, float]) -> None:
    import nibabel as nib

    affine = np.diag([*spacing, 1.0])
    atomic_write(path, lambda tmp: nib.save(nib.Nifti1Image(array, affine), tmp), overwrite=False)


def make_phantom_dataset(
    output_dir: str, num_train: int = 8, num_test: int = 2, size: int = 64, depth: int = 16, seed: int = 0
) -> Path:
    """Write phantom volumes as imagesTr/labelsTr/imagesTs/labelsTs NIfTI (1 x 1 x 3 mm voxels); return the root."""
    root = Path(output_dir)
    rng = np.random.RandomState(seed)
    for split, count in (("Tr", num_train), ("Ts", num_test)):
        for i in range(count):
            image, label = make_phantom_volume(size, depth, rng)
            name = f"phantom_{split.lower()}_{i:03d}.nii.gz"
            _write_nifti(image, root / f"images{split}" / name, (1.0, 1.0, 3.0))
            _write_nifti(label, root / f"labels{split}" / name, (1.0, 1.0, 3.0))
    return root
