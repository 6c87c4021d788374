"""Summary and README tables of `bench/seg_guided.py` results (seed way vs meddiff, fp32 vs fast path).

Run as a script to regenerate the README block from stored results without rerunning the benchmark:

    python bench/seg_guided_report.py [bench/results/seg_guided.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# each row's own precision: fp32 runs are measured against the fp32 matmul peak, bf16 runs against the bf16 one
BF16_VARIANTS = ("fast", "bf16")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def _precision(r: dict) -> str:
    """The compute precision of one run ("fp32" or "bf16"), from its variant."""
    return "bf16" if r["job"]["variant"] in BF16_VARIANTS else "fp32"


def loss_vs_fp32(tr: dict[str, dict]) -> dict[str, float]:
    """Relative difference of each meddiff run's last-step training loss from meddiff fp32's (same data and seed)."""
    ref = tr["meddiff_fp32"]["final_loss"]
    return {k: (r["final_loss"] - ref) / ref for k, r in tr.items() if k.startswith("meddiff_")}


def training_bar(rt: dict[str, float | None]) -> dict[str, Any]:
    """Issue 5's training bar for one size: the bundle's default training (bf16 autocast, NCHW) >= 2x the seed."""
    default = rt["seed_fp32 / meddiff_bf16 (NCHW)"]
    return {
        "seed_fp32_over_bundle_default": default,
        "seed_fp32_over_meddiff_fast_channels_last": rt["seed_fp32 / meddiff_fast"],
        "seed_fp32_malloc_over_meddiff_fast": rt.get("seed_fp32_malloc / meddiff_fast"),
        "met": default is not None and default >= 2.0,
    }


def summarize(raw: dict[str, dict], cfg: dict) -> dict:
    """Attach FLOP/s and fractions of peak to each run, and compute the seed/meddiff ratios."""
    peak = raw["peak_flops"]
    p32, p16 = peak["matmul"]["fp32"]["gflops"], peak["matmul"]["bf16"]["gflops"]
    c32, c16 = peak["conv"]["fp32"]["gflops"], peak["conv"]["bf16_channels_last"]["gflops"]
    flops = peak["flops"]
    training: dict[str, dict] = {}
    sampling: dict[str, dict] = {}
    ratios: dict[str, dict] = {}
    bar: dict[str, Any] = {"threshold": 2.0, "per_size": {}}
    for size in cfg["sizes"]:
        s = str(size)
        tr = {k.split(f"train_{size}_", 1)[1]: v for k, v in raw.items() if k.startswith(f"train_{size}_")}
        sa = {k.split(f"sample_{size}_", 1)[1]: v for k, v in raw.items() if k.startswith(f"sample_{size}_")}
        for r in tr.values():
            impl = r["job"]["impl"]
            gf = flops[impl][s]["fwd_bwd_gflop_train_batch"] / (r["fwd_s"] + r["bwd_clip_s"])
            ref, cref = (p16, c16) if _precision(r) == "bf16" else (p32, c32)
            r.update(
                {
                    "fwd_bwd_gflops": gf,
                    "fraction_of_matching_matmul_peak": gf / ref,
                    "fraction_of_matching_conv_peak": gf / cref,
                }
            )
        for r in sa.values():
            impl = r["job"]["impl"]
            gf = flops[impl][s]["fwd_gflop_sample_batch"] / r["forward_s_median"]
            ref, cref = (p16, c16) if _precision(r) == "bf16" else (p32, c32)
            r.update(
                {
                    "forward_gflops": gf,
                    "fraction_of_matching_matmul_peak": gf / ref,
                    "fraction_of_matching_conv_peak": gf / cref,
                }
            )
        training[s], sampling[s] = tr, sa
        seed_t = tr["seed_fp32"]["step_s_median"]
        rt = {
            "seed_fp32 / meddiff_fp32": _ratio(seed_t, tr["meddiff_fp32"]["step_s_median"]),
            "seed_fp32 / meddiff_fast": _ratio(seed_t, tr["meddiff_fast"]["step_s_median"]),
            "seed_fp32 / meddiff_bf16 (NCHW)": _ratio(seed_t, tr["meddiff_bf16"]["step_s_median"]),
        }
        if "seed_fp32_malloc" in tr:
            t_m = tr["seed_fp32_malloc"]["step_s_median"]
            rt["seed_fp32_malloc / meddiff_fp32_malloc"] = _ratio(t_m, tr["meddiff_fp32_malloc"]["step_s_median"])
            rt["seed_fp32_malloc / meddiff_fast"] = _ratio(t_m, tr["meddiff_fast"]["step_s_median"])
        per_image = {k: v["ddim_s_per_image"] for k, v in sa.items()}
        ddpm = {k: v["ddpm_s_per_image"] for k, v in sa.items()}
        rs = {
            "DDIM-50: seed_fp32 / meddiff_fp32": _ratio(per_image["seed_fp32"], per_image["meddiff_fp32"]),
            "DDIM-50: seed_fp32 / meddiff_fast": _ratio(per_image["seed_fp32"], per_image["meddiff_fast"]),
            "DDPM-1000: seed_fp32 / meddiff_fp32": _ratio(ddpm["seed_fp32"], ddpm["meddiff_fp32"]),
            "DDPM-1000: seed_fp32 / meddiff_fast": _ratio(ddpm["seed_fp32"], ddpm["meddiff_fast"]),
            "seed DDPM-1000 / meddiff_fast DDIM-50": _ratio(ddpm["seed_fp32"], per_image["meddiff_fast"]),
        }
        ratios[s] = {
            "training_step": rt,
            "sampling_per_image": rs,
            "last_step_loss_rel_vs_meddiff_fp32": loss_vs_fp32(tr),
        }
        bar["per_size"][s] = training_bar(rt)
    bar["met"] = all(v["met"] for v in bar["per_size"].values())
    return {
        "peak": {
            "fp32_matmul_gflops": p32,
            "bf16_matmul_gflops": p16,
            "fp32_conv_gflops": c32,
            "bf16_channels_last_conv_gflops": c16,
            "matmul": peak["matmul"],
            "conv": peak["conv"],
            "foreign_cpu_fraction": peak.get("foreign_cpu_fraction"),
        },
        "networks": flops,
        "training": training,
        "sampling": sampling,
        "ratios": ratios,
        "issue5_training_2x_bar": bar,
        "attention": raw.get("attention"),
    }


def _f(x: float | None, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _own_peak(r: dict, pk: dict, gflops: float) -> str:
    """Achieved GFLOP/s as a percentage of the matmul peak of the run's own precision, e.g. '70% bf16'."""
    prec = _precision(r)
    return f"{100 * gflops / pk[f'{prec}_matmul_gflops']:.0f}% {prec}"


TRAIN_NAMES = {
    "seed_fp32": "seed (diffusers, fp32)",
    "seed_fp32_malloc": "seed fp32 + malloc setting",
    "meddiff_fp32": "meddiff fp32 (bundle, fused AdamW)",
    "meddiff_fp32_malloc": "meddiff fp32 + malloc setting",
    "meddiff_bf16": "**meddiff bf16 autocast, NCHW** (fused AdamW + malloc): bundle default",
    "meddiff_fast": "meddiff fast (bf16 autocast + CL + fused AdamW + malloc)",
}
SAMPLE_NAMES = {
    "seed_fp32": "seed (diffusers, fp32)",
    "meddiff_fp32": "meddiff fp32",
    "meddiff_fast": "**meddiff fast** (bf16 weights + CL + malloc): bundle default",
}


def _train_quality(key: str, tr: dict[str, dict]) -> str:
    """What this run measured of quality for one training row, next to its speed ratio (note ¹ explains)."""
    if key == "seed_fp32":
        return "reference"
    if key.endswith("_malloc"):
        twin = key.removesuffix("_malloc")
        a, b = tr[key]["final_loss"], tr[twin]["final_loss"]
        how = "identical to" if a == b else f"{(a - b) / b:+.1e} rel. vs"
        vs_seed = "" if twin == "seed_fp32" else "vs seed: none; "
        return f"{vs_seed}last-step loss {how} {twin.replace('_', ' ')}¹"
    if key == "meddiff_fp32":
        return "none vs the seed¹"
    return f"vs seed: none; vs meddiff fp32: last-step loss {loss_vs_fp32(tr)[key]:+.1e} rel.¹"


def _sample_quality(key: str, r: dict) -> str:
    """What this run measured of quality for one sampling row (note ² explains)."""
    finite = "output finite" if r.get("output_finite") else "output NOT finite"
    return f"reference; {finite}²" if key == "seed_fp32" else f"none: untrained weights, {finite}²"


def render_markdown(res: dict) -> str:
    """The README tables for these results."""
    cfg, m, pk = res["config"], res["machine"], res["peak"]
    flags = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if m.get(f))
    no_flags = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in m and not m[f])
    lines = [
        f"Run {m['date']}: {m['cpu_count']} CPU cores ({m['cpu_model'] or 'unknown CPU'}; flags seen: "
        f"{flags or 'none of avx512f/avx512_bf16/amx_bf16'}{f'; no {no_flags}' if no_flags else ''}), "
        f"torch {m['torch']}, monai {m['monai']}, diffusers {m['diffusers']}; whole run "
        f"{res['total_wall_s'] / 60:.1f} min. All ratios are between configurations measured side by side in this "
        f"run. Network: {res['networks']['meddiff']['params']:,} params (bundle, 1 image + 3 one-hot mask channels "
        f"in) vs {res['networks']['seed']['params']:,} (seed, 1 + 1 merged channel in).",
        "",
        f"**Training** (batch {cfg['train_batch']}; median of {'/'.join(map(str, cfg['train_steps'].values()))} "
        f"steps after {cfg['train_warmup']} warm-up step(s); step = noise + forward + MSE + backward + clip + AdamW; "
        "synthetic random images and masks):",
        "",
        "| size | variant | s/step (fwd / bwd+clip / opt) | images/s | GFLOP/s (fwd+bwd) | % of own-precision "
        "matmul peak | peak RSS MiB | last-step loss | seed fp32 ÷ this | quality measured at these settings |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, tr in res["training"].items():
        seed_t = tr["seed_fp32"]["step_s_median"]
        for key, label in TRAIN_NAMES.items():
            if key not in tr:
                continue
            r = tr[key]
            lines.append(
                f"| {s}² | {label} | {_f(r['step_s_median'])} ({_f(r['fwd_s'])} / {_f(r['bwd_clip_s'])} / "
                f"{_f(r['opt_s'])}) | {_f(r['images_per_s'])} | {r['fwd_bwd_gflops']:.0f} | "
                f"{_own_peak(r, pk, r['fwd_bwd_gflops'])} | {r['vmhwm_mib']:.0f} | {r['final_loss']:.4f} | "
                f"**{_f(seed_t / r['step_s_median'])}** | {_train_quality(key, tr)} |"
            )
    steps = " and ".join(f"{cfg['train_warmup'] + n} ({s}²)" for s, n in cfg["train_steps"].items())
    lines += [
        "",
        "¹ Quality at these settings: no model was trained to convergence and no image or Dice quality was measured "
        "in this run. *Last-step loss* is the training MSE of the last step, after "
        f"{steps} optimizer steps from initialisation; every meddiff row has the same synthetic data and seed. So "
        "equal losses show that the bf16 step (either layout) and the malloc setting compute the same loss as meddiff "
        "fp32 at that point, not that bf16 training reaches an equally good model. Seed and meddiff losses are not "
        "comparable (different initialisation and random draws): seed ÷ meddiff compares time per step of the same "
        "architecture, not quality. Outside this run, `tests/test_fast_path.py::test_bf16_training_step_close_to_fp32` "
        "(tiny 8/16-channel network trained 4 epochs on 16² phantoms; bf16 autocast + channels_last) requires the bf16 "
        "noise prediction to be within an MSE of 1 % of the fp32 prediction's mean square.",
    ]
    bar = res["issue5_training_2x_bar"]
    per = ", ".join(
        f"{s}²: {_f(v['seed_fp32_over_bundle_default'])}× (with channels_last: "
        f"{_f(v['seed_fp32_over_meddiff_fast_channels_last'])}×)"
        for s, v in bar["per_size"].items()
    )
    worst = max(abs(loss_vs_fp32(tr)["meddiff_bf16"]) for tr in res["training"].values())
    lines += [
        "",
        f"Issue 5 bar (training step ≥ 2× faster than the seed), with the bundle's default training (bf16 autocast, "
        f"NCHW): **{'met' if bar['met'] else 'NOT met'}**; {per}. Quality at these settings: last-step loss within "
        f"{worst:.1e} (relative) of meddiff fp32's; no trained-model quality measured (¹).",
        "",
    ]
    n_ddpm = next(iter(next(iter(res["sampling"].values())).values()))["ddpm_extrapolated_from_steps"]
    lines += [
        f"**Sampling** (batch {cfg['sample_batch']}, seconds per image; DDIM-{cfg['ddim_steps']} run in full; "
        f"DDPM-{cfg['ddpm_steps']} **extrapolated** = median per-step time over {n_ddpm} steps of the real loop × "
        f"{cfg['ddpm_steps']}):",
        "",
        f"| size | variant | DDIM-{cfg['ddim_steps']} s/image | s/step | DDPM-{cfg['ddpm_steps']} s/image (extrap.) | "
        "fwd GFLOP/s | % of own-precision matmul peak | peak RSS MiB | seed DDIM ÷ this DDIM | seed DDPM ÷ this DDPM "
        "| quality measured at these settings |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cost = []
    for s, sa in res["sampling"].items():
        seed = sa["seed_fp32"]
        for key, label in SAMPLE_NAMES.items():
            r = sa[key]
            lines.append(
                f"| {s}² | {label} | {_f(r['ddim_s_per_image'], 1)} | {_f(r['ddim_step_s_median'], 3)} | "
                f"{_f(r['ddpm_s_per_image'], 0)} ({r['ddpm_s_per_image'] / 60:.1f} min) | {r['forward_gflops']:.0f} | "
                f"{_own_peak(r, pk, r['forward_gflops'])} | {r['vmhwm_mib']:.0f} | "
                f"**{_f(seed['ddim_s_per_image'] / r['ddim_s_per_image'])}** | "
                f"{_f(seed['ddpm_s_per_image'] / r['ddpm_s_per_image'])} | {_sample_quality(key, r)} |"
            )
        cost.append(f"{seed['ddpm_s_per_image'] / sa['meddiff_fast']['ddim_s_per_image']:.0f}× at {s}²")
    lines += [
        "",
        f"² Quality at these settings: none measured. The sampling runs use untrained weights (the networks as built, "
        f"no checkpoint) and check only that the DDIM-{cfg['ddim_steps']} output is finite; DDPM-{cfg['ddpm_steps']} "
        f"is extrapolated from {n_ddpm} steps and never run to the end. The bundle's DDIM uses the trailing timestep "
        "grid and the seed's diffusers DDIM the leading one, so even DDIM ÷ DDIM compares slightly different "
        "samplers. Outside this run, `tests/test_fast_path.py::test_bf16_matches_fp32_on_trained_model` (tiny "
        "network trained 4 epochs on 16² phantoms, DDIM-10, same weights and seed) requires a mean |bf16 − fp32| "
        "pixel difference below 0.05 on the [-1, 1] scale and a faithfulness Dice within max(0.05, 2 × its spread "
        "over 3 fp32 seeds) of fp32's.",
        "",
        f"Seed DDPM-{cfg['ddpm_steps']} (extrapolated) ÷ meddiff fast DDIM-{cfg['ddim_steps']}, per image: "
        f"{', '.join(cost)}. This is a ratio of costs, **not a speed-up**: DDIM-{cfg['ddim_steps']} and "
        f"DDPM-{cfg['ddpm_steps']} sample different distributions unless a quality measurement shows otherwise, and "
        "none was made at these settings (²). The CIMD section below compares the two samplers' outputs on the same "
        "weights for the LIDC bundle's network.",
        "",
        f"Machine peaks measured in the same run: fp32 matmul {pk['fp32_matmul_gflops']:.0f} GFLOP/s, bf16 matmul "
        f"{pk['bf16_matmul_gflops']:.0f} GFLOP/s ({cfg['matmul_n']}³); each row's percentage is against the peak of "
        "its own precision (fp32 rows: fp32 peak; bf16 rows: bf16 peak). FLOPs from `FlopCounterMode` (conv, "
        "matmul, attention; GroupNorm/SiLU/adds not counted). Peak RSS = VmHWM of the configuration's own "
        f"subprocess. Conv ceilings (3×3, batch/channels/size {pk['conv']['fp32']['shape'][:3]}): "
        f"fp32 {pk['fp32_conv_gflops']:.0f}, "
        f"bf16 channels_last {pk['bf16_channels_last_conv_gflops']:.0f} GFLOP/s. Benchmark time (accepted runs): "
        f"{res['measured_wall_s'] / 60:.1f} min.",
    ]
    att = res.get("attention")
    if att:
        sz = att["size"]
        lines += [
            "",
            f"`use_flash_attention` (bundle network, {sz}² b1 forward; training fwd+bwd at {sz // 2}² "
            f"b{cfg['train_batch']}, bf16 autocast + CL): max |Δ| fp32 = {att['fp32_max_abs_diff']:.1e} "
            f"(output max |y| = {att['fp32_output_max_abs']:.2f}; the bf16 outputs were not compared); "
            + "; ".join(
                f"{k.replace('_flash_True_s', '')}: {att[k]:.3f} s on / {att[k.replace('True', 'False')]:.3f} s off"
                for k in att
                if k.endswith("_flash_True_s")
            )
            + ".",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Regenerate the README block of `bench/seg_guided.py` from a stored result JSON (no benchmark is run)."""
    from seg_guided import RESULTS, update_readme

    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else RESULTS / "seg_guided.json"
    res = json.loads(path.read_text())
    table = render_markdown(res)
    if res.get("quick"):
        print(table)
        print(f"{path} is a --quick result: bench/README.md left as it is")
        return 0
    update_readme(table)
    print(f"bench/README.md: block regenerated from {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
