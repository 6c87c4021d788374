"""`python -m meddiff demo` wiring, on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_breast_mri_bundle import TINY

from meddiff.cli import main
from meddiff.demo import run_demo


def test_demo_writes_pairs_grid_and_metrics(tmp_path: Path) -> None:
    metrics = run_demo("breast_mri_seg_guided_generation", tmp_path, **{**TINY, "num_inference_steps": 2})
    out = tmp_path / "breast_mri_seg_guided_generation"
    assert (out / "grid.png").is_file() and (out / "metrics.json").is_file()
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == sorted(p.name for p in (out / "labelsTs").iterdir())
    assert 0.0 <= metrics["faithfulness_dice"] <= 1.0 and metrics["fid"] >= 0.0
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_demo("breast_mri_seg_guided_generation", tmp_path, **TINY)


def test_cli_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "breast_mri_seg_guided_generation").mkdir()
    (tmp_path / "breast_mri_seg_guided_generation" / "old.txt").write_text("keep me")
    code = main(["demo", "--bundle", "breast_mri_seg_guided_generation", "--output_dir", str(tmp_path)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "breast_mri_seg_guided_generation" / "old.txt").read_text() == "keep me"
