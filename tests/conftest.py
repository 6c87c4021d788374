"""Shared fixtures: the team's real-data folder, tiny bundle settings, phantom datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
