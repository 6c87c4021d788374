"""Summary and README tables of `bench/seg_guided.py` results (seed way vs meddiff, fp32 vs fast path)."""

from __future__ import annotations

from typing import Any


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


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
            ref, cref = (p32, c32) if r["job"]["variant"] == "fp32" else (p16, c16)
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
            r.update({"forward_gflops": gf, "fraction_of_fp32_peak": gf / p32, "fraction_of_bf16_peak": gf / p16})
            r["fraction_of_matching_conv_peak"] = gf / (c16 if r["job"]["variant"] == "fast" else c32)
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
        ratios[s] = {"training_step": rt, "sampling_per_image": rs}
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


def render_markdown(res: dict) -> str:
    """The README tables for these results."""
    cfg, m, pk = res["config"], res["machine"], res["peak"]
    lines = [
        f"Run {m['date']}: {m['cpu_count']} CPU cores ({m['cpu_model'] or 'unknown CPU'}), torch {m['torch']}, "
        f"monai {m['monai']}, diffusers {m['diffusers']}; whole run {res['total_wall_s'] / 60:.1f} min. "
        f"Network: {res['networks']['meddiff']['params']:,} params (bundle, 1 image + 3 one-hot mask channels in) vs "
        f"{res['networks']['seed']['params']:,} (seed, 1 + 1 merged channel in).",
        "",
        f"**Training** (batch {cfg['train_batch']}; median of {'/'.join(map(str, cfg['train_steps'].values()))} "
        f"steps after {cfg['train_warmup']} warm-up step(s); step = noise + forward + MSE + backward + clip + AdamW):",
        "",
        "| size | variant | s/step (fwd / bwd+clip / opt) | images/s | GFLOP/s (fwd+bwd) | % of matmul peak | "
        "peak RSS MiB | seed fp32 ÷ this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "seed_fp32": "seed (diffusers, fp32)",
        "seed_fp32_malloc": "seed fp32 + malloc setting",
        "meddiff_fp32": "meddiff fp32 (bundle, fused AdamW)",
        "meddiff_fp32_malloc": "meddiff fp32 + malloc setting",
        "meddiff_fast": "**meddiff fast** (bf16 autocast + CL + fused AdamW + malloc)",
        "meddiff_bf16": "meddiff bf16 autocast, NCHW (fused AdamW + malloc)",
    }
    for s, tr in res["training"].items():
        seed_t = tr["seed_fp32"]["step_s_median"]
        for key in names:
            if key not in tr:
                continue
            r = tr[key]
            lines.append(
                f"| {s}² | {names[key]} | {_f(r['step_s_median'])} ({_f(r['fwd_s'])} / {_f(r['bwd_clip_s'])} / "
                f"{_f(r['opt_s'])}) | {_f(r['images_per_s'])} | {r['fwd_bwd_gflops']:.0f} | "
                f"{100 * r['fraction_of_matching_matmul_peak']:.0f}% {'fp32' if 'fp32' in key else 'bf16'} | "
                f"{r['vmhwm_mib']:.0f} | **{_f(seed_t / r['step_s_median'])}** |"
            )
    bar = res["issue5_training_2x_bar"]
    per = ", ".join(
        f"{s}²: {_f(v['seed_fp32_over_bundle_default'])}× (with channels_last: "
        f"{_f(v['seed_fp32_over_meddiff_fast_channels_last'])}×)"
        for s, v in bar["per_size"].items()
    )
    lines += [
        "",
        f"Issue 5 bar (training step ≥ 2× faster than the seed), with the bundle's default training (bf16 autocast, "
        f"NCHW): **{'met' if bar['met'] else 'NOT met'}**; {per}.",
        "",
    ]
    n_ddpm = next(iter(next(iter(res["sampling"].values())).values()))["ddpm_extrapolated_from_steps"]
    lines += [
        f"**Sampling** (batch {cfg['sample_batch']}, seconds per image; DDIM-{cfg['ddim_steps']} run in full; "
        f"DDPM-{cfg['ddpm_steps']} **extrapolated** = median per-step time over {n_ddpm} steps of the real loop × "
        f"{cfg['ddpm_steps']}):",
        "",
        "| size | variant | DDIM-50 s/image | s/step | DDPM-1000 s/image (extrap.) | fwd GFLOP/s | % fp32 peak | "
        "% bf16 peak | peak RSS MiB | seed DDIM ÷ this DDIM | seed DDPM ÷ this DDPM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    snames = {
        "seed_fp32": "seed (diffusers, fp32)",
        "meddiff_fp32": "meddiff fp32",
        "meddiff_fast": "**meddiff fast** (bf16 weights + CL + malloc)",
    }
    for s, sa in res["sampling"].items():
        seed = sa["seed_fp32"]
        for key, label in snames.items():
            r = sa[key]
            lines.append(
                f"| {s}² | {label} | {_f(r['ddim_s_per_image'], 1)} | {_f(r['ddim_step_s_median'], 3)} | "
                f"{_f(r['ddpm_s_per_image'], 0)} ({r['ddpm_s_per_image'] / 60:.1f} min) | {r['forward_gflops']:.0f} | "
                f"{100 * r['fraction_of_fp32_peak']:.0f}% | {100 * r['fraction_of_bf16_peak']:.0f}% | "
                f"{r['vmhwm_mib']:.0f} | **{_f(seed['ddim_s_per_image'] / r['ddim_s_per_image'])}** | "
                f"{_f(seed['ddpm_s_per_image'] / r['ddpm_s_per_image'])} |"
            )
        fast = sa["meddiff_fast"]
        lines.append(
            f"| {s}² | seed DDPM-1000 ÷ meddiff fast DDIM-50 | | | | | | | | "
            f"**{_f(seed['ddpm_s_per_image'] / fast['ddim_s_per_image'], 0)}×** | |"
        )
    lines += [
        "",
        f"Machine peaks measured in the same run: fp32 matmul {pk['fp32_matmul_gflops']:.0f} GFLOP/s, bf16 matmul "
        f"{pk['bf16_matmul_gflops']:.0f} GFLOP/s ({cfg['matmul_n']}³). FLOPs from `FlopCounterMode` (conv, matmul, "
        "attention; GroupNorm/SiLU/adds not counted). Peak RSS = VmHWM of the configuration's own subprocess. "
        f"Conv ceilings (3×3, batch/channels/size {pk['conv']['fp32']['shape'][:3]}): "
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
            f"(output max |y| = {att['fp32_output_max_abs']:.2f}); "
            + "; ".join(
                f"{k.replace('_flash_True_s', '')}: {att[k]:.3f} s on / {att[k.replace('True', 'False')]:.3f} s off"
                for k in att
                if k.endswith("_flash_True_s")
            )
            + ".",
        ]
    return "\n".join(lines)
