"""Run a bundle's own inference config in-process with stand-in objects (an inferer, a network) for fast tests."""

from __future__ import annotations

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
