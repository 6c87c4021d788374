"""Polyp pair generation (bundles/polyp_cluster_generation): the seed's schedule against a fast one, on this CPU.

`meddiff.inferers.InpaintStyleInferer` makes an image + mask pair from a real target: pass A = RePaint inside the
target's dilated mask (respaced ancestral DDPM, learned-range variance, jumps), pass B = styling (gradient guidance,
one network forward + backward per guided step plus ZeCon's two encoder passes), then MKL colour matching and mask
opening. Two settings, run side by side in this one process on the same network, targets and seeds:

- seed: RePaint 200 steps, jump_length 10, jump_n_sample 5; styling 200 steps skipping 80 (inference.json);
- fast: RePaint 50 steps, jump_length 5, jump_n_sample 2; styling 50 steps skipping 20.

Network calls per pair are counted from the schedulers' plans (`plan()`) and checked by hooks during the run. The
network is NOT the seed's (channels 256..1024, 500M parameters: hours per pair on this CPU) but a small MONAI
`DiffusionModelUNet` (SMALL_NET), trained briefly on the Kvasir-SEG sample at the first size with the bundle's loss
(HybridLoss, DiffusionTrainingInferer, 1000-step linear DDPM, EMA). It generates `--fid-pairs` pairs per setting there
(timed one by one, the settings alternating) for FID against all real images and mean pairwise MS-SSIM; other sizes
time `--pairs` pairs. One forward and one forward + backward of both networks are timed at each size, so the seed
network's cost is extrapolated (labelled as such). Without the data: untrained weights, synthetic targets, no FID.

Usage:
    python bench/polyp_generation.py                 # the benchmark (~25-35 min at 1 thread on 2 busy cores)
    python bench/polyp_generation.py --quick         # smoke run (tiny schedules, 32 px), ~1 min, writes to /tmp
    python bench/polyp_generation.py --report bench/results/polyp_generation_cpu.json   # print the table
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
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
OUT = REPO / "bench" / "results" / "polyp_generation_cpu.json"
DATA = Path("/work/shared/data/kvasir_seg/Kvasir-SEG")
SETTINGS = {  # RePaint steps, jump_length, jump_n_sample, styling steps, styling steps skipped
    "seed": {"steps": 200, "jump_length": 10, "jump_n_sample": 5, "style_steps": 200, "style_skip_steps": 80},
    "fast": {"steps": 50, "jump_length": 5, "jump_n_sample": 2, "style_steps": 50, "style_skip_steps": 20},
}
QUICK_SETTINGS = {
    "seed": {"steps": 20, "jump_length": 5, "jump_n_sample": 3, "style_steps": 20, "style_skip_steps": 8},
    "fast": {"steps": 10, "jump_length": 5, "jump_n_sample": 2, "style_steps": 10, "style_skip_steps": 4},
}
NET = {"spatial_dims": 2, "in_channels": 4, "out_channels": 8, "norm_num_groups": 32, "use_flash_attention": True}
SMALL_NET = {"channels": [32, 64, 64], "attention_levels": [False, False, True], "num_res_blocks": 1,
             "num_head_channels": 32, "resblock_updown": True}  # fmt: skip
SEED_NET = {"channels": [256, 256, 512, 512, 1024, 1024], "attention_levels": [False] * 4 + [True, False],
            "num_res_blocks": 2, "num_head_channels": 64, "resblock_updown": True}  # fmt: skip


def calls_per_pair(s: dict) -> dict:
    """Denoising calls and undo moves of pass A and guided steps of pass B, from the schedulers' plans."""
    from meddiff.schedulers import make_scheduler

    args = {"variance_type": "learned_range", "clip_sample": False}
    plan = make_scheduler("repaint", s["steps"], jump_length=s["jump_length"], jump_n_sample=s["jump_n_sample"], **args)
    moves = plan.plan()
    style = make_scheduler("ddpm", s["style_steps"], **args).plan(s["style_skip_steps"])
    return {
        "denoising_calls": sum(t_next < t for t, t_next in moves),
        "undo_steps": sum(t_next > t for t, t_next in moves),
        "guided_steps": len(style),  # the last (t_next = -1) is a plain forward: guided-diffusion does not move it
        "guided_with_backward": sum(t_next >= 0 for _, t_next in style),
    }


def make_net(arch: dict, seed: int = 0):
    import torch
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(seed)
    return DiffusionModelUNet(**NET, **arch)


def net_timing(net, size: int, repeats: int) -> dict:
    """Median seconds of one forward (no grad) and one forward + backward to the input (as styling does), batch 1."""
    import torch

    x, t = torch.randn(1, 4, size, size), torch.tensor([500])
    net.eval()
    fwd, fwd_bwd = [], []
    for _ in range(repeats + 1):  # the first of each is a warm-up
        start = time.perf_counter()
        with torch.no_grad():
            net(x, timesteps=t)
        fwd.append(time.perf_counter() - start)
        start = time.perf_counter()
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(net(xg, timesteps=t).sum(), xg)
        fwd_bwd.append(time.perf_counter() - start)
    return {
        "forward_s": round(statistics.median(fwd[1:]), 4),
        "forward_backward_s": round(statistics.median(fwd_bwd[1:]), 4),
    }


def load_pairs(size: int) -> tuple[object, list[str], bool]:
    """(N, 4, S, S) real pairs (RGB, mask as -1/1) sorted by name; synthetic ones (and False) without Kvasir-SEG."""
    import numpy as np
    import torch

    from meddiff.data.polyp import find_polyp_pairs, make_synthetic_polyps, read_pair

    real = (DATA / "images").is_dir()
    if real:
        pairs = find_polyp_pairs(DATA)
    else:
        print(f"Kvasir-SEG sample not found at {DATA}: no training and no FID; timing on synthetic targets.")
        pairs = find_polyp_pairs(make_synthetic_polyps(tempfile.mkdtemp(prefix="polyps_"), 8, 128))
    arrays = [read_pair(p["image"], p["label"], size) for p in pairs]
    x = np.stack([np.concatenate([im, m * 2.0 - 1.0]) for im, m in arrays]).astype(np.float32)
    return torch.from_numpy(x), [p["name"] for p in pairs], real


def train(net, data, iterations: int, batch: int, lr: float, seed: int) -> tuple[object, dict]:
    """The bundle's training step (train.json): HybridLoss on (eps, v), random flips, clip 1.0, AdamW; EMA weights."""
    import torch

    from meddiff.handlers import EMAWeights
    from meddiff.inferers import DiffusionTrainingInferer
    from meddiff.losses import HybridLoss
    from meddiff.precision import make_adamw
    from meddiff.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta")
    inferer = DiffusionTrainingInferer(scheduler, conditioning="none", return_inputs=True)
    loss_fn, opt = HybridLoss(scheduler, lambda_vlb=0.001), make_adamw(net.parameters(), lr=lr)
    ema, g = EMAWeights(net, 0.9999), torch.Generator().manual_seed(seed)
    net.train()
    losses, start = [], time.perf_counter()
    for it in range(1, iterations + 1):
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        loss = loss_fn(inferer(x, net, noise, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema(SimpleNamespace(state=SimpleNamespace(iteration=it)))
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    tail = losses[-max(1, iterations // 10) :]
    info = {"iterations": iterations, "batch_size": batch, "learning_rate": lr, "ema_decay": 0.9999,
            "seconds": round(seconds, 1), "s_per_iteration": round(seconds / iterations, 3),
            "loss_first": round(losses[0], 4), "loss_last_10pct_mean": round(sum(tail) / len(tail), 4)}  # fmt: skip
    return ema.model.eval(), info


def make_inferer(s: dict, size: int):
    from meddiff.inferers import InpaintStyleInferer

    return InpaintStyleInferer(
        sampler="ddpm", num_inference_steps=s["steps"], num_train_timesteps=1000, clip_sample=False,
        scheduler_args={"variance_type": "learned_range", "jump_length": s["jump_length"],
                        "jump_n_sample": s["jump_n_sample"]},
        mask_dilation=round(20 * size / 256), mask_opening=round(16 * size / 256), style_steps=s["style_steps"],
        style_skip_steps=s["style_skip_steps"], precision="fp32", channels_last=False, progress=False,
    )  # fmt: skip


def generate(net, s: dict, target, seed: int) -> tuple[object, dict]:
    """One pair (batch 1, as the bundle's DataLoader): seconds in all and in pass B, network forwards by hooks."""
    import meddiff.sampling.styling as styling

    counts = {"pre": 0, "post": 0}
    hooks = [net.register_forward_pre_hook(lambda *a: counts.__setitem__("pre", counts["pre"] + 1)),
             net.register_forward_hook(lambda *a: counts.__setitem__("post", counts["post"] + 1))]  # fmt: skip
    inner, pass_b = styling.style, []

    def timed_style(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        pass_b.append(time.perf_counter() - start)
        return out

    inferer = make_inferer(s, target.shape[-1])
    with mock.patch.object(styling, "style", timed_style):
        start = time.perf_counter()
        out = inferer(target[None], net, seed=seed)
        total = time.perf_counter() - start
    for h in hooks:
        h.remove()
    return out, {"s": total, "b": sum(pass_b), "full": counts["post"], "enc": counts["pre"] - counts["post"]}


def summarise(runs: list[dict], c: dict) -> dict:
    n, total, b = len(runs), sum(r["s"] for r in runs), sum(r["b"] for r in runs)
    full, enc = sum(r["full"] for r in runs) / n, sum(r["enc"] for r in runs) / n
    return {
        "pairs": n, "s_per_pair": round(total / n, 2), "s_each": [round(r["s"], 2) for r in runs],
        "pass_a_s_per_pair": round((total - b) / n, 2), "pass_b_s_per_pair": round(b / n, 2),
        "pass_a_s_per_denoising_call": round((total - b) / n / c["denoising_calls"], 4),
        "pass_b_s_per_guided_step": round(b / n / c["guided_steps"], 4),
        "hooked_full_forwards_per_pair": full, "hooked_encoder_only_forwards_per_pair": enc,
        "hooks_match_plan": full == c["denoising_calls"] + c["guided_steps"] and enc == 2 * c["guided_with_backward"],
    }  # fmt: skip


def quality(features, real, outs: dict, targets, draws: int = 20) -> dict:
    """FID (Inception pool3, against all real images) and mean pairwise MS-SSIM of the RGB, per setting; the targets
    themselves and `draws` random real subsets of the same size: the floor, and the spread, of FID at this n."""
    import numpy as np

    from meddiff.metrics.diversity import ms_ssim_diversity
    from meddiff.metrics.fid import frechet_inception_distance

    def fid(a, b) -> float:
        with warnings.catch_warnings():  # scipy's sqrtm warns on the rank-deficient covariances of so few images
            warnings.simplefilter("ignore")
            return frechet_inception_distance(a, b)

    real_f, res = features.extract(real[:, :3]), {}
    for name, imgs in {**outs, "targets (real, copied)": targets}.items():
        value = fid(real_f, features.extract(imgs[:, :3]))
        res[name] = {"fid": round(value, 2), "ms_ssim": round(ms_ssim_diversity(imgs[:, :3]), 4), "n": len(imgs)}
    rng, n = np.random.default_rng(0), len(targets)
    subsets = [fid(real_f, real_f[rng.choice(len(real), n, replace=False)]) for _ in range(draws)]
    spread = f"{np.mean(subsets):.1f} ± {np.std(subsets, ddof=1):.1f}"
    res["real subsets"] = {"fid": spread, "n": n, "draws": draws, "ms_ssim": "",
                           "fid_min": round(min(subsets), 2), "fid_max": round(max(subsets), 2)}  # fmt: skip
    res["real (all)"] = {"fid": 0.0, "ms_ssim": round(ms_ssim_diversity(real[:, :3]), 4), "n": len(real)}
    return res


def run(args: argparse.Namespace) -> dict:
    import torch
    from common import machine_info, run_clock, write_report

    from meddiff.features import ImageFeatures

    torch.set_num_threads(args.threads)
    clock = run_clock()
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    report = {"benchmark": "polyp_generation", "args": vars(args), "machine": machine_info(), "settings": settings,
              "network": {"used": {**NET, **SMALL_NET}, "seed": {**NET, **SEED_NET}}, "precision": "fp32",
              "calls_per_pair": {k: calls_per_pair(s) for k, s in settings.items()}}  # fmt: skip
    net = make_net(SMALL_NET)
    report["network"]["used_params"] = sum(p.numel() for p in net.parameters())
    fid_size = args.sizes[0]
    data, names, real = load_pairs(fid_size)
    if real and args.train_iters > 0:
        print(f"training {args.train_iters} iterations at {fid_size} px on {len(data)} real pairs", flush=True)
        net, report["training"] = train(net, data, args.train_iters, args.batch_size, args.lr, args.seed)
        print(f"  {report['training']}", flush=True)
    else:
        report["training"] = "none: untrained weights (timing only)"
    net.eval().requires_grad_(True)
    report["timing"], report["net_timing"], outs = {}, {}, {}
    seeds = list(range(args.seed, args.seed + max(args.pairs, args.fid_pairs)))
    for size in args.sizes:
        targets = data if size == fid_size else load_pairs(size)[0]
        n = min(args.fid_pairs if (size == fid_size and real) else args.pairs, len(targets))
        report["timing"][str(size)] = {"targets": names[:n]}
        runs = {name: [] for name in settings}
        for i in range(n):  # the settings alternate pair by pair, so a change in the machine's load hits both
            for name, s in settings.items():
                out, r = generate(net, s, targets[i], seeds[i])
                runs[name].append(r)
                outs.setdefault(size, {}).setdefault(name, []).append(out)
                print(f"{size} px, pair {i + 1}/{n}, {name}: {r['s']:.1f} s (pass B {r['b']:.1f} s)", flush=True)
        for name in settings:
            report["timing"][str(size)][name] = summarise(runs[name], report["calls_per_pair"][name])
        t = report["timing"][str(size)]
        t["ratio_seed_over_fast"] = round(t["seed"]["s_per_pair"] / t["fast"]["s_per_pair"], 2)
        seed_net = make_net(SMALL_NET if args.quick else SEED_NET)  # --quick: a stand-in, not the seed's network
        report["net_timing"][str(size)] = {
            "used": net_timing(net, size, args.repeats),
            "seed": net_timing(seed_net, size, 1),
        }
        del seed_net
        report["extrapolated_seed_net_s_per_pair"] = extrapolate(report)
    if real:
        print("FID / MS-SSIM", flush=True)
        fid_outs = {name: torch.cat(v) for name, v in outs[fid_size].items()}
        targets_fid = data[: len(fid_outs["seed"])]
        report["quality"] = quality(ImageFeatures(batch_size=8, device="cpu"), data, fid_outs, targets_fid)
        report["quality_note"] = f"FID of {len(targets_fid)} generated vs {len(data)} real images at {fid_size} px"
    else:
        report["quality"] = f"skipped: Kvasir-SEG sample not found at {DATA}"
    quick_out = Path(tempfile.gettempdir()) / "polyp_generation_quick.json"
    out = Path(args.out) if args.out else quick_out if args.quick else OUT
    wall = write_report(report, out, clock)
    print(f"wrote {out} ({wall / 60:.1f} min)\n{table(report)}", flush=True)
    return report


def extrapolate(report: dict) -> dict:
    """EXTRAPOLATION, not measured: the seed network's s/pair = the small network's measured pass A and pass B
    s/pair, each scaled by seed/small time of one forward (A) or forward + backward (B) at the same size."""
    res = {}
    for size, nt in report["net_timing"].items():
        tm = report["timing"][size]
        fa = nt["seed"]["forward_s"] / nt["used"]["forward_s"]
        fb = nt["seed"]["forward_backward_s"] / nt["used"]["forward_backward_s"]
        res[size] = {k: round(tm[k]["pass_a_s_per_pair"] * fa + tm[k]["pass_b_s_per_pair"] * fb) for k in SETTINGS}
    return res


def table(r: dict) -> str:
    sizes, q = list(r["timing"]), r.get("quality") if isinstance(r.get("quality"), dict) else {}
    head = "| setting | denoising calls | undo steps | guided steps | " + " | ".join(f"s/pair {s} px" for s in sizes)
    lines = [head + " | FID | MS-SSIM |", "|---" * (6 + len(sizes)) + "|"]
    for name, c in r["calls_per_pair"].items():
        cells = [str(r["timing"][s][name]["s_per_pair"]) for s in sizes]
        qi = q.get(name, {})
        lines.append(f"| {name} | {c['denoising_calls']} | {c['undo_steps']} | {c['guided_steps']} | "
                     + " | ".join(cells) + f" | {qi.get('fid', '')} | {qi.get('ms_ssim', '')} |")  # fmt: skip
    ratios = " | ".join(f"{r['timing'][s]['ratio_seed_over_fast']}x" for s in sizes)
    lines.append(f"| seed / fast | | | | {ratios} | | |")
    for name in ("targets (real, copied)", "real subsets", "real (all)"):
        if name in q:
            lines.append(f"| {name} (n={q[name]['n']}) | | | | {' | ' * (len(sizes) - 1)} | {q[name]['fid']} | "
                         f"{q[name]['ms_ssim']} |")  # fmt: skip
    for size, v in r.get("extrapolated_seed_net_s_per_pair", {}).items():
        lines.append(
            f"\nEXTRAPOLATED to the seed's network at {size} px: seed {v['seed']} s/pair, fast {v['fast']} s/pair"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes; the first is the FID size")
    ap.add_argument("--pairs", type=int, default=None, help="pairs timed per setting at the other sizes (default 1)")
    ap.add_argument("--fid-pairs", type=int, default=None, help="pairs generated per setting at the FID size (8)")
    ap.add_argument("--train-iters", type=int, default=None, help="training iterations at the FID size (default 400)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (the bundle's demo.json value)")
    ap.add_argument("--seed", type=int, default=0, help="network init and training; pair i is sampled with seed + i")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the small network's forward timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny schedules, 32 px, 5 iterations, 2 pairs")
    ap.add_argument("--out", default=None, help=f"result JSON (default {OUT.relative_to(REPO)}; --quick: /tmp)")
    ap.add_argument("--report", default=None, help="print the table of a result JSON and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return 0
    defaults = {"sizes": [32], "pairs": 1, "fid_pairs": 2, "train_iters": 5} if args.quick else {
        "sizes": [64, 128], "pairs": 1, "fid_pairs": 8, "train_iters": 400}  # fmt: skip
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    run(args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
