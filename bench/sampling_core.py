"""The sampling core's own cost and the few-step samplers' quality (issue 10).

One run:
1. overhead: for each bundle's sampling inferer, with the bundle's default inference network (random weights:
   speed does not depend on them) at the stated size, the wall time of a whole sampling run and the time spent
   inside the network's forward; the rest (loop, scheduler, conditioning, guidance bookkeeping, casts) as a
   fraction of a step (target: under 5%). Classifier-free guidance (one batched call) and RePaint's jumps are
   timed on the MRI network too;
2. quality against steps on the LIDC ensemble: a CIMD model (paper design, the demo's network at 32 px) trained
   on the 19 real crops into `--weights` (reused when there), ensembles sampled with DDPM 1000 as the reference
   and with DDIM, respaced DDPM, DPM-Solver++ 2M and its SDE variant at 5/10/20/50 steps, from the same
   weights; GED and CI against the raters, and each ensemble's GED distance to the DDPM-1000 ensemble of the same image.
Results go to bench/results/sampling_core.json and a table in bench/README.md.

Usage:
    python bench/sampling_core.py --overhead-only        # part 1 (about 8 minutes on 2 CPU cores)
    python bench/sampling_core.py --weights DIR          # both parts; trains the LIDC model into DIR first
                                                         # unless DIR holds one (about 30 minutes in all)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import bundle_network, machine_info, update_readme_block

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
CROPS = REPO.parent / "shared" / "data" / "lidc_crops" / "data"
BEGIN, END = "<!-- sampling_core:tables:begin -->", "<!-- sampling_core:tables:end -->"
STEPS = (5, 10, 20, 50)
SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde")


class ForwardTimer:
    """Accumulates the seconds spent inside a module's forward (pre/post hooks, so any module works)."""

    def __init__(self, module) -> None:
        self.module, self.seconds, self.calls, self._start = module, 0.0, 0, 0.0
        module.register_forward_pre_hook(lambda _m, _a: self._begin())
        module.register_forward_hook(lambda _m, _a, _o: self._end())

    def _begin(self) -> None:
        self._start = time.perf_counter()

    def _end(self) -> None:
        self.seconds += time.perf_counter() - self._start
        self.calls += 1


def overhead_row(name: str, run, timed: ForwardTimer, steps: int) -> dict:
    """Time `run()` (one sampling run) after a warm-up; the share of it outside the network."""
    run()
    timed.seconds, timed.calls = 0.0, 0
    start = time.perf_counter()
    run()
    total = time.perf_counter() - start
    row = {"case": name, "steps": steps, "network_calls": timed.calls, "total_s": total,
           "network_s": timed.seconds, "overhead_fraction": (total - timed.seconds) / total}  # fmt: skip
    print(f"  {name}: {row}", flush=True)
    return row


def overhead(quick: bool) -> list[dict]:
    import torch

    from meddiff.conditioning import Conditioning
    from meddiff.inferers import ConditionedSamplingInferer, EnsembleSamplingInferer, InpaintingSamplingInferer
    from meddiff.sampling import classifier_free, make_generator, sample
    from meddiff.schedulers import make_scheduler

    rows = []
    size, steps = (32, 2) if quick else (32, 10)
    mri = bundle_network(BUNDLES / "breast_mri_seg_guided_generation" / "configs", None,
                         {"img_size": size, "num_classes": 4})  # fmt: skip
    timed = ForwardTimer(mri)
    condition = torch.rand(1, mri.in_channels - 1, size, size)
    for sampler in ("ddim", "ddpm", "dpmpp_2m"):
        inferer = ConditionedSamplingInferer(sampler=sampler, num_inference_steps=steps, seed=0)
        rows.append(overhead_row(f"MRI {size}px, {sampler}", lambda i=inferer: i(condition, mri), timed, steps))
    guided = classifier_free(mri, Conditioning("concat"), condition, 3.0)
    rows.append(overhead_row(
        f"MRI {size}px, ddim + classifier-free guidance (batched)",
        lambda: sample(guided, make_scheduler("ddim", steps), (1, 1, size, size), generator=make_generator(0, "cpu")),
        timed, steps,
    ))  # fmt: skip
    inpaint = InpaintingSamplingInferer(sampler="ddpm", num_inference_steps=steps, seed=0,
                                        scheduler_args={"jump_length": 2, "jump_n_sample": 3})  # fmt: skip
    known = torch.cat([torch.rand(1, 1, size, size), (torch.rand(1, 1, size, size) > 0.5).float()], 1)
    unet = bundle_network(BUNDLES / "breast_mri_seg_guided_generation" / "configs", None,
                          {"img_size": size, "num_classes": 2})  # fmt: skip
    timed_unet = ForwardTimer(unet)
    rows.append(overhead_row(f"RePaint {size}px (jump 2 x 3)",
                             lambda: inpaint(known, _Uncond(unet)), timed_unet, steps))  # fmt: skip
    lidc_size = 32 if quick else 64
    lidc = bundle_network(BUNDLES / "lidc_ambiguous_segmentation" / "configs", None, _lidc_network(lidc_size))
    timed_lidc = ForwardTimer(lidc.denoiser)
    ensemble = EnsembleSamplingInferer(num_samples=16, sampler="ddpm", num_inference_steps=steps, seed=0)
    image = torch.rand(1, 1, lidc_size, lidc_size) * 2 - 1
    rows.append(overhead_row(f"LIDC {lidc_size}px, 16-member ensemble, ddpm", lambda: ensemble(image, lidc),
                             timed_lidc, steps))  # fmt: skip
    return rows


class _Uncond:
    """An unconditional view of a concat network with one condition channel: feeds zeros as the condition."""

    def __init__(self, network) -> None:
        self.network = network

    def parameters(self):
        return self.network.parameters()

    def eval(self):
        return self

    def __call__(self, x, timesteps):
        import torch

        return self.network(torch.cat([x, torch.zeros_like(x)], 1), timesteps=timesteps)


def _lidc_network(size: int) -> dict:
    from lidc_learning import NETWORK

    return {**NETWORK, "img_size": size}


MODEL_KEYS = ("img_size", "network_channels", "attention_levels", "num_res_blocks", "num_head_channels",
              "norm_num_groups", "encoder_channels", "encoder_convs_per_block")  # fmt: skip
# the demo's network (configs/demo.json, 32 px): trains on the 19 real crops in minutes here
QUALITY_MODEL = {k: v for k, v in json.loads((BUNDLES / "lidc_ambiguous_segmentation" / "configs" / "demo.json")
                 .read_text()).items() if k in MODEL_KEYS}  # fmt: skip
QUALITY_TRAINING = {"batch_size": 8, "num_epochs": 400, "learning_rate": 1e-3}


def train_quality_model(root: Path, quick: bool) -> float:
    """Train the paper design on the real crops into `root` (skipped when it holds weights); return seconds."""
    from common import train_bundle

    if (root / "models" / "model.pt").is_file():
        return 0.0
    settings = {**QUALITY_MODEL, **QUALITY_TRAINING, "num_epochs": 2 if quick else QUALITY_TRAINING["num_epochs"]}
    return train_bundle(BUNDLES / "lidc_ambiguous_segmentation" / "configs", root, CROPS, settings)


def quality(weights: Path, num_samples: int, quick: bool) -> dict:
    import torch
    from lidc_learning import score

    from meddiff.data.lidc import load_lidc_cases
    from meddiff.inferers import EnsembleSamplingInferer
    from meddiff.metrics import generalized_energy_distance

    train_seconds = train_quality_model(weights, quick)
    net = bundle_network(BUNDLES / "lidc_ambiguous_segmentation" / "configs", weights, QUALITY_MODEL)
    cases = load_lidc_cases(CROPS, "testing", QUALITY_MODEL["img_size"], progress=False)[: 3 if quick else None]
    reference_sampler = ("ddpm", 20 if quick else 1000)
    grid = [(*reference_sampler, 0), (*reference_sampler, 1000)]  # the reference, and itself with other seeds
    grid += [(s, n, 0) for n in ((5,) if quick else STEPS) for s in SAMPLERS]
    reference, rows = {}, []
    for sampler, steps, seed_offset in grid:
        inferer = EnsembleSamplingInferer(num_samples=num_samples, sampler=sampler, num_inference_steps=steps,
                                          output="samples")  # fmt: skip
        per_image, to_ref, seconds = {}, [], []
        for i, case in enumerate(cases):
            start = time.perf_counter()
            members = inferer(torch.from_numpy(case["image"])[None], net, seed=seed_offset + i)[0].numpy().astype(bool)
            seconds.append(time.perf_counter() - start)
            per_image[case["name"]] = score(members, case["label"].astype(bool))
            if (sampler, steps, seed_offset) == (*reference_sampler, 0):
                reference[case["name"]] = members
            else:
                to_ref.append(generalized_energy_distance(members, reference[case["name"]]))
        keys = next(iter(per_image.values())).keys()
        row = {"sampler": sampler, "steps": steps, "seeds": "other" if seed_offset else "same",
               "seconds_per_ensemble": float(np.mean(seconds)),
               "mean": {k: float(np.mean([s[k] for s in per_image.values()])) for k in keys},
               "ged_to_ddpm1000": float(np.mean(to_ref)) if to_ref else None}  # fmt: skip
        rows.append(row)
        print(f"  {sampler}-{steps}: GED {row['mean']['ged']:.3f} CI {row['mean']['ci']:.3f} "
              f"to DDPM-1000 {row['ged_to_ddpm1000']}", flush=True)  # fmt: skip
    return {"weights": str(weights), "model": QUALITY_MODEL, "training": QUALITY_TRAINING,
            "train_seconds": train_seconds, "num_samples": num_samples,
            "test_images": [c["name"] for c in cases], "rows": rows}  # fmt: skip


def table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"{m['cpu_count']} CPU cores ({m['cpu_model']}; AMX-BF16 {m['amx_bf16']}, AVX512-BF16 {m['avx512_bf16']}), "
        f"torch {m['torch']}, fp32, random weights (speed does not depend on them).",
        "",
        "| sampling run | steps | network calls | total s | in the network s | outside the network |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["overhead"]:
        lines.append(f"| {r['case']} | {r['steps']} | {r['network_calls']} | {r['total_s']:.2f} | "
                     f"{r['network_s']:.2f} | {100 * r['overhead_fraction']:.1f}% |")  # fmt: skip
    if result.get("quality"):
        q = result["quality"]
        lines += [
            "",
            f"LIDC ensembles ({q['num_samples']} members, {len(q['test_images'])} real test crops at "
            f"{q['model']['img_size']} px, paper design trained {q['training']['num_epochs']} epochs, the same weights "
            "for every row). `GED to DDPM-1000`: the generalized "
            "energy distance between each ensemble and the DDPM-1000 ensemble of the same image (0 would be the same "
            "distribution; the row with other seeds is the floor: two DDPM-1000 ensembles of one model differ too).",
            "",
            "| sampler | steps | s / ensemble | GED vs raters | CI | member foreground | GED to DDPM-1000 |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in q["rows"]:
            to_ref = "reference" if r["ged_to_ddpm1000"] is None else f"{r['ged_to_ddpm1000']:.3f}"
            m = r["mean"]
            name = f"{r['sampler']} (other seeds)" if r.get("seeds") == "other" else r["sampler"]
            lines.append(f"| {name} | {r['steps']} | {r['seconds_per_ensemble']:.1f} | {m['ged']:.3f} "
                         f"| {m['ci']:.3f} | {100 * m['member_foreground']:.2f}% | {to_ref} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    ap.add_argument("--overhead-only", action="store_true")
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--weights", type=Path, default=None, help="LIDC bundle root for part 2 (trained there if empty)")
    ap.add_argument("--num_samples", type=int, default=8)
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args(argv)
    from meddiff.io import save_json

    result = {"machine": machine_info(), "overhead": [] if args.quality_only else overhead(args.quick)}
    if args.weights and not args.overhead_only:
        result["quality"] = quality(args.weights, args.num_samples, args.quick)
    out = REPO / "bench" / "results" / f"sampling_core{'_quick' if args.quick else ''}.json"
    save_json(result, out, overwrite=True)
    print(table(result))
    if not args.no_readme and not args.quick:
        update_readme_block(BEGIN, END, "The sampling core: overhead and few-step quality", table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
