"""meddiff: the shared library behind the meddiff MONAI bundles."""

from __future__ import annotations

import importlib
from types import ModuleType

from meddiff.errors import install_excepthook

__version__ = "0.1.0"

install_excepthook()

_SUBMODULES = {
    "data",
    "errors",
    "options",
    "dicom",
    "engines",
    "evaluation",
    "generation",
    "handlers",
    "inferers",
    "io",
    "metrics",
    "networks",
    "precision",
    "sampling",
    "schedulers",
    "visualize",
    "cimd",
    "ensembles",
    "demo",
    "cli",
    "conditioning",
    "features",
    "latent",
    "losses",
    "provenance",
    "validation",
    "clustering",
    "colour",
    "morphology",
    "pairs",
    "workflows",
    "verdicts",
    "nuclei",
    "nuclei_generation",
    "ood",
}


def __getattr__(name: str) -> ModuleType:
    """Import submodules on first use, so bundle configs need only ``$import meddiff``."""
    if name in _SUBMODULES:
        return importlib.import_module(f"meddiff.{name}")
    raise AttributeError(f"module 'meddiff' has no attribute {name!r}")
