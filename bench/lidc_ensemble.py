"""Benchmark the LIDC ensemble bundle: seconds per 16-sample ensemble at 128x128, DDIM 10/25/50 vs DDPM 1000.

One run trains the bundle's network (a stated small configuration, see NETWORK) briefly on the real LIDC crops in
../shared/data/lidc_crops, then samples 16-member ensembles for the same test images with each sampler and the
same weights, and scores each against the same 4 raters' masks (GED, CI). DDPM 1000 is run in full, as the seed
samples (no extrapolation). Results go to bench/results/lidc_ensemble.json and a table in bench/README.md.

Usage:
    python bench/lidc_ensemble.py                 # the full benchmark (about 10 minutes on 2 CPU cores)
    python bench/lidc_ensemble.py --quick         # smoke run: 32x32, few steps (< 1 minute)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "lidc_ambiguous_segmentation" / "configs"
CROPS = REPO.parent / "shared" / "data" / "lidc_crops" / "data"
README = REPO / "bench" / "README.md"
BEGIN, END = "<!-- lidc_ensemble:tables:begin -->", "<!-- lidc_ensemble:tables:end -->"
NETWORK = {  # the seed's network is (128, 128, 256, 384, 512), about 2.5 h per DDPM-1000 ensemble on this CPU
    "network_channels": [8, 16, 32, 64],
    "attention_levels": [False, False, False, True],
    "num_res_blocks": 1,
    "num_head_channels": 64,
    "norm_num_groups": 8,
    "encoder_channels": [8, 16, 32, 64],
    "encoder_convs_per_block": 2,
}
SAMPLERS = [("ddim", 10), ("ddim", 25), ("ddim", 50), ("ddpm", 1000)]


def _quiet_helpers():
    """`wait_for_quiet` from bench/seg_guided.py: wait until other processes leave the CPUs alone."""
    spec = importlib.util.spec_from_file_location("seg_guided_bench", REPO / "bench" / "seg_guided.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.wait_for_quiet


def machine_info() -> dict:
    """CPU count and model, library versions, load."""
    import monai
    import torch

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "",
    )
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def train(bundle_root: Path, settings: dict) -> float:
    """Train the bundle on the real training crops; return the seconds it took."""
    from monai.bundle import run

    start = time.perf_counter()
    run(
        run_id="training",
        config_file=[str(BUNDLE / "train.json")],
        meta_file=str(BUNDLE / "metadata.json"),
        logging_file=str(BUNDLE / "logging.conf"),
        bundle_root=str(bundle_root),
        dataset_dir=str(CROPS),
        **settings,
    )
    return time.perf_counter() - start


def sample_and_score(bundle_root: Path, settings: dict, samplers: list, cases: list, num_samples: int) -> list[dict]:
    """Per sampler: seconds per ensemble (each image) and GED/CI against the raters, with the same weights."""
    import torch
    from monai.bundle import ConfigParser

    from meddiff.ensembles import EnsembleSamplingInferer
    from meddiff.metrics import ci_score, generalized_energy_distance

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "device": "$torch.device('cpu')", **settings})
    network = parser.get_parsed_content("network")
    parser.get_parsed_content("load_weights")
    network.eval()
    rows = []
    for sampler, steps in samplers:
        inferer = EnsembleSamplingInferer(
            num_samples=num_samples, sampler=sampler, num_inference_steps=steps, seed=0, output="samples"
        )
        times, per_image = [], {}
        for i, case in enumerate(cases):
            image = torch.from_numpy(case["image"])[None]
            start = time.perf_counter()
            members = inferer(image, network, seed=i)[0].numpy().astype(bool)
            times.append(time.perf_counter() - start)
            references = case["label"].astype(bool)
            per_image[case["name"]] = {
                "seconds": times[-1],
                "ged": generalized_energy_distance(members, references),
                **ci_score(members, references),
                "foreground_fraction": float(members.mean()),
            }
            print(
                f"  {sampler}-{steps} image {case['name']}: {times[-1]:.1f} s, GED {per_image[case['name']]['ged']:.3f}"
            )
        rows.append(
            {
                "sampler": sampler,
                "num_inference_steps": steps,
                "seconds_per_ensemble": float(np.mean(times)),
                "seconds_per_step": float(np.mean(times) / steps),
                "ged": float(np.mean([v["ged"] for v in per_image.values()])),
                "ci": float(np.mean([v["ci"] for v in per_image.values()])),
                "ci_cimd": float(np.mean([v["ci_cimd"] for v in per_image.values()])),
                "per_image": per_image,
            }
        )
    return rows


def table(result: dict) -> str:
    """The README table of one result."""
    base = next(r for r in result["samplers"] if r["sampler"] == "ddpm")
    lines = [
        f"{result['num_samples']}-member ensembles at {result['img_size']}x{result['img_size']}, "
        f"{len(result['test_images'])} real LIDC test crops ({', '.join(result['test_images'])}), the same weights "
        f"for every row: {result['network']['network_channels']} channels trained {result['train_seconds']:.0f} s "
        f"({result['train_settings']['num_epochs']} epochs on {result['num_train_images']} crops). "
        f"{result['machine']['cpu_count']} CPU cores, torch {result['machine']['torch']}, "
        f"{result['machine']['torch_threads']} threads, fp32; DDPM {base['num_inference_steps']} measured in full, "
        "not extrapolated.",
        "",
        f"| sampler | steps | s / ensemble | s / step | x faster than DDPM {base['num_inference_steps']} "
        "| GED (lower is better) | CI | member foreground |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["samplers"]:
        speed = base["seconds_per_ensemble"] / r["seconds_per_ensemble"]
        foreground = np.mean([v["foreground_fraction"] for v in r["per_image"].values()])
        lines.append(
            f"| {r['sampler'].upper()} | {r['num_inference_steps']} | {r['seconds_per_ensemble']:.1f} | "
            f"{r['seconds_per_step']:.3f} | {speed:.1f} | {r['ged']:.3f} | {r['ci']:.3f} | {100 * foreground:.0f}% |"
        )
    lines += ["", result["note"], "", f"Raw numbers: `{result['output_file']}`."]
    return "\n".join(lines)


def update_readme(text_block: str) -> None:
    """Replace this benchmark's block in bench/README.md, leaving other sections alone."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text_block}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = (
            text.rstrip("\n") + "\n\n## CIMD ensembles (LIDC bundle), DDIM vs DDPM 1000: `bench/lidc_ensemble.py`\n\n"
        )
        text += block + "\n"
    tmp = README.with_name(f".{README.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, README)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON and README table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32x32, tiny network, few steps: a smoke run")
    ap.add_argument("--epochs", type=int, default=80, help="training epochs on the 19 real training crops")
    ap.add_argument("--num_images", type=int, default=2, help="test crops sampled by every sampler")
    ap.add_argument("--num_samples", type=int, default=16)
    ap.add_argument("--max_wait", type=float, default=600, help="seconds to wait for a quiet machine first")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/lidc_ensemble[_quick].json)")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    args = ap.parse_args(argv)
    from meddiff.precision import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()
    if not CROPS.is_dir():
        print(f"{CROPS} is absent: this benchmark needs the real LIDC crops beside the checkout.")
        return 1
    from meddiff.data.lidc import load_lidc_cases
    from meddiff.io import save_json

    img_size = 32 if args.quick else 128
    network = (
        dict(NETWORK, network_channels=[8, 16], attention_levels=[False, True], num_head_channels=16)
        if args.quick
        else NETWORK
    )
    samplers = [("ddim", 2), ("ddim", 4), ("ddpm", 20)] if args.quick else SAMPLERS
    train_settings = {
        **network,
        "img_size": img_size,
        "num_epochs": 2 if args.quick else args.epochs,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "num_inference_steps": 2,
    }
    busy = _quiet_helpers()(args.max_wait) if args.max_wait > 0 else None
    result = {"machine": {**machine_info(), "other_processes_cpu_fraction_at_start": busy}}
    cases = [
        c for c in load_lidc_cases(CROPS, "testing", img_size, progress=False) if c["label"].any(axis=(1, 2)).all()
    ]
    cases = cases[: args.num_images]  # crops that all 4 raters marked: a nodule to segment in every reference
    with tempfile.TemporaryDirectory() as tmp:
        print("training ...")
        train_seconds = train(Path(tmp), train_settings)
        print(f"trained in {train_seconds:.0f} s; sampling ...")
        rows = sample_and_score(Path(tmp), {**network, "img_size": img_size}, samplers, cases, args.num_samples)
    out = (
        Path(args.out)
        if args.out
        else REPO / "bench" / "results" / f"lidc_ensemble{'_quick' if args.quick else ''}.json"
    )
    result.update(
        {
            "output_file": str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out),
            "img_size": img_size,
            "num_samples": args.num_samples,
            "precision": "fp32",
            "network": network,
            "train_settings": train_settings,
            "train_seconds": train_seconds,
            "num_train_images": len(load_lidc_cases(CROPS, "training", None, progress=False)),
            "test_images": [c["name"] for c in cases],
            "extrapolated": False,
            "samplers": rows,
            "note": "The network is small and trained for about a minute and a half on 19 crops, so its members are "
            "far from the raters' masks (member foreground is the share of pixels the members mark; the raters mark "
            "about 0.5%): the GED/CI columns compare the samplers at equal weights, they are not the method's "
            "accuracy, which needs the seed-size network trained for far longer on the full LIDC crop set.",
        }
    )
    result["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    save_json(result, out, overwrite=True)
    print(table(result))
    if not args.no_readme and not args.quick:
        update_readme(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
