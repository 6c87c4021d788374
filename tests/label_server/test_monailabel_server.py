"""Every meddiff bundle served by a real MONAI Label 0.8.5 server (label_server/serve.py), checked from outside.

Each bundle is trained for one tiny epoch (sizes that are not inference.json's defaults, so the server must take the
architecture from models/model.json), both are served together, and the answers of ``/info/`` and
``POST /infer/<bundle>?image=<id>&output=image`` are compared with the bundle's own inferer run here on the same
input with the same seed. What the results must be (the contract the bundles' inference.json implements):

- PNG in, 8-bit PNG out, with the input's height and width (no transposition), the metadata's
  ``outputs.pred.value_range`` mapped linearly onto 0..255: LIDC, a CT crop -> the nodule frequency map; MRI, a
  class mask -> the generated slice;
- 2D NIfTI in (MRI mask), a 2D NIfTI of the input's shape out;
- label names that are neither value 0 (MONAI Label's background) nor "image".

Needs MONAI Label's environment (``bash label_server/setup_env.sh``), else skipped. Selected alone with
``python -m pytest -m label_server``; takes about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.label_server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
REAL_LIDC = REPO.parent / "shared" / "data" / "lidc_crops" / "data"
QUIET_LOGGING = REPO / "shared" / "meddiff" / "quiet_logging.conf"
LIDC, MRI = "lidc_ambiguous_segmentation", "breast_mri_seg_guided_generation"
IMG_SIZE = 32
TRAIN = {  # on top of configs/demo.json: tiny networks, none of them inference.json's defaults
    LIDC: {"img_size": IMG_SIZE, "network_channels": [8, 16], "num_head_channels": 16, "encoder_channels": [4, 8]},
    MRI: {
        "img_size": IMG_SIZE,
        "network_channels": [8, 16, 16],
        "num_head_channels": 8,
        "norm_num_groups": 8,
        "segmenter_epochs": 1,
    },
}
SERVED = {LIDC: {"num_samples": 4, "num_inference_steps": 5}, MRI: {"num_inference_steps": 5}}  # quick sampling
FREQUENCY = {"output": "frequency"}  # what MONAI Label shows of an ensemble: its per-pixel frequency
DEMO_DATA = {
    LIDC: {"num_train": 8, "num_test": 2, "size": 64},
    MRI: {"num_train": 3, "num_test": 1, "size": 32, "depth": 8},
}


def load_serve():
    """label_server/serve.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("meddiff_label_serve", REPO / "label_server" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


serve = load_serve()


def train(bundle: str, root: Path, dataset_dir: Path) -> Path:
    """Train a copy of the bundle for one epoch into `root` with `python -m monai.bundle run training`."""
    shutil.copytree(REPO / "bundles" / bundle, root, ignore=shutil.ignore_patterns("models", "eval"))
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
               "['configs/train.json','configs/demo.json']", "--meta_file", "configs/metadata.json",
               "--logging_file", str(QUIET_LOGGING), "--bundle_root", str(root), "--dataset_dir", str(dataset_dir),
               "--num_epochs", "1"]  # fmt: skip
    for name, value in TRAIN[bundle].items():
        command += [f"--{name}", json.dumps(value, separators=(",", ":"))]
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"training {bundle} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return root


def demo_data(bundle: str, folder: Path) -> Path:
    """The bundle's built-in demo data (the maker named in its configs/demo.json)."""
    module, name = json.loads((REPO / "bundles" / bundle / "configs" / "demo.json").read_text())["demo_data"].rsplit(
        ".", 1
    )
    return Path(getattr(importlib.import_module(module), name)(str(folder), **DEMO_DATA[bundle]))


def make_studies(folder: Path, lidc_data: Path, mri_data: Path) -> None:
    """ct.png / mask.png at the model's size (compared exactly), ct_rect.png / mask_rect.nii.gz not square."""
    from meddiff.data.lidc import find_lidc_cases

    folder.mkdir()
    ct = np.asarray(Image.open(find_lidc_cases(lidc_data, "testing")[0]["image"]).convert("L"))
    Image.fromarray(ct).resize((IMG_SIZE, IMG_SIZE), Image.BILINEAR).save(folder / "ct.png")
    Image.fromarray(ct[:, ct.shape[1] // 8 : -(ct.shape[1] // 8)]).save(folder / "ct_rect.png")
    labels = np.asarray(nib.load(sorted((mri_data / "labelsTs").glob("*.nii.gz"))[0]).dataobj).astype(np.uint8)
    z = int(
        np.argmax(
            [len(np.unique(labels[..., k])) * 1e6 + np.count_nonzero(labels[..., k]) for k in range(labels.shape[2])]
        )
    )
    mask = labels[..., z]
    assert mask.shape == (IMG_SIZE, IMG_SIZE) and mask.max() > 1
    Image.fromarray(mask).save(folder / "mask.png")
    affine = np.diag([0.7, 0.8, 1.0, 1.0])
    affine[:3, 3] = [12.0, -30.0, 4.0]
    nib.save(nib.Nifti1Image(mask[:, 4:-4], affine), folder / "mask_rect.nii.gz")


def reference(root: Path, bundle: str, inputs: torch.Tensor, call: dict | None = None, **settings) -> np.ndarray:
    """The bundle's own inferer in this process (its inference.json, the served settings, `call` as keywords of the
    call), scaled to [0, 1] by the metadata's value_range: (H, W)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    for name, value in {"bundle_root": str(root), "progress": False, **SERVED[bundle], **settings}.items():
        parser[name] = value
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    out = parser.get_parsed_content("inferer")(inputs, network, **(call or {}))
    outputs = json.loads((root / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]
    low, high = outputs["pred"]["value_range"]
    return ((out[0, 0].float().numpy() - low) / (high - low)).astype(np.float64)


def as_png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG", f"expected a PNG result, got {image.format}"
    return np.asarray(image)


def check_matches(result: np.ndarray, expected: np.ndarray, what: str) -> None:
    """An 8-bit result equals `expected` in [0, 1] within rounding, and is not its transpose."""
    assert result.dtype == np.uint8, f"{what}: an 8-bit PNG was expected, got {result.dtype}"
    assert result.shape == expected.shape, f"{what}: shape {result.shape}, expected {expected.shape}"
    close = np.abs(result / 255.0 - expected) <= 1.0 / 255 + 1e-6
    assert np.abs(expected - expected.T).mean() > 0.02, f"{what}: the reference is too symmetric to test orientation"
    transposed = np.abs(result / 255.0 - expected.T) <= 1.0 / 255 + 1e-6
    assert close.mean() >= 0.99, (
        f"{what}: {close.mean():.1%} of pixels match the bundle run in-process ({transposed.mean():.1%} match its "
        f"transpose); result range {result.min()}..{result.max()}"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Both bundles trained, served over the studies above; the server stopped (port free) afterwards."""
    if not (serve.DEFAULT_VENV / "bin" / "python").exists():
        pytest.skip(
            f"MONAI Label's environment {serve.DEFAULT_VENV} is absent: build it with `bash label_server/setup_env.sh`"
        )
    tmp = tmp_path_factory.mktemp("label_server")
    lidc_data = REAL_LIDC if REAL_LIDC.is_dir() else demo_data(LIDC, tmp / "lidc_data")
    mri_data = demo_data(MRI, tmp / "mri_data")
    roots = {LIDC: train(LIDC, tmp / LIDC, lidc_data), MRI: train(MRI, tmp / MRI, mri_data)}
    make_studies(tmp / "studies", lidc_data, mri_data)
    with serve.label_server(list(roots.values()), tmp / "studies", workdir=tmp / "work", overrides=SERVED) as server:
        yield SimpleNamespace(server=server, roots=roots, studies=tmp / "studies")
    assert not serve.port_in_use(server.port)


def test_info_lists_both_bundles_with_their_label_names(served):
    models = served.server.info()["models"]
    assert {LIDC, MRI} <= set(models), f"served models: {sorted(models)}"
    for name in (LIDC, MRI):
        labels = models[name]["labels"]
        assert 0 not in labels.values(), f"{name}: labels {labels}: value 0 is background to MONAI Label clients"
        assert "image" not in labels, f"{name}: labels {labels}: a label called 'image'"
        assert models[name]["dimension"] == 2
    assert models[LIDC]["labels"] == {"nodule": 1}, "LIDC: the frequency map read as a label map, 1 = nodule"


def test_lidc_ct_crop_to_nodule_frequency_map(served):
    from meddiff.data.layouts import read_png_image

    server, root = served.server, served.roots[LIDC]
    image = torch.from_numpy(read_png_image(str(served.studies / "ct.png"), 1))[None]
    expected = reference(root, LIDC, image, FREQUENCY)
    check_matches(as_png(server.infer(LIDC, "ct")), expected, "LIDC ct.png")
    members = SERVED[LIDC]["num_samples"]
    assert np.allclose(expected * members, np.round(expected * members)), "a frequency is a multiple of 1/N"
    rect = as_png(server.infer(LIDC, "ct_rect"))
    assert rect.shape == np.asarray(Image.open(served.studies / "ct_rect.png")).shape and rect.dtype == np.uint8


def test_lidc_seed_per_request(served):
    """The seed is a per-request setting (displayable_configs): another seed, another ensemble, as in-process."""
    from meddiff.data.layouts import read_png_image

    image = torch.from_numpy(read_png_image(str(served.studies / "ct.png"), 1))[None]
    expected = reference(served.roots[LIDC], LIDC, image, FREQUENCY, seed=1)
    check_matches(as_png(served.server.infer(LIDC, "ct", {"seed": 1})), expected, "LIDC ct.png, seed 1")


def test_mri_mask_to_generated_slice(served):
    from meddiff.data.layouts import read_png_mask
    from meddiff.data.transforms import encode_mask

    server, root = served.server, served.roots[MRI]
    num_classes = json.loads((root / "models" / "model.json").read_text())["settings"]["num_classes"]
    encoded = encode_mask(read_png_mask(str(served.studies / "mask.png")), num_classes)[None]
    check_matches(as_png(server.infer(MRI, "mask")), reference(root, MRI, encoded), "MRI mask.png")

    result_file = served.studies.parent / "result.nii.gz"
    result_file.write_bytes(server.infer(MRI, "mask_rect"))
    result = np.asanyarray(nib.load(result_file).dataobj)
    assert result.shape == nib.load(served.studies / "mask_rect.nii.gz").shape, "2D NIfTI in, same shape out"
    assert np.isfinite(result).all() and (result.dtype == np.uint8 or (result.min() >= -1 and result.max() <= 1))


def test_concurrent_requests(served):
    """Requests sent at once all succeed with the answers they get alone (the server runs them one by one)."""
    server = served.server
    calls = [(LIDC, "ct"), (MRI, "mask"), (LIDC, "ct"), (MRI, "mask")]
    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(lambda call: server.infer(*call), calls))
    images = [as_png(result) for result in results]
    assert np.array_equal(images[0], images[2]) and np.array_equal(images[1], images[3])
    assert np.array_equal(images[0], as_png(server.infer(LIDC, "ct")))
    assert np.array_equal(images[1], as_png(server.infer(MRI, "mask")))
