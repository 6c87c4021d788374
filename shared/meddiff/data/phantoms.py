"""Built-in demo data: multi-class phantom volumes written in the NIfTI (MSD) layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from monai.data.synthetic import create_test_image_3d

from meddiff.io import atomic_write

__all__ = ["make_phantom_dataset"]


def _write_nifti(array: np.ndarray, path: Path, spacing: tuple[float, float, float]) -> None:
    import nibabel as nib

    affine = np.diag([*spacing, 1.0])
    atomic_write(path, lambda tmp: nib.save(nib.Nifti1Image(array, affine), tmp), overwrite=False)


def make_phantom_dataset(
    output_dir: str,
    num_train: int = 6,
    num_test: int = 2,
    size: int = 64,
    depth: int = 16,
    num_classes: int = 4,
    seed: int = 0,
) -> Path:
    """Write `num_train`/`num_test` phantom volumes with labels 0..num_classes-1 as imagesTr/labelsTr/imagesTs/labelsTs.

    Each volume holds random ellipsoid-like blobs from MONAI's `create_test_image_3d`; intensity rises with the class
    index, with Gaussian noise, so that both the image and its multi-class mask carry structure. Volumes are
    (size, size, depth) with axial slices along the last axis, 1 x 1 x 3 mm.
    """
    root = Path(output_dir)
    rng = np.random.RandomState(seed)
    for split, count in (("Tr", num_train), ("Ts", num_test)):
        for i in range(count):
            image, label = create_test_image_3d(
                size,
                size,
                depth,
                num_objs=8,
                rad_max=max(3, min(size // 6, (depth - 1) // 2)),
                rad_min=2,
                noise_max=0.2,
                num_seg_classes=num_classes - 1,
                random_state=rng,
            )
            name = f"phantom_{split.lower()}_{i:03d}.nii.gz"
            _write_nifti(image.astype(np.float32), root / f"images{split}" / name, (1.0, 1.0, 3.0))
            _write_nifti(label.astype(np.uint8), root / f"labels{split}" / name, (1.0, 1.0, 3.0))
    return root
