"""Every bundle under bundles/ in the model-zoo shape, checked the way MONAI checks it, with no per-bundle code.

For each bundle and each of its configs, layered as users layer them (`bundle_helpers.layered`: ``demo.json``'s
``layers`` where a bundle trains one model per config on a shared base, else ``multi_gpu_<x>.json`` on ``<x>.json``,
``finetune*.json`` on ``train.json``, any other overlay such as ``evaluate.json`` on ``inference.json``), on the
bundle's built-in demo data and its ``demo.json`` settings:

- ``ConfigWorkflow(...).check_properties()`` returns ``[]``: ``workflow_type="train"`` for ``train*.json`` (and
  their multi-GPU overlays, checked in a one-process gloo group), ``"infer"`` for ``inference.json`` and overlays
  on it. The training configs also run for one epoch with a validation (``train#trainer#max_epochs``,
  ``val_interval``: property ids, so no bundle's own keys), in the order their models train, which the inference
  checks need (trained weights);
- every training config (but an evaluation tool's, `NO_VALIDATION`) has a validation (``validate#evaluator`` run by
  a ``ValidationHandler``) that keeps the best model, and the training of the network ``inference.json`` samples
  with builds that same network;
- multi-GPU overlays gate every logging and saving handler to rank 0 with ``_disabled_``, and no handler that all
  ranks must run (validation, the resumable checkpoint);
- metadata pins only packages that requirements.txt installs at that version and meddiff's code imports, and its
  first output's ``channel_def`` (MONAI Label's label names) is a label map's (0 is background) or absent.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import socket
from pathlib import Path

import pytest
import torch
from bundle_helpers import layered, main_training, training_configs
from monai.bundle import ConfigParser, ConfigWorkflow

from meddiff.demo import bundles_dir

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in bundles_dir().iterdir() if (p / "configs" / "metadata.json").is_file())
NOT_WORKFLOWS = ("metadata.json", "demo.json")
ONE_EPOCH = {"train#trainer#max_epochs": 1, "val_interval": 1}
# handlers that log, show progress or write files: rank 0 only under torchrun
RANK0_ONLY = {
    "StatsHandler",
    "TensorBoardStatsHandler",
    "ignite.handlers.ProgressBar",
    "CheckpointSaver",
    "meddiff.handlers.BestModelCheckpoint",
    "meddiff.cimd.CIMDDiagnostics",
}
# handlers every rank must run: validation's metric is reduced over all ranks; every rank resumes the checkpoint
ALL_RANKS = {"ValidationHandler", "meddiff.handlers.TrainingCheckpoint"}
# training configs of evaluation tools, which train on every real training image and keep their last weights
NO_VALIDATION = {("breast_mri_seg_guided_generation", "train_segmenter.json")}  # the faithfulness segmenter


def workflows() -> list[tuple[Path, str]]:
    """(bundle, config name) of every workflow config of every bundle, training configs first."""
    found = []
    for bundle in BUNDLES:
        names = [p.name for p in sorted((bundle / "configs").glob("*.json")) if p.name not in NOT_WORKFLOWS]
        found += [(bundle, n) for n in sorted(names, key=lambda n: (layered(bundle, n)[1] != "train", n))]
    return found


def ids(case: tuple[Path, str]) -> str:
    return f"{case[0].name}/{case[1]}"


def demo_settings(bundle: Path) -> dict:
    return json.loads((bundle / "configs" / "demo.json").read_text())


class Bundles:
    """Per bundle: its demo data and a bundle_root whose training configs have run once (cached)."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp, self.done = tmp, {}

    def data(self, bundle: Path) -> Path:
        module, name = demo_settings(bundle)["demo_data"].rsplit(".", 1)
        return Path(getattr(importlib.import_module(module), name)(str(self.tmp.mktemp(f"{bundle.name}_data"))))

    def trained(self, bundle: Path) -> tuple[Path, Path, dict[str, list[str] | None]]:
        """(bundle_root, dataset_dir, check_properties() of each training config) after one epoch of each."""
        if bundle.name not in self.done:
            data, root = self.data(bundle), self.tmp.mktemp(bundle.name)
            checks = {}
            for name in training_configs(bundle):
                workflow = make_workflow(bundle, layered(bundle, name)[0], "train", root, data)
                workflow.initialize()
                checks[name] = workflow.check_properties()
                workflow.run()
                workflow.finalize()
            self.done[bundle.name] = root, data, checks
        return self.done[bundle.name]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    return Bundles(tmp_path_factory)


def make_workflow(bundle: Path, configs: list[str], kind: str, root: Path, data: Path) -> ConfigWorkflow:
    """The bundle's ConfigWorkflow on `configs` + demo.json, one epoch, into `root`."""
    configs_dir = bundle / "configs"
    return ConfigWorkflow(
        config_file=[str(configs_dir / name) for name in [*configs, "demo.json"]],
        meta_file=str(configs_dir / "metadata.json"),
        logging_file=str(configs_dir / "logging.conf"),
        workflow_type=kind,
        bundle_root=str(root),
        dataset_dir=str(data),
        **(ONE_EPOCH if kind == "train" else {}),
    )


@pytest.fixture
def one_process_group(monkeypatch: pytest.MonkeyPatch):
    """The env:// settings of a one-process run, for the multi-GPU overlays' init_process_group (gloo on CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOCAL_RANK", "0")
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("case", workflows(), ids=ids)
def test_check_properties_is_empty(case: tuple[Path, str], bundles: Bundles, request: pytest.FixtureRequest) -> None:
    bundle, name = case
    configs, kind = layered(bundle, name)
    root, data, checks = bundles.trained(bundle)
    if name in checks:  # a training config: checked (and run) by bundles.trained
        assert checks[name] == [], f"{bundle.name}/configs/{name}: {checks[name]}"
        return
    if name.startswith("multi_gpu_"):
        request.getfixturevalue("one_process_group")
    workflow = make_workflow(bundle, configs, kind, root, data)
    workflow.initialize()
    try:
        assert workflow.check_properties() == [], f"{bundle.name}: {configs} as a {kind} workflow"
    finally:
        workflow.finalize()


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_training_validates_and_keeps_the_best_model(bundle: Path, bundles: Bundles) -> None:
    names = [n for n in training_configs(bundle) if (bundle.name, n) not in NO_VALIDATION]
    for name in names:
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / c) for c in layered(bundle, name)[0]])
        assert "validate#evaluator" in parser and "val_interval" in parser, name
        targets = [h["_target_"] for h in parser["train#handlers"] if isinstance(h, dict)]
        assert "ValidationHandler" in targets, name
    root, _, _ = bundles.trained(bundle)
    best = sorted(root.glob("models/**/model_best.pt"))  # models/ or, per model or cluster, models/<model>/
    assert len(best) == len(names)
    for path in best:
        assert path.with_suffix(".json").is_file()
        checkpoint = torch.load(path.with_name("checkpoint.pt"), weights_only=True)
        assert checkpoint["best_epoch"] == 1 and checkpoint["best_metric"] > 0, path


def state_shapes(network: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_train_and_inference_build_the_same_network(bundle: Path, bundles: Bundles) -> None:
    root, data, _ = bundles.trained(bundle)
    networks = {}
    for key, configs in (("train", main_training(bundle)), ("inference", ["inference.json"])):
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / name) for name in [*configs, "demo.json"]])
        parser.update({"bundle_root": str(root), "dataset_dir": str(data)})
        networks[key] = state_shapes(parser.get_parsed_content("network_def"))
    assert networks["train"] == networks["inference"]


def overlays() -> list[tuple[Path, str]]:
    return [(b, n) for b, n in workflows() if n.startswith("multi_gpu_")]


@pytest.mark.parametrize("case", overlays(), ids=ids)
def test_multi_gpu_overlay_gates_handlers_to_rank0(case: tuple[Path, str]) -> None:
    bundle, name = case
    configs = [bundle / "configs" / n for n in layered(bundle, name)[0]]
    overlay = configs[-1]
    merged = ConfigParser()
    merged.read_config([str(c) for c in configs])
    for key in json.loads(overlay.read_text()):
        if key.endswith("#_disabled_"):
            item = key.removesuffix("#_disabled_")
            assert item in merged and isinstance(merged[item], dict), f"{overlay.name}: {key} names no handler"
    for handlers in ("train#handlers", "validate#handlers"):
        if handlers not in merged:
            continue
        for i, handler in enumerate(merged[handlers]):
            gated = handler.get("_disabled_") == "@is_not_rank0"  # another _disabled_ (e.g. no validation) is not
            where = f"{overlay.name}: {handlers}#{i} ({handler['_target_']})"
            if handler["_target_"] in RANK0_ONLY:
                assert gated, f"{where} logs or saves on every rank: add {handlers}#{i}#_disabled_"
            if handler["_target_"] in ALL_RANKS:
                assert not gated, f"{where} must run on every rank"


def requirement_pins() -> dict[str, str]:
    """name (lower case) -> version of every ``name==version`` line of requirements.txt."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        found = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if found:
            pins[found[1].lower()] = found[3]
    return pins


def imported_by_meddiff(distribution: str) -> bool:
    """Whether shared/meddiff imports a top-level module of `distribution` (by statement or by name string)."""
    modules = [m for m, dists in importlib.metadata.packages_distributions().items() if distribution.lower() in
               (d.lower() for d in dists)]  # fmt: skip
    code = "\n".join(p.read_text() for p in (REPO / "shared" / "meddiff").rglob("*.py"))
    return any(re.search(rf"^\s*(import|from) {m}\b|[\"']{m}[\"']", code, re.M) for m in modules)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_metadata_pins_what_is_installed_and_imported(bundle: Path) -> None:
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    pins = requirement_pins()
    assert meta["monai_version"] == pins["monai"] and meta["pytorch_version"] == pins["torch"]
    for name, version in meta["required_packages_version"].items():
        assert pins.get(name.lower()) == version, (
            f"{bundle.name}/configs/metadata.json pins {name}=={version}; requirements.txt installs "
            f"{pins.get(name.lower())}: pin what requirements.txt installs (meddiff itself is installed from the repo)"
        )
        assert imported_by_meddiff(name), f"{bundle.name}/configs/metadata.json pins {name}, which nothing imports"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_first_output_names_labels_a_viewer_reads_right(bundle: Path) -> None:
    outputs = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]
    first = next(iter(outputs.values()))  # MONAI Label's label names: this channel_def, "background" skipped
    channel_def = first.get("channel_def")
    if first["format"] in ("segmentation", "labels", "classes"):
        assert channel_def and channel_def.get("0") == "background" and len(channel_def) >= 2, channel_def
    else:
        assert channel_def is None, f"{bundle.name}: an image output declares labels {channel_def}"
