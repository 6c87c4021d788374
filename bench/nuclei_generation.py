"""MoNuSeg nuclei generation (bundles/monuseg_nuclei_generation): the seed's sampler against the core's, on this CPU.

The seed (methods.md §4.4) samples each 128 px patch with 1000 ancestral DDPM steps and classifier-free guidance
(s = 1.5) as two network calls per step, one with the 6-channel map and one with the zeroed map. Settings run side by
side in this one process, on the same network, conditions and seeds:

- seed: DDPM-1000, guidance as two forwards per step (conditional, then null), as the seed's sampler;
- batched: DDPM-1000, the core's guidance (`meddiff.sampling.guidance.classifier_free`: condition and null stacked
  into one call of batch 2B), the bundle's default;
- ddpm100 / ddpm50: the ancestral sampler respaced to 100 / 50 steps (learned-range variance), batched guidance;
- dpmpp25: DPM-Solver++(2M) with 25 steps, batched guidance.

The network is NOT the seed's (channels 128..512 with SPADE: about 2 s per forward here, so hours per 1000-step
sample on this CPU) but a tiny MONAI `SPADEDiffusionModelUNet` (SMALL_NET, 0.9M parameters) trained briefly with the
bundle's loss (HybridLoss, cosine 1000-step schedule, condition dropout 0.2, EMA) on every patch of the MoNuSeg
sample at ``--fid-size`` (64 px: a 128 px training and 1000-step FID sets do not fit a CPU session). Timing: each
setting generates ``--samples`` patch(es) at ``--size`` (128 px, the method's) from the same condition and seed, and
"seed" and "batched" must give the same samples (their largest difference is recorded). Quality: each setting
generates ``--fid-samples`` patches at the training size from the same conditions and seed for FID against every
real patch; at so few samples FID is biased upward and noisy, so 20 random real subsets of the same size give its
floor and spread. One forward of the seed's network is timed at batch 1 and 2 for an extrapolation (labelled as
such). The OOD filter (`meddiff.ood.PatchCoreScorer`, stride 4 as ``ood.json``) is timed per 100 scored 128 px
patches, its memory bank built from the real training tile's patches.

Usage:
    python bench/nuclei_generation.py                  # the benchmark (about 45 min at 1 thread)
    python bench/nuclei_generation.py --quick          # smoke run (tiny network, few steps), writes to /tmp
    python bench/nuclei_generation.py --report bench/results/nuclei_generation_cpu.json   # print the table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
OUT = REPO / "bench" / "results" / "nuclei_generation_cpu.json"
DATA = Path("/work/shared/data/monuseg/datasets")
SETTINGS = {  # sampler, steps, guidance as two calls (the seed) or one batched call
    "seed": {"sampler": "ddpm", "steps": 1000, "two_calls": True},
    "batched": {"sampler": "ddpm", "steps": 1000, "two_calls": False},
    "ddpm100": {"sampler": "ddpm", "steps": 100, "two_calls": False},
    "ddpm50": {"sampler": "ddpm", "steps": 50, "two_calls": False},
    "dpmpp25": {"sampler": "dpmpp_2m", "steps": 25, "two_calls": False},
}
QUICK_STEPS = {"seed": 20, "batched": 20, "ddpm100": 10, "ddpm50": 5, "dpmpp25": 5}
NET = {"spatial_dims": 2, "in_channels": 3, "out_channels": 6, "label_nc": 6, "use_flash_attention": True}
SMALL_NET = {"channels": [16, 32, 64], "attention_levels": [False, False, False], "num_res_blocks": 1,
             "num_head_channels": 16, "norm_num_groups": 8, "resblock_updown": True,
             "spade_intermediate_channels": 16}  # fmt: skip
TINY_NET = {"channels": [16, 32], "attention_levels": [False, False], "num_res_blocks": 1, "num_head_channels": 16,
            "norm_num_groups": 8, "resblock_updown": False, "spade_intermediate_channels": 16}  # fmt: skip
SEED_NET = {"channels": [128, 128, 256, 384, 512], "attention_levels": [False, False, True, True, True],
            "num_res_blocks": 2, "num_head_channels": 32, "norm_num_groups": 32, "resblock_updown": True,
            "spade_intermediate_channels": 128}  # fmt: skip
GUIDANCE = 1.5


def make_net(arch: dict, seed: int = 0):
    import torch
    from monai.networks.nets import SPADEDiffusionModelUNet

    torch.manual_seed(seed)
    return SPADEDiffusionModelUNet(**NET, **arch)


def load_patches(patch_size: int, quick: bool) -> tuple[list[dict], object, object, bool]:
    """Every patch of the MoNuSeg sample (training and test tiles): items, images (N, 3, S, S), instance maps;
    synthetic tiles with --quick or without the sample."""
    import numpy as np
    import torch

    from meddiff.data.monuseg import make_synthetic_nuclei, monuseg_datalist, read_patch

    real = DATA.is_dir() and not quick
    folder = DATA if real else make_synthetic_nuclei(tempfile.mkdtemp(prefix="nuclei_"), 2, 1, 256, 0)
    if not real:
        print(f"MoNuSeg sample not found at {DATA}: synthetic tiles, no FID.")
    split = monuseg_datalist(folder, patch_size)
    items = split["training"] + split["testing"]
    pairs = [read_patch(item) for item in items]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.float32))
    return items, images, [p[1] for p in pairs], real


def conditions(images, insts, partners: list[int], seed: int):
    """The 6-channel maps of structures i with the colours of patches partners[i] (colour shuffle seeded per item)."""
    import numpy as np
    import torch

    from meddiff.nuclei import nuclei_condition

    maps = [
        nuclei_condition(insts[i], images[j].numpy(), np.random.default_rng(seed + i), appearance_inst=insts[j])
        for i, j in enumerate(partners)
    ]
    return torch.from_numpy(np.stack(maps).astype(np.float32))


def train(net, images, insts, iterations: int, batch: int, lr: float, seed: int) -> tuple[object, dict]:
    """The bundle's training step (train.json): HybridLoss, condition dropout 0.2, clip 1.0, AdamW; EMA weights."""
    import numpy as np
    import torch

    from meddiff.conditioning import Conditioning
    from meddiff.handlers import EMAWeights
    from meddiff.inferers import DiffusionTrainingInferer
    from meddiff.losses import HybridLoss
    from meddiff.nuclei import nuclei_condition
    from meddiff.precision import make_adamw
    from meddiff.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="cosine")
    inferer = DiffusionTrainingInferer(scheduler, conditioning="seg", return_inputs=True)
    conditioning = Conditioning("seg")
    loss_fn, opt = HybridLoss(scheduler, lambda_vlb=0.001), make_adamw(net.parameters(), lr=lr)
    ema, g = EMAWeights(net, 0.9999), torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    net.train()
    losses, start = [], time.perf_counter()
    for it in range(1, iterations + 1):
        index = torch.randint(0, len(images), (batch,), generator=g).tolist()
        x = images[index]
        y = torch.from_numpy(np.stack([nuclei_condition(insts[i], images[i].numpy(), rng) for i in index]))
        y = conditioning.drop(y.float(), torch.rand(batch, generator=g) >= 0.2)
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        loss = loss_fn(inferer(x, net, noise, t, condition=y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema(SimpleNamespace(state=SimpleNamespace(iteration=it)))
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    tail = losses[-max(1, iterations // 10) :]
    info = {"iterations": iterations, "batch_size": batch, "learning_rate": lr, "ema_decay": 0.9999,
            "drop_rate": 0.2, "seconds": round(seconds, 1), "s_per_iteration": round(seconds / iterations, 3),
            "loss_first": round(losses[0], 4), "loss_last_10pct_mean": round(sum(tail) / len(tail), 4)}  # fmt: skip
    return ema.model.eval(), info


def two_call_guidance(network, condition, scale: float):
    """The seed's guidance: eps_u + s (eps_c - eps_u) on the first 3 channels, from two separate network calls."""
    import torch

    from meddiff.conditioning import Conditioning

    conditioning = Conditioning("seg")
    null = torch.zeros_like(condition)

    def denoise(x, t):
        cond = conditioning(network, x, t, condition).float()
        uncond = conditioning(network, x, t, null).float()
        return torch.cat([uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)

    return denoise


def generate(net, setting: dict, steps: int, condition, seed: int) -> tuple[object, dict]:
    """One batch of patches for `condition` (B, 6, S, S): seconds and network calls counted by a hook."""
    import torch

    from meddiff.conditioning import Conditioning
    from meddiff.sampling.guidance import classifier_free
    from meddiff.sampling.loop import make_generator, sample
    from meddiff.schedulers import make_scheduler

    args = {"variance_type": "learned_range"} if setting["sampler"] == "ddpm" else {}
    scheduler = make_scheduler(setting["sampler"], steps, schedule="cosine", clip_sample=True, **args)
    if setting["two_calls"]:
        denoiser = two_call_guidance(net, condition, GUIDANCE)
    else:
        denoiser = classifier_free(net, Conditioning("seg"), condition, GUIDANCE, eps_channels=3)
    calls = [0]
    hook = net.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    start = time.perf_counter()
    with torch.no_grad():
        shape, generator = (len(condition), 3, *condition.shape[2:]), make_generator(seed, "cpu")
        out = sample(denoiser, scheduler, shape, generator=generator)
    seconds = time.perf_counter() - start
    hook.remove()
    return out.clamp(-1, 1), {"s": seconds, "calls": calls[0], "n": len(condition)}


def net_timing(net, size: int, repeats: int) -> dict:
    """Median seconds of one forward at batch 1 and at batch 2 (one batched guidance call), no grad."""
    import torch

    res = {}
    for batch in (1, 2):
        x, y, t = torch.randn(batch, 3, size, size), torch.randn(batch, 6, size, size), torch.full((batch,), 500)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            with torch.no_grad():
                net(x, timesteps=t, seg=y)
            times.append(time.perf_counter() - start)
        res[f"forward_batch{batch}_s"] = round(statistics.median(times[1:]), 4)
    return res


def quality(features, real, outs: dict, draws: int = 20) -> dict:
    """FID (Inception pool3) of each setting's patches against every real patch, and real subsets of the same n."""
    import numpy as np

    from meddiff.metrics.fid import frechet_inception_distance

    def fid(a, b) -> float:
        with warnings.catch_warnings():  # scipy's sqrtm warns on the rank-deficient covariances of so few images
            warnings.simplefilter("ignore")
            return frechet_inception_distance(a, b)

    real_f, res = features.extract(real), {}
    for name, imgs in outs.items():
        res[name] = {"fid": round(fid(real_f, features.extract(imgs)), 2), "n": len(imgs)}
    n = len(next(iter(outs.values())))
    rng = np.random.default_rng(0)
    subsets = [fid(real_f, real_f[rng.choice(len(real), n, replace=False)]) for _ in range(draws)]
    res["real subsets"] = {"fid": f"{np.mean(subsets):.1f} ± {np.std(subsets, ddof=1):.1f}", "n": n, "draws": draws,
                           "fid_min": round(min(subsets), 2), "fid_max": round(max(subsets), 2)}  # fmt: skip
    return res


def ood_timing(real_train, scored, features) -> dict:
    """Seconds to build the memory bank from the real training patches and to score 100 patches."""
    from meddiff.ood import PatchCoreScorer

    scorer = PatchCoreScorer(features=features, patch_stride=4)  # the bundle's ood.json default (the seed's stride)
    start = time.perf_counter()
    scorer.fit(real_train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = scorer.score(scored)
    score_s = time.perf_counter() - start
    return {"memory_bank_from": len(real_train), "fit_s": round(fit_s, 2), "scored": len(scored),
            "score_s": round(score_s, 2), "s_per_100_scored": round(100 * score_s / len(scored), 2),
            "score_median": round(float(statistics.median(scores.tolist())), 4)}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    import torch
    from common import machine_info, run_clock, write_report

    from meddiff.features import ImageFeatures
    from meddiff.nuclei import match_structures

    torch.set_num_threads(args.threads)
    clock = run_clock()
    steps = QUICK_STEPS if args.quick else {k: s["steps"] for k, s in SETTINGS.items()}
    arch = TINY_NET if args.quick else SMALL_NET
    report = {"benchmark": "nuclei_generation", "args": vars(args), "machine": machine_info(), "settings": SETTINGS,
              "steps": steps, "guidance_scale": GUIDANCE, "precision": "fp32",
              "network": {"used": {**NET, **arch}, "seed": {**NET, **SEED_NET}}}  # fmt: skip
    items, images, insts, real = load_patches(args.fid_size, args.quick)
    net = make_net(arch)
    report["network"]["used_params"] = sum(p.numel() for p in net.parameters())
    print(f"training {args.train_iters} iterations on {len(images)} patches of {args.fid_size} px", flush=True)
    net, report["training"] = train(net, images, insts, args.train_iters, args.batch_size, args.lr, args.seed)
    print(f"  {report['training']}", flush=True)

    # timing at the method's patch size, the settings one after the other on the same condition and seed
    t_items, t_images, t_insts, _ = load_patches(args.size, args.quick)
    k = min(args.samples, len(t_images))
    partners = match_structures(t_insts[: max(k, 2)], num_similar=1, seed=args.seed)[:k]
    cond = conditions(t_images[: max(k, 2)], t_insts[: max(k, 2)], partners, args.seed)
    report["timing"], timed = {}, {}
    for name, setting in SETTINGS.items():
        out, r = generate(net, setting, steps[name], cond, args.seed)
        timed[name] = out
        report["timing"][name] = {"samples": r["n"], "s_per_sample": round(r["s"] / r["n"], 2),
                                  "network_calls": r["calls"], "seconds": round(r["s"], 1)}  # fmt: skip
        print(f"{name}: {r['s']:.1f} s for {r['n']} patches of {args.size} px, {r['calls']} calls", flush=True)
    base = report["timing"]["seed"]["s_per_sample"]
    for name in SETTINGS:
        report["timing"][name]["speedup_vs_seed"] = round(base / report["timing"][name]["s_per_sample"], 2)
    report["seed_vs_batched_max_abs_difference"] = float((timed["seed"] - timed["batched"]).abs().max())
    report["net_timing"] = {"used": net_timing(net, args.size, args.repeats)}
    if not args.quick:
        report["net_timing"]["seed"] = net_timing(make_net(SEED_NET), args.size, 1)
        used, seed_net = report["net_timing"]["used"], report["net_timing"]["seed"]
        one, two = seed_net["forward_batch1_s"], seed_net["forward_batch2_s"]
        report["extrapolated_seed_net_s_per_sample"] = {  # EXTRAPOLATION: calls x seed-network seconds per call
            "seed (two calls of batch 1 per step)": round(2 * SETTINGS["seed"]["steps"] * one),
            "batched (one call of batch 2 per step)": round(SETTINGS["batched"]["steps"] * two),
            "ddpm50 (batched)": round(50 * two),
            "note": f"the used network's batch-2 / batch-1 forward ratio is "
            f"{used['forward_batch2_s'] / used['forward_batch1_s']:.2f}",
        }

    # quality at the training size: the settings' samples from the same conditions and seed; "seed" draws the same
    # samples as "batched" (checked above), so it is not generated again
    features = ImageFeatures(batch_size=16, device="cpu")
    if real:
        n = min(args.fid_samples, len(images))
        partners = match_structures(insts[:n], num_similar=min(20, n - 1), seed=args.seed)
        cond = conditions(images[:n], insts[:n], partners, args.seed)
        outs = {}
        for name, setting in SETTINGS.items():
            if name != "seed":
                outs[name], r = generate(net, setting, steps[name], cond, args.seed)
                print(f"{name}: {n} patches of {args.fid_size} px for FID in {r['s']:.0f} s", flush=True)
        report["quality"] = quality(features, images, outs)
        report["quality"]["seed"] = dict(report["quality"]["batched"], note="the same samples as batched")
        report["quality_note"] = f"FID of {n} generated vs {len(images)} real patches at {args.fid_size} px"
    train_count = sum(1 for item in t_items if "Training" in str(item["image"])) or len(t_items) // 2
    scored = t_images[train_count:][: 100 if not args.quick else 8]
    print("OOD filter", flush=True)
    report["ood"] = ood_timing(t_images[:train_count], scored, features)
    quick_out = Path(tempfile.gettempdir()) / "nuclei_generation_quick.json"
    out = Path(args.out) if args.out else quick_out if args.quick else OUT
    wall = write_report(report, out, clock)
    print(f"wrote {out} ({wall / 60:.1f} min)\n{table(report)}", flush=True)
    return report


def table(r: dict) -> str:
    q = r.get("quality") if isinstance(r.get("quality"), dict) else {}
    lines = ["| setting | steps | network calls | s/sample | speed-up vs seed | FID |", "|---|---|---|---|---|---|"]
    for name, t in r["timing"].items():
        lines.append(f"| {name} | {r['steps'][name]} | {t['network_calls']} | {t['s_per_sample']} | "
                     f"{t['speedup_vs_seed']}x | {q.get(name, {}).get('fid', '')} |")  # fmt: skip
    if "real subsets" in q:
        lines.append(f"| real subsets (n={q['real subsets']['n']}) | | | | | {q['real subsets']['fid']} |")
    o = r["ood"]
    lines.append(f"\nOOD filter: memory bank from {o['memory_bank_from']} patches in {o['fit_s']} s; "
                 f"{o['s_per_100_scored']} s per 100 scored patches")  # fmt: skip
    for k, v in r.get("extrapolated_seed_net_s_per_sample", {}).items():
        lines.append(f"EXTRAPOLATED to the seed's network: {k}: {v}" + ("" if k == "note" else " s/sample"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=None, help="patch side of the timing (128 as the seed)")
    ap.add_argument("--samples", type=int, default=None, help="patches timed per setting (1)")
    ap.add_argument("--fid-size", type=int, default=None, help="patch side of training and FID (64)")
    ap.add_argument("--fid-samples", type=int, default=None, help="patches generated per setting for FID (8)")
    ap.add_argument("--train-iters", type=int, default=None, help="training iterations (default 300)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the forward timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny network, 32 px, few steps")
    ap.add_argument("--out", default=None, help=f"result JSON (default {OUT.relative_to(REPO)}; --quick: /tmp)")
    ap.add_argument("--report", default=None, help="print the table of a result JSON and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return 0
    defaults = {"size": 32, "samples": 2, "fid_size": 32, "fid_samples": 4, "train_iters": 3} if args.quick else {
        "size": 128, "samples": 1, "fid_size": 64, "fid_samples": 8, "train_iters": 300}  # fmt: skip
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    run(args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
