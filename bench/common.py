"""Helpers shared by the benchmarks: a quiet machine, machine facts, README blocks, timing."""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import resource
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "bench" / "README.md"

__all__ = [
    "README",
    "REPO",
    "machine_busy_s",
    "machine_info",
    "median",
    "run_clock",
    "update_readme_block",
    "wait_for_quiet",
    "write_report",
]


def median(values: list[float]) -> float:
    """The median of a non-empty list."""
    return float(statistics.median(values))


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0.0
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _cpu_self_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15) -> float:
    """Wait (up to `max_wait_s`) until other processes use < `threshold` of the CPUs; return the last busy fraction."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        b0, c0, t0 = machine_busy_s(), _cpu_self_s(), time.perf_counter()
        time.sleep(2.0)
        frac = (machine_busy_s() - b0 - (_cpu_self_s() - c0)) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
        if frac < threshold or time.perf_counter() > deadline:
            return frac
        print(f"  machine busy ({100 * frac:.0f}% of CPUs used by other processes): waiting", flush=True)
        time.sleep(10.0)


def machine_info(*modules: str) -> dict:
    """CPU model, its vector and bf16 flags, memory, Python/torch/monai (and `modules`) versions, date, load."""
    import torch

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = set(text.split())
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "cpu_flags": sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma") if f in flags),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }
    for name in ("torch", "monai", *modules):
        info[name] = importlib.import_module(name).__version__
    return info


def update_readme_block(begin: str, end: str, title: str, block: str) -> None:
    """Replace the text between `begin` and `end` in bench/README.md, or append it under `title`; atomically."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    wrapped = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + wrapped + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{wrapped}\n"
    tmp = README.with_name(f".{README.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, README)


def train_bundle(configs: Path, bundle_root: Path, dataset_dir: Path, settings: dict) -> float:
    """Run a bundle's `training` (its `configs/train.json`) into `bundle_root`; return the seconds it took."""
    from monai.bundle import run

    start = time.perf_counter()
    run(
        run_id="training",
        config_file=[str(configs / "train.json")],
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir),
        **settings,
    )
    return time.perf_counter() - start


def bundle_network(configs: Path, bundle_root: Path | None, settings: dict):  # -> torch.nn.Module
    """A bundle's inference network on the CPU, with the weights trained under `bundle_root` (random if None)."""
    from monai.bundle import ConfigParser

    from meddiff.io import load_trained_weights

    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "device": "$torch.device('cpu')", **settings})
    network = parser.get_parsed_content("network")
    if bundle_root is not None:
        load_trained_weights(
            network, parser.get_parsed_content("weights_file"), parser.get_parsed_content("model_settings")
        )
    return network.eval()


def run_clock() -> tuple[float, float, float]:
    """(wall clock, machine busy seconds, this process's CPU seconds) at the start of a run, for `write_report`."""
    return time.perf_counter(), machine_busy_s(), _cpu_self_s()


def write_report(report: dict, out: Path, clock: tuple[float, float, float]) -> float:
    """Add the run's wall time, the load average and the other processes' CPU share to `report`, write it as JSON
    to `out`; return the wall seconds."""
    import json

    t0, busy0, cpu0 = clock
    wall = time.perf_counter() - t0
    report["wall_s"] = round(wall, 1)
    report["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    others = machine_busy_s() - busy0 - (_cpu_self_s() - cpu0)
    report["others_cpu_share"] = round(others / (wall * (os.cpu_count() or 1)), 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return wall
