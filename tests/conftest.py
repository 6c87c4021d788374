"""Shared fixtures: the team's real-data folder, tiny bundle settings, phantom datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MEDDIFF_NO_REEXEC", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when the team kit is absent (fresh clones)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (../shared is absent in a fresh clone)")
    return path


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small NIfTI (MSD layout) phantom dataset: 3 train and 1 test volume of 32x32x8."""
    from meddiff.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(str(tmp_path_factory.mktemp("phantoms")), num_train=3, num_test=1, size=32, depth=8)


def tiny_diffusion_unet(in_channels: int = 4, out_channels: int = 1) -> torch.nn.Module:
    """The tiny DiffusionModelUNet the bundle tests train (channels 8, 16; attention at the second level)."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=(8, 16),
        attention_levels=(False, True),
        num_res_blocks=1,
        norm_num_groups=8,
        num_head_channels=8,
        norm_eps=1e-5,
        use_flash_attention=True,
    ).eval()
