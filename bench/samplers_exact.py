"""Samplers against an exact answer: Gaussian data, whose optimal denoiser and probability-flow map are closed-form.

Data x_0 ~ N(mu, s^2) per element. Then x_t ~ N(sqrt(a) mu, a s^2 + 1 - a) (a = alpha_bar_t), the optimal network is
E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a), and the probability-flow ODE maps x_T to
x_0 = mu + s (x_T - sqrt(a_T) mu) / sqrt(a_T s^2 + 1 - a_T). With that network (float64, T = 1000, linear betas,
no clipping) the study measures the samplers alone, with no network error:

- deterministic (DDIM, DPM-Solver++(2M)): RMS error against the exact map, over x_T ~ N(0, 1);
- stochastic (respaced ancestral DDPM with fixed-small variance, SDE-DPM-Solver++(2M), and the full 1000-step DDPM
  as reference): error of the sample mean and std against mu and s, from x_T drawn from the exact q(x_T). Every
  sampler here outputs a Gaussian, so W2 = sqrt((mean - mu)^2 + (std - s)^2) is the Wasserstein-2 distance to the
  data distribution (up to sampling error). For DDPM the exact moments of the fixed-small chain are listed too.

Results go to bench/results/samplers_exact.json and a table in bench/README.md.

Usage:
    python bench/samplers_exact.py                  # about half a minute on one core
    python bench/samplers_exact.py --samples 20000  # quicker, noisier
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = (5, 10, 20, 50)


def gaussian_network(scheduler, mu: float, s: float):
    def network(x, t: int):
        a = scheduler.alpha_bar(t)
        return math.sqrt(1.0 - a) * (x - math.sqrt(a) * mu) / (a * s * s + 1.0 - a)

    return network


def run(scheduler, x, network, generator=None):
    for t, t_next in scheduler.plan():
        x, _ = scheduler.step(network(x, t), t, t_next, x, generator)
    return x


def fixed_small_moments(scheduler, mu: float, s: float) -> tuple[float, float]:
    """Exact mean and std of a fixed-small DDPM run from q(x_T) with the exact network (linear-Gaussian chain)."""
    grid = scheduler.timesteps.tolist() + [-1]
    a = scheduler.alpha_bar(grid[0])
    mean, var = math.sqrt(a) * mu, a * s * s + 1.0 - a
    for t, t_next in zip(grid, grid[1:]):
        a, a_next = scheduler.alpha_bar(t), scheduler.alpha_bar(t_next)
        beta = 1.0 - a / a_next
        gain = math.sqrt(a) * s * s / (a * s * s + 1.0 - a)
        c0, c1 = math.sqrt(a_next) * beta / (1.0 - a), math.sqrt(1.0 - beta) * (1.0 - a_next) / (1.0 - a)
        slope, offset = c0 * gain + c1, c0 * (mu - gain * math.sqrt(a) * mu)
        mean, var = slope * mean + offset, slope**2 * var + (1.0 - a_next) / (1.0 - a) * beta
    return mean, math.sqrt(var)


def study(mu: float, s: float, samples: int, flow_samples: int, seed: int) -> dict:
    import torch

    from meddiff.schedulers import make_scheduler

    deterministic = []
    x_T = torch.randn(flow_samples, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for sampler in ("ddim", "dpmpp_2m"):
        for steps in STEPS:
            scheduler = make_scheduler(sampler, steps, clip_sample=False)
            a_T = scheduler.alpha_bar(int(scheduler.timesteps[0]))
            exact = mu + s * (x_T - math.sqrt(a_T) * mu) / math.sqrt(a_T * s * s + 1.0 - a_T)
            start = time.perf_counter()
            x = run(scheduler, x_T, gaussian_network(scheduler, mu, s))
            error = x - exact
            deterministic.append(
                {
                    "sampler": sampler,
                    "steps": steps,
                    "rms_error": float(error.pow(2).mean().sqrt()),
                    "max_abs_error": float(error.abs().max()),
                    "seconds": round(time.perf_counter() - start, 3),
                }
            )

    stochastic = []
    runs = [("ddpm", n) for n in (*STEPS, 1000)] + [("dpmpp_2m_sde", n) for n in STEPS]
    for sampler, steps in runs:
        scheduler = make_scheduler(sampler, steps, clip_sample=False)
        generator = torch.Generator().manual_seed(seed + 1)
        a_T = scheduler.alpha_bar(int(scheduler.timesteps[0]))
        z = torch.randn(samples, 1, dtype=torch.float64, generator=generator)
        start = time.perf_counter()
        x = run(
            scheduler,
            math.sqrt(a_T) * mu + math.sqrt(a_T * s * s + 1.0 - a_T) * z,
            gaussian_network(scheduler, mu, s),
            generator,
        )
        mean_error, std_error = float(x.mean()) - mu, float(x.std()) - s
        row = {
            "sampler": sampler,
            "steps": steps,
            "mean_error": mean_error,
            "std_error": std_error,
            "w2": math.hypot(mean_error, std_error),
            "seconds": round(time.perf_counter() - start, 3),
        }
        if sampler == "ddpm":
            exact_mean, exact_std = fixed_small_moments(scheduler, mu, s)
            row["exact_mean_error"], row["exact_std_error"] = exact_mean - mu, exact_std - s
        stochastic.append(row)
    return {"deterministic": deterministic, "stochastic": stochastic}


def markdown(result: dict) -> str:
    settings = result["settings"]
    mu, s, n = settings["mu"], settings["s"], settings["samples"]
    by_key = {(r["sampler"], r["steps"]): r for r in result["deterministic"]}
    lines = [
        f"Deterministic: RMS error against the exact probability-flow map (data N({mu}, {s}^2), "
        f"{settings['flow_samples']} x_T ~ N(0, 1), exact network, T = 1000 linear betas).",
        "",
        "| sampler | " + " | ".join(f"{k} steps" for k in STEPS) + " |",
        "|---|" + "---:|" * len(STEPS),
    ]
    for sampler, label in (("ddim", "DDIM"), ("dpmpp_2m", "DPM-Solver++(2M)")):
        lines.append(f"| {label} | " + " | ".join(f"{by_key[(sampler, k)]['rms_error']:.2e}" for k in STEPS) + " |")
    se_mean, se_std = s / math.sqrt(n), s / math.sqrt(2 * n)
    lines += [
        "",
        f"Stochastic: sample mean - mu, std - s and W2 to the data distribution over {n} samples from the exact "
        f"q(x_T) (standard errors {se_mean:.4f} and {se_std:.4f}); for DDPM, the exact std error of its chain.",
        "",
        "| sampler | steps | mean - mu | std - s | W2 | exact std - s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"ddpm": "DDPM (fixed-small, respaced)", "dpmpp_2m_sde": "SDE-DPM-Solver++(2M)"}
    for r in result["stochastic"]:
        exact = f"{r['exact_std_error']:+.4f}" if "exact_std_error" in r else ""
        lines.append(
            f"| {names[r['sampler']]} | {r['steps']} | {r['mean_error']:+.4f} | {r['std_error']:+.4f} "
            f"| {r['w2']:.4f} | {exact} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mu", type=float, default=0.3, help="data mean")
    ap.add_argument("--s", type=float, default=0.5, help="data standard deviation")
    ap.add_argument("--samples", type=int, default=200000, help="samples per stochastic sampler")
    ap.add_argument("--flow-samples", type=int, default=4096, help="x_T values for the deterministic samplers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "samplers_exact.json"), help="result JSON")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO / "shared"))
    import torch
    from common import machine_info, update_readme_block

    from meddiff.io import save_json

    torch.set_num_threads(1)
    settings = {
        "mu": args.mu,
        "s": args.s,
        "samples": args.samples,
        "flow_samples": args.flow_samples,
        "seed": args.seed,
        "num_train_timesteps": 1000,
        "schedule": "linear_beta",
        "dtype": "float64",
        "clip_sample": False,
    }
    result = {"machine": machine_info(), "settings": settings}
    result.update(study(args.mu, args.s, args.samples, args.flow_samples, args.seed))
    result["markdown"] = markdown(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(result, out, overwrite=True)
    print(result["markdown"])
    print(f"\nwrote {out}")
    if not args.no_readme:
        update_readme_block(
            "<!-- samplers_exact:tables:begin -->",
            "<!-- samplers_exact:tables:end -->",
            "Samplers against exact answers (Gaussian data): `bench/samplers_exact.py`",
            result["markdown"],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
