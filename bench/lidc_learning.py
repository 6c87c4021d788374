"""Does CIMD learn on real data here? Train on the real LIDC crops, score ensembles against trivial baselines.

One run (issue 9):
1. trains the LIDC bundle (its own `train.json`, a stated small network at `--img_size`) on the 19 real training
   crops in ../shared/data/lidc_crops, once per design: the paper's (no latent into the denoiser, encoders trained
   through their KL) and the cVAE variant (the latent injected); the cVAE's collapse diagnostics are recorded;
2. samples 16-member ensembles for every real test crop with the same weights and each sampler (respaced ancestral
   DDPM at several step counts, DDPM 1000 as the seed samples, deterministic DDIM for reference) and scores them
   against the 4 raters: GED, CI (and parts), member foreground (share of pixels the members mark);
3. scores two trivial baselines the same way: all-empty members, and the 4 raters of the training crop nearest to
   the test image (L2 on the image at `--img_size`), repeated 4 times to 16 members, since GED includes the
   diagonal terms and so depends on N;
4. measures the GED's own noise: the default sampler repeated with other seeds.
Results go to bench/results/lidc_learning.json and a table in bench/README.md.

Usage:
    python bench/lidc_learning.py            # about 45 minutes on 2 CPU cores
    python bench/lidc_learning.py --quick    # smoke run (a few minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import bundle_network, machine_info, train_bundle, update_readme_block

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "lidc_ambiguous_segmentation" / "configs"
CROPS = REPO.parent / "shared" / "data" / "lidc_crops" / "data"
BEGIN, END = "<!-- lidc_learning:tables:begin -->", "<!-- lidc_learning:tables:end -->"
NETWORK = {
    "network_channels": [32, 64, 64],
    "attention_levels": [False, False, True],
    "num_res_blocks": 1,
    "num_head_channels": 64,
    "norm_num_groups": 16,
    "encoder_channels": [16, 32, 64],
    "encoder_convs_per_block": 2,
}
SAMPLERS = [("ddpm", 25), ("ddpm", 50), ("ddpm", 100), ("ddpm", 1000), ("ddim", 25)]
DEFAULT = ("ddpm", 50)
NOISE_SEEDS = 3


def score(members: np.ndarray, references: np.ndarray) -> dict:
    """GED, CI (and parts) and member foreground of one ensemble against the raters."""
    from meddiff.metrics import ci_score, generalized_energy_distance

    return {
        "ged": generalized_energy_distance(members, references),
        **ci_score(members, references),
        "member_foreground": float(members.mean()),
        "rater_foreground": float(references.mean()),
    }


def mean_scores(per_image: dict) -> dict:
    keys = next(iter(per_image.values())).keys()
    return {k: float(np.mean([s[k] for s in per_image.values()])) for k in keys}


def sample_rows(network, cases: list, samplers: list, num_samples: int, seed_offset: int = 0) -> list[dict]:
    """Per sampler: the mean scores over the test crops and seconds per ensemble, with the same weights."""
    import torch

    from meddiff.inferers import EnsembleSamplingInferer

    rows = []
    for sampler, steps in samplers:
        inferer = EnsembleSamplingInferer(
            num_samples=num_samples, sampler=sampler, num_inference_steps=steps, output="samples", precision="fp32"
        )
        per_image, seconds = {}, []
        for i, case in enumerate(cases):
            start = time.perf_counter()
            members = inferer(torch.from_numpy(case["image"])[None], network, seed=seed_offset + i)[0]
            seconds.append(time.perf_counter() - start)
            per_image[case["name"]] = score(members.numpy().astype(bool), case["label"].astype(bool))
        rows.append({"sampler": sampler, "steps": steps, "seconds_per_ensemble": float(np.mean(seconds)),
                     "mean": mean_scores(per_image), "per_image": per_image})  # fmt: skip
        print(f"  {sampler}-{steps}: {rows[-1]['mean']}", flush=True)
    return rows


def baselines(cases: list, train_cases: list, num_samples: int) -> list[dict]:
    """All-empty members, and the nearest training crop's raters repeated to `num_samples` members."""
    empty, nearest = {}, {}
    train_images = np.stack([c["image"].ravel() for c in train_cases])
    for case in cases:
        refs = case["label"].astype(bool)
        empty[case["name"]] = score(np.zeros((num_samples, *refs.shape[1:]), bool), refs)
        j = int(np.argmin(((train_images - case["image"].ravel()) ** 2).sum(axis=1)))
        raters = train_cases[j]["label"].astype(bool)
        nearest[case["name"]] = score(np.resize(raters, (num_samples, *raters.shape[1:])), refs)
    return [
        {"sampler": "baseline: all-empty members", "mean": mean_scores(empty), "per_image": empty},
        {"sampler": "baseline: nearest training crop's raters", "mean": mean_scores(nearest), "per_image": nearest},
    ]


def table(result: dict) -> str:
    lines = [
        f"Real LIDC crops ({result['num_train_images']} training, {len(result['test_images'])} test), resized to "
        f"{result['img_size']}x{result['img_size']}; {result['num_samples']}-member ensembles; network "
        f"{result['network']['network_channels']} channels. {result['machine']['cpu_count']} CPU cores "
        f"({result['machine']['cpu_model']}), torch {result['machine']['torch']}. GED noise (std of the default "
        f"sampler {DEFAULT[0]}-{DEFAULT[1]} over {NOISE_SEEDS} seeds, paper design): {result['ged_noise']:.3f}.",
        "",
        "| design | trained | sampler | steps | s / ensemble | GED (lower better) | CI | S_c | D_max | D_a | "
        "member foreground | rater foreground |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for design in result["designs"]:
        for row in design["rows"]:
            m = row["mean"]
            steps = row.get("steps", "")
            secs = f"{row['seconds_per_ensemble']:.1f}" if "seconds_per_ensemble" in row else ""
            lines.append(
                f"| {design['design']} | {design['train_seconds'] / 60:.0f} min | {row['sampler']} | {steps} | {secs} "
                f"| {m['ged']:.3f} | {m['ci']:.3f} | {m['s_c']:.3f} | {m['d_max']:.3f} | {m['d_a']:.3f} | "
                f"{100 * m['member_foreground']:.2f}% | {100 * m['rater_foreground']:.2f}% |"
            )
    for row in result["baselines"]:
        m = row["mean"]
        lines.append(
            f"| — | — | {row['sampler']} | | | {m['ged']:.3f} | {m['ci']:.3f} | {m['s_c']:.3f} | {m['d_max']:.3f} | "
            f"{m['d_a']:.3f} | {100 * m['member_foreground']:.2f}% | {100 * m['rater_foreground']:.2f}% |"
        )
    for design in result["designs"]:
        if design.get("diagnostics"):
            lines += ["", f"{design['design']} diagnostics after training: {design['diagnostics']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    ap.add_argument("--img_size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=600, help="training epochs on the 19 real training crops")
    ap.add_argument("--designs", nargs="+", default=["paper", "cvae"])
    ap.add_argument("--num_samples", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--merge", action="store_true", help="add the designs run now to the existing results file")
    ap.add_argument("--keep", type=Path, default=None, help="keep each trained bundle root under KEEP/<design>")
    args = ap.parse_args(argv)
    from meddiff.precision import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()
    if not CROPS.is_dir():
        print(f"{CROPS} is absent: this benchmark needs the real LIDC crops beside the checkout.")
        return 1
    from meddiff.data.lidc import load_lidc_cases
    from meddiff.io import save_json

    img_size = 32 if args.quick else args.img_size
    network = dict(NETWORK, network_channels=[8, 16], attention_levels=[False, True], norm_num_groups=8,
                   num_head_channels=16, encoder_channels=[4, 8]) if args.quick else NETWORK  # fmt: skip
    samplers = [("ddpm", 5), ("ddpm", 50), ("ddim", 5)] if args.quick else SAMPLERS
    default = ("ddpm", 5) if args.quick else DEFAULT
    train_settings = {**network, "img_size": img_size, "num_epochs": 2 if args.quick else args.epochs,
                      "batch_size": 8, "learning_rate": 5e-4, "diagnostics_interval": 200}  # fmt: skip
    cases = load_lidc_cases(CROPS, "testing", img_size, progress=False)
    train_cases = load_lidc_cases(CROPS, "training", img_size, progress=False)
    result = {"machine": machine_info(), "img_size": img_size, "num_samples": args.num_samples, "network": network,
              "train_settings": train_settings, "num_train_images": len(train_cases),
              "test_images": [c["name"] for c in cases], "designs": []}  # fmt: skip
    out = (
        Path(args.out)
        if args.out
        else REPO / "bench" / "results" / f"lidc_learning{'_quick' if args.quick else ''}.json"
    )
    if args.merge and out.is_file():
        earlier = json.loads(out.read_text())
        result["designs"] = [d for d in earlier["designs"] if d["design"] not in args.designs]
        result["earlier_runs"] = {d["design"]: earlier["machine"] for d in result["designs"]}
        for key in ("ged_noise", "ged_noise_samples", "ci_noise", "ci_noise_samples"):
            if key in earlier and "paper" not in args.designs:
                result[key] = earlier[key]
    for design in args.designs:
        with _bundle_root(args.keep, design) as tmp:
            print(f"training the {design} design ...", flush=True)
            seconds = train_bundle(BUNDLE, Path(tmp), CROPS, {**train_settings, "cimd_design": design})
            print(f"trained in {seconds:.0f} s; sampling ...", flush=True)
            net_settings = {**network, "img_size": img_size, "cimd_design": design}
            if args.keep:
                save_json(net_settings, Path(tmp) / "bench_settings.json", overwrite=True)
            net = bundle_network(BUNDLE, Path(tmp), net_settings)
            rows = sample_rows(net, cases, samplers if design == "paper" else [default], args.num_samples)
            entry = {"design": design, "train_seconds": seconds, "rows": rows}
            if design == "paper":
                noise = [r["mean"]["ged"] for r in rows if (r["sampler"], r["steps"]) == default]
                for k in range(1, NOISE_SEEDS):
                    noise.append(sample_rows(net, cases, [default], args.num_samples, 1000 * k)[0]["mean"]["ged"])
                result["ged_noise_samples"], result["ged_noise"] = noise, float(np.std(noise))
            entry["diagnostics"] = _diagnostics(net, train_cases)
            result["designs"].append(entry)
    result["baselines"] = baselines(cases, train_cases, args.num_samples)
    result["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    result["designs"].sort(key=lambda d: d["design"] != "paper")
    save_json(result, out, overwrite=True)
    print(table(result))
    if not args.no_readme and not args.quick:
        update_readme_block(BEGIN, END, "Does CIMD learn on real crops? `bench/lidc_learning.py`", table(result))
    return 0


def _bundle_root(keep: Path | None, design: str):
    """A temporary bundle root, or KEEP/<design> (kept, with the settings to rebuild its network)."""
    if keep is None:
        return tempfile.TemporaryDirectory()
    root = keep / design
    root.mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(str(root))


def _diagnostics(network, train_cases: list) -> dict:
    """The network's latent diagnostics on all training crops (rater 0), at t = 100 and 500."""
    import torch

    from meddiff.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(1000)
    image = torch.from_numpy(np.stack([c["image"] for c in train_cases])).float()
    mask = torch.from_numpy(np.stack([c["label"][:1] for c in train_cases])).float() * 2 - 1
    found = {}
    for t in (100, 500):
        g = torch.Generator().manual_seed(t)
        noise = torch.randn(mask.shape, generator=g)
        timesteps = torch.full((mask.shape[0],), t, dtype=torch.long)
        noisy = scheduler.add_noise(mask, noise, timesteps)
        d = network.diagnostics(noisy, timesteps, image, mask, noise, scheduler.alphas_cumprod[timesteps], g)
        found[f"t={t}"] = {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]) for k, v in d.items()}
    return found


if __name__ == "__main__":
    sys.exit(main())
