"""Every bundle follows the model-zoo conventions: files, valid metadata, configs that parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_helpers import layered, main_training, training_configs
from conftest import SHARED
from monai.bundle import ConfigParser

from meddiff.demo import bundles_dir

BUNDLES = sorted(p for p in bundles_dir().iterdir() if (p / "configs" / "metadata.json").is_file())
REQUIRED = [
    "configs/metadata.json",
    "configs/inference.json",
    "configs/evaluate.json",
    "configs/logging.conf",
    "docs/README.md",
    "LICENSE",
]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_bundle_files(bundle: Path) -> None:
    missing = [name for name in REQUIRED if not (bundle / name).is_file()]
    assert not missing, f"{bundle.name} lacks {missing}"
    assert training_configs(bundle), f"{bundle.name} has no configs/train*.json"
    assert list((bundle / "configs").glob("multi_gpu_train*.json")), f"{bundle.name} has no multi-GPU training overlay"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_metadata_is_valid(bundle: Path) -> None:
    schema_file = SHARED / "docs" / "meta_schema_20240725.json"
    if not schema_file.is_file():
        pytest.skip("the metadata schema lives in ../shared/docs, absent in a fresh clone")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema_file))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert list(meta["network_data_format"]["inputs"])[0] == "image"
    assert list(meta["network_data_format"]["outputs"])[0] == "pred"
    assert "not to be used for diagnostic" in meta["intended_use"].lower() or "research" in meta["intended_use"].lower()


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_configs_define_the_standard_ids(bundle: Path) -> None:
    for name in training_configs(bundle):
        train = ConfigParser()
        train.read_config([str(bundle / "configs" / c) for c in layered(bundle, name)[0]])
        _check_training_ids(bundle, name, train)
    inference = ConfigParser()
    inference.read_config(str(bundle / "configs" / "inference.json"))
    for key in ("bundle_root", "device", "network_def", "network", "inferer", "run"):
        assert key in inference, f"{bundle.name}/configs/inference.json lacks {key}"
    imports = inference["imports"]
    assert "$import meddiff" in imports


def _check_training_ids(bundle: Path, name: str, train: ConfigParser) -> None:
    for key in (
        "bundle_root",
        "device",
        "dataset_dir",
        "network_def",
        "network",
        "train#trainer",
        "train#trainer#max_epochs",
        "train#dataset#data",
        "train#handlers",
        "training",
    ):
        assert key in train, f"{bundle.name}/configs/{name} lacks {key}"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_boolean_network_settings_from_the_command_line_are_booleans(bundle: Path) -> None:
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in main_training(bundle)])
    levels = parser["attention_levels"]
    parser["attention_levels"] = ["false"] * (len(levels) - 1) + ["true"]  # how Fire hands over "[false,...,true]"
    if "resblock_updown" in parser:
        parser["resblock_updown"] = "false"
    settings = next(key for key in ("model_settings", "architecture") if f"{key}#attention_levels" in parser)
    expected = [False] * (len(levels) - 1) + [True]
    assert parser.get_parsed_content(f"{settings}#attention_levels", instantiate=False) == expected
    if f"{settings}#resblock_updown" in parser:
        assert parser.get_parsed_content(f"{settings}#resblock_updown", instantiate=False) is False
