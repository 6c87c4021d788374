"""The breast MRI evaluation compares like with like: one slice set, images as generated, given classes apart.

Stand-ins keep each test to a second or two: the "generator" paints each given class at its own intensity
(-1 + 0.5 * class) and leaves ablated classes as background; the "segmenter" reads a class back from the nearest
of those intensities. A generated image scored as made is then segmented exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_helpers import MRI, inference_parser, parsed, run_inference
from PIL import Image

from meddiff.data import DataError, load_slices
from meddiff.errors import OptionError, UserError
from meddiff.evaluation import evaluate_mask_conditioned_generation
from meddiff.generation import DIVERSITY_SEED_OFFSET, RECORD_NAME
from meddiff.metrics import ms_ssim_config

NUM_CLASSES, SIZE = 4, 16
NET = torch.nn.Linear(1, 1)


class PaintingInferer:
    """Paints class k of the condition at -1 + 0.5 k (ablated channels, all -1, paint nothing), plus seeded noise."""

    def __init__(self, noise: float = 0.0):
        self.noise, self.seeds = noise, []

    def __call__(self, cond: torch.Tensor, network: torch.nn.Module, seed: int = 0) -> torch.Tensor:
        self.seeds.append(seed)
        image = torch.full((cond.shape[0], 1, *cond.shape[2:]), -1.0)
        for k in range(cond.shape[1]):
            image = torch.where(cond[:, k : k + 1] == 1, torch.tensor(-1.0 + 0.5 * (k + 1)), image)
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(int(seed)))
        return (image + self.noise * noise).clamp(-1.0, 1.0)


class ReadingSegmenter(torch.nn.Module):
    """Predicts the class whose painted intensity is nearest; remembers every batch it was given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.numpy().copy())
        centres = torch.tensor([-1.0 + 0.5 * c for c in range(NUM_CLASSES)]).view(1, -1, 1, 1)
        return -(x - centres).abs()


def label_volume() -> np.ndarray:
    """(Z=6, 24, 24) labels: z=0 and z=5 empty, z=1 one labelled pixel, z=2..4 all three classes."""
    label = np.zeros((6, 24, 24), np.uint8)
    label[1, 12, 12] = 1
    for z in (2, 3, 4):
        label[z, 4:20, 4:20] = 1
        label[z, 6:12, 6:12] = 3
        label[z, 14:16, 4:20] = 2
    return label


def nifti_dataset(root: Path) -> Path:
    """A test split of one image+label volume in the NIfTI (MSD) layout."""
    import SimpleITK as sitk

    rng = np.random.RandomState(0)
    for folder, array in (("labelsTs", label_volume()), ("imagesTs", rng.rand(6, 24, 24).astype(np.float32))):
        (root / folder).mkdir(parents=True)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(root / folder / "case0.nii.gz"))
    return root


def png_masks(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, volume_slice in enumerate(label_volume()[2:5]):
        Image.fromarray(volume_slice).save(folder / f"mask{i}.png")
    return folder


def generation_settings(output_dir: Path, **settings) -> dict:
    """The MRI inference config's overrides of these tests."""
    return {"num_classes": NUM_CLASSES, "img_size": SIZE, "batch_size": 4, "output_dir": str(output_dir), **settings}


def generate(output_dir: Path, inferer: PaintingInferer | None = None, **settings) -> dict:
    """Run the MRI bundle's inference config with the painting stand-in; the writer's result."""
    objects = {"inferer": inferer or PaintingInferer(), "network": NET}
    return run_inference(MRI, output_dir.parent / "bundle", objects, **generation_settings(output_dir, **settings))


def record_of(output_dir: Path) -> dict:
    """The generation record's arrays."""
    with np.load(output_dir / RECORD_NAME) as record:
        return {key: record[key] for key in record.files}


def evaluate(generated: Path, segmenter: torch.nn.Module | None = None, **kwargs) -> dict:
    metrics_file = generated.parent / "metrics.json"
    metrics = evaluate_mask_conditioned_generation(
        segmenter or ReadingSegmenter(), NUM_CLASSES, SIZE, str(generated), str(metrics_file), overwrite=True, **kwargs
    )
    assert json.loads(metrics_file.read_text()) == json.loads(json.dumps(metrics))
    return metrics


@pytest.mark.parametrize(("min_foreground_fraction", "scored"), [(0.0, 4), (0.01, 3)])
def test_nifti_evaluation_scores_one_slice_set_on_both_sides(
    tmp_path: Path, min_foreground_fraction: float, scored: int
) -> None:
    data = nifti_dataset(tmp_path / "data")
    generate(tmp_path / "generated", dataset_dir=str(data))
    record = record_of(tmp_path / "generated")
    assert len(record["images"]) == 6  # the written volume is whole, empty slices included
    real = load_slices(
        "msd",
        dataset_dir=str(data),
        split="test",
        num_classes=NUM_CLASSES,
        img_size=SIZE,
        min_foreground_fraction=min_foreground_fraction,
        progress=False,
    )
    segmenter = ReadingSegmenter()
    metrics = evaluate(
        tmp_path / "generated", segmenter, real_slices=real, min_foreground_fraction=min_foreground_fraction
    )
    assert metrics["num_generated"] == metrics["num_real"] == len(real) == scored
    assert metrics["num_generated_excluded"] == 6 - scored and metrics["same_slices_as_real"] is True
    kept = [int(name[-3:]) for name in (s["name"] for s in real)]
    # scored as generated: the sampler's [-1, 1] output at img_size, not the written volume read back and rescaled
    np.testing.assert_array_equal(segmenter.seen[0], record["images"][kept])
    assert metrics["faithfulness_dice"] == 1.0 and "fid" in metrics


def test_faithfulness_reports_ablated_classes_apart(tmp_path: Path) -> None:
    masks = png_masks(tmp_path / "masks")
    generate(tmp_path / "generated", mask_dir=str(masks), ablated_classes=[2])
    metrics = evaluate(tmp_path / "generated")
    assert metrics["given_classes"] == [1, 3] and metrics["ablated_classes"] == [2]
    assert metrics["faithfulness_dice"] == 1.0  # every given class drawn and read back
    assert metrics["faithfulness_dice_ablated_classes"] == 0.0  # vessels were not given, so not drawn


def test_per_mask_diversity_uses_distinct_seeds_and_records_ms_ssim_settings(tmp_path: Path) -> None:
    masks = png_masks(tmp_path / "masks")
    inferer = PaintingInferer(noise=0.3)
    settings = {"mask_dir": str(masks), "diversity_masks": 2, "samples_per_mask": 3, "batch_size": 2, "seed": 5}
    generate(tmp_path / "generated", inferer, **settings)
    record = record_of(tmp_path / "generated")
    assert record["diversity_images"].shape == (2, 3, 1, SIZE, SIZE) and list(record["diversity_index"]) == [0, 2]
    # the batch starting at mask i uses seed + i; sample j of diversity mask k, seed + 2**31 + k * 3 + j
    offset = 5 + DIVERSITY_SEED_OFFSET
    assert inferer.seeds == [5, 7, offset, offset + 2, offset + 3, offset + 5]
    assert not np.array_equal(record["diversity_images"][0, 0], record["diversity_images"][0, 1])
    metrics = evaluate(tmp_path / "generated")
    assert len(metrics["ms_ssim_per_mask_values"]) == 2 and 0.0 < metrics["ms_ssim_per_mask"] < 1.0
    assert metrics["diversity_masks"] == ["mask0", "mask2"] and metrics["samples_per_mask"] == 3
    kernel_size, weights = ms_ssim_config(SIZE)
    settings = metrics["ms_ssim_settings"]
    assert settings["kernel_size"] == kernel_size and settings["weights"] == pytest.approx(list(weights))
    assert settings["scale_sizes"] == [16, 8, 4]


def test_evaluation_without_generation_record_is_refused_naming_it(tmp_path: Path) -> None:
    generated = tmp_path / "generated"
    for folder in ("images", "masks"):
        (generated / folder).mkdir(parents=True)
        Image.fromarray(label_volume()[2]).save(generated / folder / "a.png")
    with pytest.raises(DataError, match=f"{RECORD_NAME} is missing.*rerun generation"):
        evaluate(generated)


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"diversity_masks": -1}, OptionError, "--diversity_masks must be >= 0"),
        ({"samples_per_mask": 1}, OptionError, "--samples_per_mask must be >= 2"),
        ({"ablated_classes": [4]}, UserError, r"--ablated_classes \[4\] are not foreground classes"),
    ],
)
def test_generation_options_refused_before_work(tmp_path: Path, settings: dict, error: type, message: str) -> None:
    masks, out, inferer = png_masks(tmp_path / "masks"), tmp_path / "out", PaintingInferer()
    run = generation_settings(out, mask_dir=str(masks), **settings)
    with pytest.raises(error, match=message):  # the writer refuses it when the config builds it
        parsed(inference_parser(MRI, tmp_path / "bundle", {"inferer": inferer, "network": NET}, **run), "writer")
    with pytest.raises(error, match=message):  # and so does a run, before sampling anything
        generate(out, inferer, mask_dir=str(masks), **settings)
    assert inferer.seeds == [] and not out.exists()
