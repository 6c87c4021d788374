"""Run a bundle's own inference config in-process with stand-in objects (an inferer, a network) for fast tests;
how a bundle's configs layer (`layered`, `training_configs`, `main_training`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from meddiff.errors import find_user_error

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
MRI, LIDC = "breast_mri_seg_guided_generation", "lidc_ambiguous_segmentation"


def inference_parser(
    bundle: str, bundle_root: str | Path, objects: dict[str, Any] | None = None, **overrides: Any
) -> ConfigParser:
    """The bundle's ``inference.json`` with `overrides` set and config ids replaced by ready `objects`.

    With a stand-in ``network`` the handlers are the writer alone (no weights to load) and no provenance is recorded.
    """
    configs = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    parser.read_meta(str(configs / "metadata.json"))
    parser.update({"bundle_root": str(bundle_root), **overrides})
    objects = dict(objects or {})
    if "network" in objects:
        objects.setdefault("handlers", ["@writer"])
        objects.setdefault("provenance", None)
    for key, value in objects.items():
        parser[key] = value
    return parser


def parsed(parser: ConfigParser, key: str) -> Any:
    """`parser.get_parsed_content(key)`, raising the user error inside MONAI's wrapping as itself."""
    try:
        return parser.get_parsed_content(key)
    except Exception as err:
        found = find_user_error(err)
        if found is not None:
            raise found from err
        raise


def run_inference(bundle: str, bundle_root: str | Path, objects: dict[str, Any] | None = None, **overrides: Any) -> Any:
    """Run the bundle's inference workflow (its ``initialize`` checks, then the evaluator); return the writer's
    result."""
    parser = inference_parser(bundle, bundle_root, objects, **overrides)
    parsed(parser, "initialize")
    parsed(parser, "evaluator").run()
    return parsed(parser, "writer").result


def layered(bundle: Path, name: str) -> tuple[list[str], str]:
    """(config files in the order users layer them, workflow type) of ``configs/<name>``.

    ``demo.json``'s ``layers`` (``{config: [configs in order]}``) says it for a bundle whose configs layer otherwise
    (one trained model per config, as the model zoo's generative bundles: ``train_diffusion.json`` on
    ``train_autoencoder.json``). Else: ``multi_gpu_<x>.json`` on ``<x>.json``, ``finetune*.json`` on ``train.json``,
    ``train*.json`` alone, any other overlay (``evaluate.json``) on ``inference.json``.
    """
    layers = json.loads((bundle / "configs" / "demo.json").read_text()).get("layers", {})
    if name in layers:
        configs = list(layers[name])
        return configs, "train" if any(c.startswith(("train", "finetune")) for c in configs) else "infer"
    if name.startswith("multi_gpu_"):
        base = name.removeprefix("multi_gpu_")
        configs, kind = layered(bundle, base)
        return [*configs, name], kind
    if name.startswith("train"):
        return [name], "train"
    if name.startswith("finetune"):  # a second training stage, started from train.json's weights
        return ["train.json", name], "train"
    if name == "inference.json":
        return [name], "infer"
    return ["inference.json", name], "infer"


def training_configs(bundle: Path) -> list[str]:
    """The bundle's ``train*.json``, each after the configs it is layered on (the order its models train in)."""
    names = [p.name for p in (bundle / "configs").glob("train*.json")]
    return sorted(names, key=lambda n: (len(layered(bundle, n)[0]), n))


def main_training(bundle: Path) -> list[str]:
    """The layered configs of the training whose network ``inference.json`` samples with (``train.json`` when it
    exists, else the training config with inference's ``network_def`` target)."""
    configs = bundle / "configs"
    if (configs / "train.json").is_file():
        return ["train.json"]
    target = json.loads((configs / "inference.json").read_text())["network_def"]["_target_"]
    for name in training_configs(bundle):
        parser = ConfigParser()
        parser.read_config([str(configs / c) for c in layered(bundle, name)[0]])
        network_def = parser["network_def"]
        while isinstance(network_def, str) and network_def.startswith("@"):  # a reference such as "@autoencoder_def"
            network_def = parser[network_def[1:]]
        if network_def["_target_"] == target:
            return layered(bundle, name)[0]
    raise AssertionError(f"{bundle.name}: no training config builds {target}")
