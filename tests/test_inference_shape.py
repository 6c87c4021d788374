"""Inference as MONAI runs it: outputs lie on the input (no transposition), settings travel with the weights, seeds.

The bundles' real ``inference.json`` runs in-process with stand-in inferers whose answer is known from the input,
on deliberately asymmetric, non-square inputs, so a transposed, flipped or shifted output cannot pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import LIDC, MRI, inference_parser, parsed, run_inference
from monai.networks.nets import DiffusionModelUNet
from PIL import Image

from meddiff.data.errors import DataError
from meddiff.data.inference import EnsembleSummaryd, FileKindd, GreyscaleChanneld
from meddiff.inferers import ConditionedSamplingInferer
from meddiff.io import save_trained_weights
from meddiff.provenance import make_provenance, read_provenance

NET = torch.nn.Linear(1, 1)


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


class ThresholdMembers:
    """LIDC stand-in: every member marks the pixels brighter than mid-grey, so the ensemble is the input's blob."""

    num_samples, sampler, num_inference_steps = 3, "stand-in", 1

    def __call__(self, image: torch.Tensor, network: torch.nn.Module, seed: int = 0) -> torch.Tensor:
        return (image > 0).float().repeat(1, self.num_samples, 1, 1)


class PaintClassOne:
    """MRI stand-in: the generated image is +1 where the condition holds class 1, -1 elsewhere (2D or slice stacks)."""

    def __call__(self, cond: torch.Tensor, network: torch.nn.Module, seed: int = 0) -> torch.Tensor:
        return torch.where(cond[:, :1] == 1, 1.0, -1.0)


def lidc_case(root: Path) -> tuple[Path, np.ndarray]:
    """One testing case: a 40x60 crop (H x W) with a bright blob in its upper right, and 4 raters' masks."""
    blob = np.zeros((40, 60), bool)
    blob[4:16, 36:54] = True
    folder = root / "testing" / "0"
    folder.mkdir(parents=True)
    Image.fromarray((blob * 255).astype(np.uint8)).save(folder / "image_0.png")
    for r in range(4):
        Image.fromarray((blob * 255).astype(np.uint8)).save(folder / f"label{r}_.png")
    return root, blob


def test_lidc_members_lie_on_the_input_crop(tmp_path: Path) -> None:
    data, blob = lidc_case(tmp_path / "data")
    out = tmp_path / "out"
    manifest = run_inference(
        LIDC, tmp_path, {"inferer": ThresholdMembers(), "network": NET}, output_dir=str(out), dataset_dir=str(data),
        img_size=20, num_raters=4,
    )  # fmt: skip
    assert manifest["cases"] == ["0"]
    for name in ("sample_00.png", "sample_02.png", "majority.png", "frequency.png"):
        written = np.asarray(Image.open(out / "0" / name)) > 127
        assert written.shape == blob.shape
        iou = (written & blob).sum() / (written | blob).sum()
        assert iou > 0.8, (name, iou)
        assert np.abs(centroid(written) - centroid(blob)).max() < 1.5
    assert (out / "grid.png").is_file()


def test_lidc_prediction_for_monai_label_is_the_frequency_map_on_the_input_grid(tmp_path: Path) -> None:
    data, blob = lidc_case(tmp_path / "data")
    parser = inference_parser(LIDC, tmp_path, {"inferer": ThresholdMembers(), "network": NET}, img_size=20)
    item = parsed(parser, "preprocessing")({"image": str(data / "testing" / "0" / "image_0.png")})
    pred = ThresholdMembers()(item["image"][None], NET)[0]
    out = parsed(parser, "postprocessing")({"image": item["image"], "pred": pred})
    frequency = np.asarray(out["pred"])
    # MONAI's axis order (X, Y) = the file's (W, H) transposed, which MONAI Label's writer transposes back
    assert frequency.shape == (60, 40) and frequency.dtype == np.uint8 and set(np.unique(frequency)) <= {0, 255}
    assert ((frequency.T > 127) == blob).mean() > 0.97


def test_mri_png_generation_lies_on_the_mask_and_carries_provenance(tmp_path: Path) -> None:
    mask = np.zeros((40, 60), np.uint8)
    mask[24:36, 6:20] = 1  # lower left
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "m.png")
    out = tmp_path / "out"
    record = make_provenance("stand-in", "0.0", settings={"img_size": 20}, seed=0)
    parser = inference_parser(
        MRI, tmp_path, {"inferer": PaintClassOne(), "network": NET, "provenance": record}, output_dir=str(out),
        mask_dir=str(tmp_path / "masks"), num_classes=2, img_size=20, diversity_masks=0, seed=3,
    )  # fmt: skip
    parsed(parser, "initialize")
    parsed(parser, "evaluator").run()
    image = np.asarray(Image.open(out / "images" / "m.png"))
    assert image.shape == mask.shape
    bright = image > 127
    assert (bright == mask.astype(bool)).mean() > 0.97
    assert np.abs(centroid(bright) - centroid(mask)).max() < 1.0
    assert read_provenance(out / "images" / "m.png") == {**record, "seed": 3}
    assert read_provenance(out / "masks" / "m.png") is None  # the user's mask, copied, is not synthetic


def test_mri_volume_generation_keeps_the_label_geometry(tmp_path: Path) -> None:
    label = np.zeros((30, 20, 5), np.uint8)  # (X, Y, Z) as NIfTI stores it
    label[2:10, 12:18, 1:4] = 1
    affine = np.array([[0.7, 0, 0, -3], [0, 0.8, 0, 5], [0, 0, 2.5, 11], [0, 0, 0, 1]])
    (tmp_path / "data" / "labelsTs").mkdir(parents=True)
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "data" / "labelsTs" / "c.nii.gz")
    out = tmp_path / "out"
    run_inference(
        MRI, tmp_path, {"inferer": PaintClassOne(), "network": NET}, output_dir=str(out),
        dataset_dir=str(tmp_path / "data"), num_classes=2, img_size=16, diversity_masks=0,
    )  # fmt: skip
    written = nib.load(out / "imagesTs" / "c.nii.gz")
    volume = np.asarray(written.dataobj)
    assert volume.shape == label.shape and np.allclose(written.affine, affine, atol=1e-4)
    assert volume.min() >= 0.0 and volume.max() <= 1.0
    assert ((volume > 0.5) == label.astype(bool)).mean() > 0.97


def test_inference_builds_the_trained_network_from_the_settings_beside_the_weights(tmp_path: Path) -> None:
    """A server reading only inference.json (MONAI Label) must build the network the weights were trained as."""
    small = {"img_size": 16, "network_channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1,
             "num_head_channels": 8, "norm_num_groups": 8}  # fmt: skip
    for bundle, extra in ((MRI, {"num_classes": 3, "num_img_channels": 1}), (LIDC, {})):
        root = tmp_path / bundle
        trained = inference_parser(bundle, root, **small, **extra)
        network = parsed(trained, "network_def")
        save_trained_weights(network.state_dict(), root / "models" / "model.pt", parsed(trained, "model_settings"))
        served = inference_parser(bundle, root)  # nothing given but the bundle root, as MONAI Label does
        rebuilt = parsed(served, "network_def")
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in network.state_dict().items()
        }
        assert parsed(served, "img_size") == 16


def test_volume_slices_are_sampled_in_seeded_batches() -> None:
    """A (B, C, Z, H, W) stack equals sampling its slices in batches of `slice_batch_size` seeded seed + z."""
    torch.manual_seed(0)
    unet = DiffusionModelUNet(
        spatial_dims=2, in_channels=2, out_channels=1, channels=[8, 8], attention_levels=[False, False],
        num_res_blocks=1, num_head_channels=8, norm_num_groups=4,
    )  # fmt: skip
    inferer = ConditionedSamplingInferer(sampler="ddim", num_inference_steps=2, seed=7, slice_batch_size=2)
    cond = torch.rand(1, 1, 5, 8, 8)
    stacked = inferer(cond, unet)
    assert stacked.shape == (1, 1, 5, 8, 8)
    for z in (0, 2, 4):
        expected = inferer(cond[0, :, z : z + 2].permute(1, 0, 2, 3), unet, seed=7 + z)
        torch.testing.assert_close(stacked[0, :, z : z + 2].permute(1, 0, 2, 3), expected)


def test_postprocessing_transforms_by_hand() -> None:
    members = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 1.0]], [[1.0, 0.0]]])  # N=4, 1x2 pixels
    out = EnsembleSummaryd("pred")({"pred": members})
    assert out["pred"].tolist() == [[[0.75, 0.5]]]
    assert out["majority"].tolist() == [[[1, 0]]]  # 2 of 4 is not strictly more than half
    png = {"image": torch.zeros(1, 2), "pred": torch.tensor([[-1.0, 0.0, 1.0, 2.0]])}
    png["image"] = __import__("monai").data.MetaTensor(png["image"], meta={"filename_or_obj": "/a/b.PNG"})
    cast = FileKindd("pred", value_range=(-1.0, 1.0))(png)["pred"]
    assert cast.dtype == torch.uint8 and cast.tolist() == [[0, 128, 255, 255]]
    png["image"].meta["filename_or_obj"] = "/a/b.nii.gz"
    cast = FileKindd("pred", value_range=(-1.0, 1.0))(png)["pred"]
    assert cast.dtype == torch.float32 and cast.tolist() == [[0.0, 0.5, 1.0, 1.0]]
    rgb = torch.tensor([[[3.0]], [[3.0]], [[3.0]]])
    assert GreyscaleChanneld("x")({"x": rgb})["x"].tolist() == [[[3.0]]]
    colour = torch.tensor([[[100.0]], [[0.0]], [[0.0]]])
    assert GreyscaleChanneld("x")({"x": colour})["x"].tolist() == [[[pytest.approx(29.9)]]]


def test_metadata_label_names_read_right_in_a_viewer() -> None:
    """MONAI Label takes the first output's channel_def as label names and skips "background"."""
    for bundle in (MRI, LIDC):
        meta = json.loads((Path(__file__).parents[1] / "bundles" / bundle / "configs" / "metadata.json").read_text())
        outputs = meta["network_data_format"]["outputs"]
        names = next(iter(outputs.values())).get("channel_def", {})
        assert names.get("0") in (None, "background"), names
        assert "image" not in names.values(), names


def test_a_broken_crop_is_refused_before_sampling(tmp_path: Path) -> None:
    data, _ = lidc_case(tmp_path / "data")
    (data / "testing" / "0" / "image_0.png").write_bytes(b"not an image")
    inferer = ThresholdMembers()
    with pytest.raises(DataError, match=r"image_0.png is not a readable PNG"):
        run_inference(LIDC, tmp_path, {"inferer": inferer, "network": NET}, dataset_dir=str(data), img_size=20)
    assert not (tmp_path / "eval").exists()


def test_mri_dicom_layout_writes_a_synthetic_series_per_case(tmp_path: Path, phantom_dir: Path) -> None:
    import pydicom
    import SimpleITK as sitk
    from dicom_helpers import dciodvfy_errors
    from test_breast_mri_bundle import write_dicom_layout

    from meddiff.dicom import read_series

    data = write_dicom_layout(phantom_dir, tmp_path / "dicom")
    out = tmp_path / "out"
    record = make_provenance("stand-in", "0.0", settings={"img_size": 16}, seed=0)
    run_inference(
        MRI, tmp_path, {"inferer": PaintClassOne(), "network": NET, "provenance": record}, output_dir=str(out),
        dataset_dir=str(data), split="train", num_classes=4, img_size=32, diversity_masks=0,
    )  # fmt: skip
    cases = sorted(p.name for p in data.iterdir())
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{c}.nrrd" for c in cases]
    for case in cases:
        files = sorted((out / "dicom" / case).iterdir())
        source = sorted((data / case / "image").iterdir())
        assert len(files) == len(source)
        ds = pydicom.dcmread(files[0])
        assert ds.SyntheticData == "YES" and ds.Modality == "MR" and "DERIVED" in ds.ImageType
        assert ds.StudyInstanceUID == pydicom.dcmread(source[0]).StudyInstanceUID
        assert read_provenance(files[0]) == {**record, "seed": 0}
        generated = sitk.GetArrayFromImage(read_series(out / "dicom" / case))  # (Z, Y, X) by slice position
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(data / case / "label.nrrd")))
        assert generated.shape == label.shape
        assert np.array_equal(generated > generated.max() / 2, label == 1)  # same size: exact, slice order too
    assert dciodvfy_errors(files[0]) == []
