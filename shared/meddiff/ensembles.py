"""Segmentation ensembles: N masks per image from a CIMD diffusion model, their writers and scores.

- `meddiff.inferers.EnsembleSamplingInferer` (imported here): ``inferer(image, network)`` runs all N members batched
  (one stochastic reverse process each), so MONAI Label's bundle loader can drive it.
- `ensemble_datalist` and `EnsembleWriter`: the inference config's dataset (every case of a split in the seed's
  layout) and the evaluator handler that writes N binary masks, the frequency map and the majority mask as PNG,
  plus a grid.
- `evaluate_ensembles`: GED, CI score and majority Dice per image and averaged, to JSON.
- `DicomNoduleEnsembles`: a DICOM CT series and nodule centres -> NIfTI in the CT's geometry and a DICOM SEG.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.data.inference import as_numpy
from meddiff.data.lidc import (
    crop_plane,
    find_lidc_cases,
    paste_plane,
    read_binary_mask,
    window_to_uint8,
)
from meddiff.data.readers import read_image
from meddiff.data.slices import resize_image, resize_label
from meddiff.errors import OptionError
from meddiff.inferers import EnsembleSamplingInferer
from meddiff.io import StagedOutput, atomic_write, check_new_output, load_trained_weights, save_json, save_png
from meddiff.metrics import ci_score, dice, generalized_energy_distance, majority_mask
from meddiff.options import check, parse
from meddiff.verdicts import size_matches, verdict
from meddiff.visualize import save_grid, to_rgb_tile
from meddiff.writers import StagedWriter

__all__ = [
    "DicomNoduleEnsembles",
    "EnsembleSamplingInferer",
    "EnsembleWriter",
    "ensemble_datalist",
    "ensemble_verdict",
    "evaluate_ensembles",
]

logger = logging.getLogger(__name__)

MANIFEST = "ensembles.json"


def ensemble_datalist(
    dataset_dir: str, split: str = "testing", num_raters: int = 4, seed: int = 0, max_items: int | None = None
) -> list[dict]:
    """The inference dataset's items, one per case of a split in the seed's layout, every file read and checked.

    Each is ``{"image": the CT crop's file, "name": the case, "seed": seed + i}`` (case i is sampled with its
    own seed); the raters' masks stay with `EnsembleWriter`, which draws them in the grid.
    """
    cases = find_lidc_cases(dataset_dir, split, parse("num_raters", num_raters))
    cases = cases[: parse("max_items", max_items)] if max_items else cases
    if not cases:
        raise DataError(f"{dataset_dir} has no {split} cases: check --dataset_dir and --split.")
    for case in cases:  # every file is read and checked before the first ensemble is sampled
        image = read_image(case["image"])
        if image.mode.startswith("I") or image.mode.startswith("F"):
            raise DataError(
                f"image {case['image']} has {image.mode} pixels: inference reads 8-bit crops (0..255, the HU window); "
                "save it as an 8-bit PNG or JPEG."
            )
        for rater in case["label"]:
            read_binary_mask(rater)
    seed = parse("seed", seed)
    return [{"image": str(c["image"]), "name": c["name"], "seed": seed + i} for i, c in enumerate(cases)]


class EnsembleWriter(StagedWriter):
    """Write every case's ensemble as the evaluator produces it (an evaluator handler).

    Writes ``<output_dir>/<case>/sample_XX.png`` (0/255), ``frequency.png`` (round(255 * fraction of members)),
    ``majority.png`` (strictly more than half of the members), all on the case's own image grid (the
    postprocessing's ``Invertd`` brings the members back); ``<output_dir>/ensembles.json`` (settings and cases) and
    `grid_file` (image, references, members, frequency). The files appear all together when every case is done
    (`meddiff.writers.StagedWriter`).

    Args:
        datalist: the evaluator's items (`ensemble_datalist`).
        dataset_dir: cases in the seed's layout (for the raters' masks in the grid).
        output_dir: where the ensembles go.
        inferer: the `EnsembleSamplingInferer` (its settings go into the manifest).
        split: the split of `dataset_dir` segmented.
        img_size: the network's square input size.
        num_raters: reference masks per case.
        grid_file: the preview grid (default ``<output_dir>/grid.png``).
        grid_size: rows of the preview grid.
        seed: the run's seed (case i used ``seed + i``).
        overwrite: replace existing outputs.
        provenance: the record (`meddiff.provenance.make_provenance`) every written mask carries, with the case's
            seed (None: no record).
    """

    def __init__(
        self,
        datalist: Sequence[dict],
        dataset_dir: str,
        output_dir: str,
        inferer: EnsembleSamplingInferer,
        split: str = "testing",
        img_size: int = 128,
        num_raters: int = 4,
        grid_file: str | None = None,
        grid_size: int = 8,
        seed: int = 0,
        overwrite: bool = False,
        provenance: dict | None = None,
    ) -> None:
        self.provenance = provenance
        self.output_dir, self.dataset_dir, self.inferer, self.split = Path(output_dir), dataset_dir, inferer, split
        self.img_size, self.num_raters = parse("img_size", img_size), parse("num_raters", num_raters)
        self.grid_file = Path(grid_file) if grid_file else self.output_dir / "grid.png"
        self.grid_size, self.seed = grid_size, parse("seed", seed)
        self.names = [item["name"] for item in datalist]
        self.raters: dict[str, list] = {}
        super().__init__(self.output_dir, parse("overwrite", overwrite), self.output_dir / MANIFEST)
        self.rows: list[list[np.ndarray]] = []

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self.rows = []

    def targets(self) -> tuple[list[Path], list[str]]:  # noqa: D102
        self.raters = {c["name"]: c["label"] for c in find_lidc_cases(self.dataset_dir, self.split, self.num_raters)}
        files = [f"sample_{k:02d}.png" for k in range(self.inferer.num_samples)] + ["frequency.png", "majority.png"]
        return [self.output_dir / name / f for name in self.names for f in files] + [self.grid_file], [self.dataset_dir]

    def write(self, engine: Any, item: dict, output: dict) -> None:  # noqa: D102
        members = as_numpy(output["members"]).astype(bool)  # (N, X, Y): MONAI's axis order
        members = np.swapaxes(members, -1, -2)  # (N, H, W), row-major like the crop's file
        folder = self.output_dir / item["name"]
        record = None if self.provenance is None else dict(self.provenance, seed=int(item["seed"]))
        arrays = {f"sample_{k:02d}.png": member.astype(np.uint8) * 255 for k, member in enumerate(members)}
        arrays["frequency.png"] = np.round(members.mean(axis=0) * 255).astype(np.uint8)
        arrays["majority.png"] = as_numpy(output["majority"])[0].T * 255  # (X, Y) -> (H, W)
        for name, array in arrays.items():
            save_png(array, self.path(folder / name), provenance=record)
        if len(self.rows) < self.grid_size:
            image = as_numpy(output["image"])  # the network's input, (1, S, S) row-major in [-1, 1]
            refs = np.stack([read_binary_mask(p) for p in self.raters[item["name"]]])
            refs = resize_label(refs.astype(np.int64), self.img_size)
            small = resize_label(members.astype(np.int64), self.img_size)
            row = [to_rgb_tile(image)] + [to_rgb_tile(m, (0.0, 1.0)) for m in (*refs, *small, small.mean(axis=0))]
            self.rows.append(row)

    def finish(self, engine: Any) -> dict:  # noqa: D102
        n = self.inferer.num_samples
        if self.rows:
            labels = ["image", *(f"rater {r + 1}" for r in range(self.num_raters))]
            labels += [*(f"member {k + 1}" for k in range(n)), "frequency"]
            save_grid(self.rows, self.path(self.grid_file), column_labels=labels, provenance=self.provenance)
        manifest = {
            "cases": self.names,
            "dataset_dir": str(self.dataset_dir),
            "split": self.split,
            "num_samples": n,
            "sampler": self.inferer.sampler,
            "num_inference_steps": self.inferer.num_inference_steps,
            "seed": self.seed,
            "img_size": self.img_size,
        }
        save_json(manifest, self.path(self.manifest))
        return manifest


def evaluate_ensembles(
    ensemble_dir: str,
    dataset_dir: str,
    metrics_file: str,
    split: str = "testing",
    num_raters: int = 4,
    overwrite: bool = True,
    d_a_distance: str = "dice",
) -> dict:
    """Score written ensembles against the raters' masks: GED, CI score (and parts), majority Dice; write JSON.

    Per image: ``ged`` is D²_GED (Kohl et al. 2018, d = 1 - IoU) between the N members and the R references;
    ``s_c``, ``d_max``, ``d_a``, ``ci``, ``ci_cimd`` from `meddiff.metrics.ci_score`; ``dice_majority`` is the
    Dice of the members' majority against the references' majority (strictly more than half, so 3 of 4 raters).
    ``mean`` averages each over the images.
    """
    root, num_raters, overwrite = Path(ensemble_dir), parse("num_raters", num_raters), parse("overwrite", overwrite)
    d_a_distance = parse("d_a_distance", d_a_distance)
    check_new_output(metrics_file, overwrite)
    if not (root / MANIFEST).is_file():
        raise DataError(f"{root / MANIFEST} does not exist: run inference into {root} before evaluating it.")
    manifest = json.loads((root / MANIFEST).read_text())
    cases = {c["name"]: c for c in find_lidc_cases(dataset_dir, split, num_raters)}
    missing = [name for name in manifest["cases"] if name not in cases]
    if missing:
        raise DataError(f"{root} holds ensembles for cases {missing[:5]} that {dataset_dir} ({split}) does not have.")
    per_image = {}
    for case in (cases[name] for name in manifest["cases"]):
        refs = np.stack([read_binary_mask(p) for p in case["label"]])
        members = np.stack(
            [read_binary_mask(root / case["name"] / f"sample_{k:02d}.png") for k in range(manifest["num_samples"])]
        )
        scores = {"ged": generalized_energy_distance(members, refs), **ci_score(members, refs, d_a_distance)}
        scores["dice_majority"] = dice(majority_mask(members), majority_mask(refs))
        scores["member_foreground"], scores["rater_foreground"] = float(members.mean()), float(refs.mean())
        scores["ged_empty_members"] = generalized_energy_distance(np.zeros_like(members), refs)
        per_image[case["name"]] = scores
    keys = next(iter(per_image.values())).keys()
    metrics = {
        "num_images": len(per_image),
        "num_samples": manifest["num_samples"],
        "d_a_distance": d_a_distance,
        "sampler": manifest["sampler"],
        "num_inference_steps": manifest["num_inference_steps"],
        "mean": {k: float(np.mean([s[k] for s in per_image.values()])) for k in keys},
        "per_image": per_image,
    }
    metrics["verdict"] = ensemble_verdict(metrics["mean"])
    (logger.warning if metrics["verdict"].startswith("undertrained") else logger.info)(metrics["verdict"])
    save_json(metrics, metrics_file, overwrite=overwrite)
    return metrics


def ensemble_verdict(mean: dict) -> str:
    """A plain sentence on whether the ensembles look like the raters' masks, from averaged metrics.

    Undertrained when the members mark more than 3x or less than 1/3 of the pixels the raters mark, or when the
    GED is no better than that of all-empty members (a model that predicts nothing).
    """
    member, rater = 100 * mean["member_foreground"], 100 * mean["rater_foreground"]
    problems = []
    if not size_matches(mean["member_foreground"], mean["rater_foreground"]):
        problems.append(f"its members mark {member:.2f}% of the pixels where the raters mark {rater:.2f}%")
    ged, empty = mean["ged"], mean["ged_empty_members"]
    if ged >= empty:
        problems.append(f"its GED {ged:.3f} is no better than all-empty members' {empty:.3f}")
    return verdict(
        problems,
        f"members look like the raters' masks in size (member foreground {member:.2f}%, raters {rater:.2f}%) and "
        f"beat all-empty members on GED ({ged:.3f} < {empty:.3f}).",
    )


class DicomNoduleEnsembles:
    """Segment nodules of a DICOM CT series as ensembles, given their centres; write NIfTI and DICOM SEG.

    `centres` are (x, y, z): in ``centre_space="voxel"`` SimpleITK indices (column, row, slice in ascending
    position along the slice normal, the order `meddiff.dicom.read_series` gives), in ``"patient"`` millimetres in
    DICOM patient coordinates (LPS). Around each centre a `crop_size` square on its axial slice is resampled to
    `crop_spacing_mm` (None keeps the pixel spacing), windowed from `hu_window` to 0..255 like the training crops
    and resized to `img_size`. Per nodule ``<output_dir>/nodule_XX/`` gets ``majority.nii.gz`` (uint8) and
    ``frequency.nii.gz`` (float32) on the CT's grid, ``samples.nii.gz`` (4D: the N members on the nodule's slice)
    and ``seg.dcm``, a DICOM SEG referencing the series with one segment for the majority and one per threshold
    in `frequency_thresholds` (frequency >= t); ``<output_dir>/nodules.json`` lists the nodules. The files appear
    all together when every nodule is done (`meddiff.io.StagedOutput`, the manifest last), so with `overwrite` a
    nodule's NIfTIs and SEG are replaced together and a failed run changes nothing.

    Args:
        network: the trained `meddiff.networks.CIMDNetwork`.
        inferer: the `EnsembleSamplingInferer` that samples each nodule.
        dicom_dir: the folder holding the CT series' files.
        centres: the nodules' centres, [[x, y, z], ...].
        output_dir: where the nodule folders go.
        centre_space: "voxel" or "patient".
        img_size: the network's square input size.
        crop_size: side of the square cut around each centre, in resampled pixels.
        crop_spacing_mm: pixel spacing of the crop (None keeps the series' spacing).
        hu_window: [lowest, highest] HU mapped to 0..255.
        frequency_thresholds: increasing member fractions in (0, 1), one SEG segment each.
        seed: nodule j is sampled with ``seed + j``.
        overwrite: replace existing outputs.
        weights_file: trained weights loaded into `network` when the run starts (None: use `network` as it is).
        settings: the settings checked against those stored with `weights_file`.
        provenance: the record (`meddiff.provenance.make_provenance`) the NIfTI outputs carry, with the nodule's
            seed (None: no record).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: EnsembleSamplingInferer,
        dicom_dir: str,
        centres: Sequence[Sequence[float]],
        output_dir: str,
        centre_space: str = "voxel",
        img_size: int = 128,
        crop_size: int = 128,
        crop_spacing_mm: float | None = 0.5,
        hu_window: Sequence[float] = (-1024.0, 2000.0),
        frequency_thresholds: Sequence[float] = (0.25, 0.75),
        seed: int = 0,
        overwrite: bool = False,
        weights_file: str | None = None,
        settings: dict | None = None,
        provenance: dict | None = None,
    ) -> None:
        self.weights_file, self.settings, self.provenance = weights_file, settings, provenance
        check(centre_space in ("voxel", "patient"), f"--centre_space must be voxel or patient, got {centre_space!r}.")
        self.network, self.inferer, self.dicom_dir, self.output_dir = network, inferer, dicom_dir, Path(output_dir)
        self.centres, self.centre_space = [tuple(float(v) for v in c) for c in centres], centre_space
        self.img_size, self.crop_size = parse("img_size", img_size), parse("crop_size", crop_size)
        self.crop_spacing_mm = None if crop_spacing_mm is None else parse("crop_spacing_mm", crop_spacing_mm)
        self.hu_window = tuple(parse("hu_window", hu_window))
        self.frequency_thresholds = tuple(parse("frequency_thresholds", frequency_thresholds))
        self.seed, self.overwrite = parse("seed", seed), parse("overwrite", overwrite)

    def _index(self, image: Any, centre: tuple[float, ...]) -> tuple[float, float, int]:
        """(row, col, slice) of a centre, checked to lie inside the volume."""
        if len(centre) != 3:
            raise OptionError(f"nodule centre {list(centre)} must have 3 coordinates (x, y, z).")
        x, y, z = image.TransformPhysicalPointToContinuousIndex(centre) if self.centre_space == "patient" else centre
        size = image.GetSize()
        if not all(-0.5 <= v < s - 0.5 for v, s in zip((x, y, z), size)):
            raise OptionError(
                f"nodule centre {list(centre)} ({self.centre_space}) is outside the series in {self.dicom_dir} "
                f"(index {[round(v, 1) for v in (x, y, z)]}, size {list(size)}); check centre_space."
            )
        return y, x, int(round(z))

    def run(self) -> list[dict]:
        """Segment every nodule and write its files; return one record per nodule."""
        from meddiff.dicom import read_series

        if not self.centres:
            raise OptionError("no nodule centres given: pass --nodule_centres as [[x, y, z], ...].")
        names = ("majority.nii.gz", "frequency.nii.gz", "samples.nii.gz", "seg.dcm")
        targets = [self.output_dir / f"nodule_{j:02d}" / name for j in range(len(self.centres)) for name in names]
        manifest = self.output_dir / "nodules.json"
        staged = StagedOutput(self.output_dir, targets, [self.dicom_dir], self.overwrite, manifest)
        image = read_series(self.dicom_dir)
        indices = [self._index(image, c) for c in self.centres]
        if self.weights_file is not None:
            load_trained_weights(self.network, self.weights_file, self.settings)
        with staged as stage:
            records = self._segment(image, indices, stage)
            save_json(records, stage.path(manifest))
        return records

    def _segment(self, image: Any, indices: list[tuple[float, float, int]], stage: StagedOutput) -> list[dict]:
        import SimpleITK as sitk

        from meddiff import __version__
        from meddiff.dicom import NODULE_CODES, write_like, write_seg
        from meddiff.provenance import embed_nifti_provenance

        hu = sitk.GetArrayViewFromImage(image)
        spacing_x, spacing_y = image.GetSpacing()[:2]
        target = self.crop_spacing_mm
        step = (target / spacing_y, target / spacing_x) if target else (1.0, 1.0)
        device = next(self.network.parameters()).device
        records = []
        for j, (row, col, k) in enumerate(tqdm(indices, desc="nodules")):
            crop = crop_plane(hu[k], (row, col), self.crop_size, step, order=1, cval=float(self.hu_window[0]))
            crop = window_to_uint8(crop, self.hu_window).astype(np.float32)[None] / 127.5 - 1.0
            tensor = torch.from_numpy(resize_image(crop, self.img_size))[None].to(device)
            samples = self.inferer(tensor, self.network, seed=self.seed + j, output="samples")[0].cpu().numpy()
            plane = paste_plane(samples.astype(np.uint8), hu.shape[1:], (row, col), self.crop_size, step)
            frequency = np.zeros(hu.shape, np.float32)
            frequency[k] = plane.mean(axis=0)
            majority = np.zeros(hu.shape, np.uint8)
            majority[k] = majority_mask(plane.astype(bool))
            folder = self.output_dir / f"nodule_{j:02d}"
            record = None if self.provenance is None else dict(self.provenance, seed=self.seed + j)
            write_like(majority, image, stage.path(folder / "majority.nii.gz"), provenance=record)
            write_like(frequency, image, stage.path(folder / "frequency.nii.gz"), provenance=record)
            members = [sitk.GetImageFromArray(m[None]) for m in plane]
            for m in members:
                m.CopyInformation(image[:, :, k : k + 1])

            def write_members(tmp: str, series: Any = sitk.JoinSeries(members), record: dict | None = record) -> None:
                sitk.WriteImage(series, tmp, True)
                if record is not None:
                    embed_nifti_provenance(tmp, record)

            atomic_write(stage.path(folder / "samples.nii.gz"), write_members)
            segments = {
                "majority": majority,
                **{f"frequency >= {t:g}": frequency >= t for t in self.frequency_thresholds},
            }
            write_seg(
                segments,
                self.dicom_dir,
                stage.path(folder / "seg.dcm"),
                algorithm_name="CIMD ensemble",
                algorithm_version=__version__,
                series_description=f"CIMD nodule {j} ({self.inferer.num_samples} samples)",
                segment_codes=NODULE_CODES,
                provenance=record,
            )
            records.append(
                {"nodule": j, "centre": list(self.centres[j]), "index": [col, row, k], "folder": str(folder)}
            )
        return records
