"""Benchmark the breast MRI SegGuidedDiff bundle (MONAI + meddiff) against the seed's diffusers way, on CPU.

One process orchestrates; every configuration runs in its own subprocess (fresh allocator, clean peak-RSS reading),
with or without the glibc malloc setting. Measures training images/s, sampling seconds per image (DDIM-50 run in
full, DDPM-1000 extrapolated from per-step times of the real loop), peak RSS, FLOP/s against the machine's matmul
peaks, and the seed/meddiff ratios. Writes ``bench/results/seg_guided.json`` and the tables in ``bench/README.md``.

    python bench/seg_guided.py           # full paper-size network (113.7M params), ~11 min on 2 cores
    python bench/seg_guided.py --quick   # tiny smoke configuration, < 1 min; writes seg_guided_quick.json only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO, machine_busy_s, median, update_readme_block, wait_for_quiet
from common import machine_info as common_machine_info
from seg_guided_report import render_markdown, summarize

BUNDLE = REPO / "bundles" / "breast_mri_seg_guided_generation"
RESULTS = REPO / "bench" / "results"
BEGIN, END = "<!-- seg_guided:tables:begin -->", "<!-- seg_guided:tables:end -->"
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"  # = meddiff.precision's
NUM_CLASSES = 4  # breast MRI: background, breast, vessels, fibroglandular tissue
TRAIN_TIMESTEPS = 1000

FULL: dict[str, Any] = {
    "sizes": [64, 128],
    "train_batch": 4,
    "train_warmup": 2,
    "train_steps": {"64": 5, "128": 3},
    "sample_batch": 1,
    "ddim_steps": 50,
    "ddpm_steps": 1000,
    "ddpm_measured_steps": 20,
    "warmup_steps": 2,
    "matmul_n": 2048,
    "matmul_reps": 10,
    "attention_size": 128,
    "attention_reps": 5,
    "net": "paper",
}
QUICK: dict[str, Any] = {
    "sizes": [32],
    "train_batch": 2,
    "train_warmup": 1,
    "train_steps": {"32": 2},
    "sample_batch": 1,
    "ddim_steps": 5,
    "ddpm_steps": 1000,
    "ddpm_measured_steps": 3,
    "warmup_steps": 1,
    "matmul_n": 512,
    "matmul_reps": 3,
    "attention_size": 64,
    "attention_reps": 2,
    "net": "tiny",
}
TINY_CHANNELS = (32, 32, 64, 64, 64, 64)


# ----------------------------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------------------------


def seed_network(size: int, net: str) -> Any:
    """The seed's network: diffusers `UNet2DModel`, 1 image channel + 1 merged mask channel (methods.md §2.2)."""
    from diffusers import UNet2DModel

    tiny = net == "tiny"
    return UNet2DModel(
        sample_size=size,
        in_channels=2,
        out_channels=1,
        layers_per_block=2,
        block_out_channels=TINY_CHANNELS if tiny else (128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        norm_num_groups=8 if tiny else 32,
    )


def bundle_parser(config: str, net: str, overrides: dict[str, Any] | None = None, globals_: dict | None = None) -> Any:
    """The bundle's own config (train.json or inference.json) on CPU, with `overrides` applied."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(globals=globals_)
    parser.read_config(str(BUNDLE / "configs" / config))
    parser["device"] = "$torch.device('cpu')"
    if net == "tiny":
        parser["network_channels"] = list(TINY_CHANNELS)
        parser["norm_num_groups"] = 8
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def bundle_network(net: str, use_flash_attention: bool | None = None) -> Any:
    """The bundle's `DiffusionModelUNet` (inference.json `network_def`), fp32 NCHW on CPU."""
    parser = bundle_parser("inference.json", net)
    if use_flash_attention is not None:
        parser["network_def#use_flash_attention"] = use_flash_attention
    return parser.get_parsed_content("network_def")


def synthetic_pair(size: int, seed: int) -> tuple[Any, Any]:
    """A random image in [-1, 1] (1,S,S) and an integer mask (1,S,S) with classes 0..3 in blocks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    image = torch.rand((1, size, size), generator=g) * 2 - 1
    coarse = torch.randint(0, NUM_CLASSES, (1, 1, max(size // 8, 1), max(size // 8, 1)), generator=g).float()
    label = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")[0].long()
    return image, label


def seed_mask(label: Any) -> Any:
    """The seed's conditioning: all classes merged into one channel holding k/255."""
    return label.float() / 255.0


# ----------------------------------------------------------------------------------------------------------------
# worker measurements (run inside the subprocesses)
# ----------------------------------------------------------------------------------------------------------------


def proc_memory_mib() -> dict[str, float]:
    """Peak RSS of this process: VmHWM from /proc and ru_maxrss, in MiB."""
    out = {"ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["vmhwm_mib"] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return out


def train_seed(job: dict, cfg: dict) -> dict:
    """The seed's training step: diffusers UNet, fp32, MSE + clip_grad_norm(1.0) + AdamW(1e-4) + cosine warmup."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    size, batch = job["size"], cfg["train_batch"]
    n_total = cfg["train_warmup"] + cfg["train_steps"][str(size)]
    torch.manual_seed(0)
    model = seed_network(size, cfg["net"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # the seed's call: torch defaults otherwise
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=500, num_training_steps=100_000)
    noise_scheduler = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)
    pairs = [synthetic_pair(size, i) for i in range(batch * n_total)]
    steps = []
    for step in range(n_total):
        chunk = pairs[step * batch : (step + 1) * batch]
        clean = torch.stack([p[0] for p in chunk])
        mask = torch.stack([seed_mask(p[1]) for p in chunk])
        t0 = time.perf_counter()
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, TRAIN_TIMESTEPS, (batch,), dtype=torch.long)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        pred = model(torch.cat([noisy, mask], dim=1), timesteps, return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        t1 = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t2 = time.perf_counter()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        t3 = time.perf_counter()
        steps.append({"step": t3 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2})
    return _train_summary(steps, cfg, batch, float(loss.item()))


def train_meddiff(job: dict, cfg: dict) -> dict:
    """The bundle's own trainer (train.json): DiffusionTrainingInferer, ConditionedPrepareBatch, make_adamw,
    GradientClipping, WarmupCosineSchedule, in a MONAI SupervisedTrainer; data are synthetic."""
    import torch
    from ignite.engine import Events
    from monai.engines.utils import IterationEvents

    size, batch = job["size"], cfg["train_batch"]
    n_total = cfg["train_warmup"] + cfg["train_steps"][str(size)]
    bf16, channels_last = job["variant"] in ("fast", "bf16"), job["variant"] == "fast"
    torch.manual_seed(0)
    data = []
    for i in range(batch * n_total):
        image, label = synthetic_pair(size, i)
        data.append({"image": image.numpy(), "label": label.numpy().astype("uint8"), "name": f"s{i}"})
    parser = bundle_parser(
        "train.json",
        cfg["net"],
        {
            "img_size": size,
            "batch_size": batch,
            "num_epochs": 1,
            "precision": "bf16" if bf16 else "fp32",
            "channels_last": channels_last,
            "train#data": "$bench_data",
            "train#dataloader#shuffle": False,
        },
        globals_={"bench_data": data},
    )
    keep = ("LrScheduleHandler", "meddiff.handlers.GradientClipping")  # no checkpoint files, no logging
    parser["train#handlers"] = [h for h in parser["train#handlers"] if h.get("_target_") in keep]
    trainer = parser.get_parsed_content("train#trainer")
    optimizer = parser.get_parsed_content("optimizer")
    marks: dict[str, float] = {}
    steps: list[dict[str, float]] = []

    def mark(name: str) -> Callable[[Any], None]:
        def _mark(_engine: Any) -> None:
            marks[name] = time.perf_counter()

        return _mark

    def done(_engine: Any) -> None:
        end = time.perf_counter()
        steps.append(
            {
                "step": end - marks["start"],
                "fwd": marks["loss"] - marks["start"],
                "bwd": marks["backward"] - marks["loss"],
                "opt": end - marks["backward"],
            }
        )

    trainer.add_event_handler(Events.ITERATION_STARTED, mark("start"))
    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, mark("loss"))
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, mark("backward"))  # after GradientClipping
    trainer.add_event_handler(Events.ITERATION_COMPLETED, done)
    trainer.run()
    output = trainer.state.output
    out = _train_summary(steps, cfg, batch, float((output[0] if isinstance(output, list) else output)["loss"]))
    out["optimizer"] = {"class": type(optimizer).__name__, "fused": bool(optimizer.defaults.get("fused"))}
    out["precision"], out["channels_last"] = parser["precision"], parser["channels_last"]
    return out


def _train_summary(steps: list[dict[str, float]], cfg: dict, batch: int, loss: float) -> dict:
    measured = steps[cfg["train_warmup"] :]
    step = median([s["step"] for s in measured])
    return {
        "batch": batch,
        "warmup_steps": cfg["train_warmup"],
        "measured_steps": len(measured),
        "step_s_median": step,
        "step_s_all": [round(s["step"], 4) for s in steps],
        "first_step_s": steps[0]["step"],
        "fwd_s": median([s["fwd"] for s in measured]),
        "bwd_clip_s": median([s["bwd"] for s in measured]),
        "opt_s": median([s["opt"] for s in measured]),
        "images_per_s": batch / step,
        "final_loss": loss,
    }


def sample_seed(job: dict, cfg: dict) -> dict:
    """The seed's sampling loop: concat mask, UNet, strip, diffusers `scheduler.step` (DDIM-50 and DDPM-1000)."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler

    size, batch = job["size"], cfg["sample_batch"]
    torch.manual_seed(0)
    model = seed_network(size, cfg["net"]).eval()
    mask = torch.stack([seed_mask(synthetic_pair(size, i)[1]) for i in range(batch)])

    def run(scheduler: Any, n_steps: int | None, eta: float | None) -> tuple[float, list[float], list[float], Any]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn((batch, 1, size, size), generator=g)
        step_s, fwd_s = [], []
        start = time.perf_counter()
        with torch.no_grad():
            for t in scheduler.timesteps[:n_steps]:
                t0 = time.perf_counter()
                eps = model(torch.cat([x, mask], dim=1), t).sample[:, :1]
                t1 = time.perf_counter()
                kwargs = {"eta": eta} if eta is not None else {}
                x = scheduler.step(eps, t, x, generator=g, **kwargs).prev_sample
                step_s.append(time.perf_counter() - t0)
                fwd_s.append(t1 - t0)
        return time.perf_counter() - start, step_s, fwd_s, x

    ddim = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)
    ddim.set_timesteps(cfg["ddim_steps"])
    run(ddim, cfg["warmup_steps"], 0.0)  # oneDNN primitive creation, first-touch allocation
    total, step_s, fwd_s, x = run(ddim, None, 0.0)
    ddpm = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)
    ddpm.set_timesteps(cfg["ddpm_steps"])
    n_warm, n_meas = cfg["warmup_steps"], cfg["ddpm_measured_steps"]
    _, ddpm_step_s, _, _ = run(ddpm, n_warm + n_meas, None)
    return _sample_summary(cfg, batch, total, step_s, fwd_s, ddpm_step_s[n_warm:], bool(torch.isfinite(x).all()))


def sample_meddiff(job: dict, cfg: dict) -> dict:
    """The bundle's sampler: `meddiff.inferers.ConditionedSamplingInferer` on the inference.json network."""
    import torch

    from meddiff.data.transforms import encode_mask
    from meddiff.inferers import ConditionedSamplingInferer
    from meddiff.precision import cast_for_inference

    size, batch = job["size"], cfg["sample_batch"]
    fast = job["variant"] == "fast"
    precision, channels_last = ("bf16", True) if fast else ("fp32", False)
    torch.manual_seed(0)
    network = bundle_network(cfg["net"]).eval()
    cond = torch.stack([encode_mask(synthetic_pair(size, i)[1], NUM_CLASSES) for i in range(batch)])
    pre: list[float] = []
    post: list[float] = []
    limit: list[int | None] = [None]

    class _Stop(Exception):
        pass

    # closures, not bound methods: cast_for_inference deep-copies the network, hooks included
    def pre_hook(_module: Any, _args: Any) -> None:
        pre.append(time.perf_counter())

    def post_hook(_module: Any, _args: Any, _out: Any) -> None:
        post.append(time.perf_counter())
        if limit[0] is not None and len(post) >= limit[0]:
            raise _Stop

    network.register_forward_pre_hook(pre_hook)
    network.register_forward_hook(post_hook)

    def inferer(sampler: str, steps: int) -> ConditionedSamplingInferer:
        return ConditionedSamplingInferer(
            out_channels=1,
            sampler=sampler,
            num_inference_steps=steps,
            num_train_timesteps=TRAIN_TIMESTEPS,
            precision=precision,
            channels_last=channels_last,
            seed=0,
        )

    inferer("ddim", cfg["warmup_steps"])(cond, network)  # warm-up
    pre.clear(), post.clear()
    start = time.perf_counter()
    x = inferer("ddim", cfg["ddim_steps"])(cond, network)
    total = time.perf_counter() - start
    step_s = [b - a for a, b in zip(post[:-1], post[1:])]
    fwd_s = [b - a for a, b in zip(pre, post)]
    n_warm, n_meas = cfg["warmup_steps"], cfg["ddpm_measured_steps"]
    pre.clear(), post.clear()
    limit[0] = n_warm + n_meas + 1
    try:
        inferer("ddpm", cfg["ddpm_steps"])(cond, network)
    except _Stop:
        pass
    ddpm_step_s = [b - a for a, b in zip(post[:-1], post[1:])][n_warm:]
    limit[0] = None
    t0 = time.perf_counter()
    cast_for_inference(network, precision, channels_last)
    cast_s = time.perf_counter() - t0
    out = _sample_summary(cfg, batch, total, step_s, fwd_s, ddpm_step_s, bool(torch.isfinite(x).all()))
    out["cast_for_inference_s"] = cast_s
    out["precision"], out["channels_last"] = precision, channels_last
    return out


def _sample_summary(
    cfg: dict, batch: int, total: float, step_s: list, fwd_s: list, ddpm_step_s: list, finite: bool
) -> dict:
    ddpm_step = median(ddpm_step_s)
    return {
        "batch": batch,
        "ddim_steps": cfg["ddim_steps"],
        "ddim_total_s": total,
        "ddim_s_per_image": total / batch,
        "ddim_step_s_median": median(step_s),
        "forward_s_median": median(fwd_s),
        "ddpm_steps": cfg["ddpm_steps"],
        "ddpm_step_s_median": ddpm_step,
        "ddpm_step_s_all": [round(s, 4) for s in ddpm_step_s],
        "ddpm_total_s": ddpm_step * cfg["ddpm_steps"],
        "ddpm_s_per_image": ddpm_step * cfg["ddpm_steps"] / batch,
        "ddpm_extrapolated_from_steps": len(ddpm_step_s),
        "output_finite": finite,
    }


def peak_and_flops(job: dict, cfg: dict) -> dict:
    """The machine's fp32 and bf16 matmul peaks, and the networks' FLOPs (counted on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    n, reps = cfg["matmul_n"], cfg["matmul_reps"]

    def ceiling(fn: Callable[[], Any], gflop: float) -> dict[str, float]:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        # the ceiling is the best repeat; the median is kept to show the spread
        return {"reps": reps, "best_s": min(times), "median_s": median(times), "gflops": gflop / min(times)}

    peaks: dict[str, dict] = {"matmul": {}, "conv": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        peaks["matmul"][name] = {"n": n, **ceiling(lambda a=a, b=b: a @ b, 2 * n**3 / 1e9)}
    # a level-1 resnet conv of the UNet at 128² input (3x3, 128->128 channels, 64² pixels, the training batch)
    cb, cc, cs = cfg["train_batch"], 128 if cfg["net"] == "paper" else 32, cfg["sizes"][-1] // 2
    conv_gflop = 2 * cb * cc * cc * 9 * cs * cs / 1e9
    for name, dtype, fmt in (
        ("fp32", torch.float32, torch.contiguous_format),
        ("bf16_channels_last", torch.bfloat16, torch.channels_last),
    ):
        conv = torch.nn.Conv2d(cc, cc, 3, padding=1).to(dtype=dtype, memory_format=fmt).eval()
        x = torch.randn(cb, cc, cs, cs, dtype=dtype).contiguous(memory_format=fmt)
        with torch.no_grad():
            peaks["conv"][name] = {"shape": [cb, cc, cs, cs], **ceiling(lambda conv=conv, x=x: conv(x), conv_gflop)}

    def count(net: Any, in_ch: int, size: int, batch: int, backward: bool) -> float:
        x = torch.randn(batch, in_ch, size, size, device="meta")
        t = torch.zeros(batch, dtype=torch.long, device="meta")
        with FlopCounterMode(display=False) as counter:
            y = net(x, t)
            y = y.sample if hasattr(y, "sample") else y
            if backward:
                y.float().pow(2).mean().backward()
        return counter.get_total_flops() / 1e9

    flops: dict[str, dict] = {"seed": {}, "meddiff": {}}
    for size in cfg["sizes"]:
        with torch.device("meta"):
            nets = {"seed": (seed_network(size, cfg["net"]), 2), "meddiff": (bundle_network(cfg["net"]), NUM_CLASSES)}
        for impl, (net, in_ch) in nets.items():
            flops[impl]["params"] = sum(p.numel() for p in net.parameters())
            flops[impl][str(size)] = {
                "fwd_gflop_sample_batch": count(net, in_ch, size, cfg["sample_batch"], False),
                "fwd_gflop_train_batch": count(net, in_ch, size, cfg["train_batch"], False),
                "fwd_bwd_gflop_train_batch": count(net, in_ch, size, cfg["train_batch"], True),
            }
    return {**peaks, "flops": flops}


def attention_check(job: dict, cfg: dict) -> dict:
    """`use_flash_attention` True vs False in the bundle network: output difference and forward / train-step time."""
    import torch

    from meddiff.precision import autocast, cast_for_inference

    size, reps = cfg["attention_size"], cfg["attention_reps"]
    torch.manual_seed(0)
    nets = {flag: bundle_network(cfg["net"], use_flash_attention=flag).eval() for flag in (True, False)}
    with torch.no_grad():  # MONAI zero-initialises the output convs (the output is 0): give every weight a value
        for p in nets[True].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    nets[False].load_state_dict(nets[True].state_dict())
    out_attn = [m for m in nets[True].modules() if type(m).__name__ == "SABlock"]
    x = torch.randn(1, NUM_CLASSES, size, size)
    t = torch.full((1,), 500, dtype=torch.long)
    out: dict[str, Any] = {"size": size, "reps": reps}
    with torch.no_grad():
        ref = {flag: net(x, t) for flag, net in nets.items()}
    out["fp32_max_abs_diff"] = float((ref[True] - ref[False]).abs().max())
    out["fp32_output_max_abs"] = float(ref[True].abs().max())
    out["attention_blocks"] = len(out_attn)
    out["flash_flag_in_blocks"] = sorted({bool(m.use_flash_attention) for m in out_attn})
    for precision, cl in (("fp32", False), ("bf16", True)):
        for flag, net in nets.items():
            fast = cast_for_inference(net, precision, cl)
            xin = x.to(next(fast.parameters()).dtype)
            xin = xin.contiguous(memory_format=torch.channels_last) if cl else xin
            times = []
            with torch.no_grad():
                for i in range(reps + 1):
                    t0 = time.perf_counter()
                    fast(xin, t)
                    if i:
                        times.append(time.perf_counter() - t0)
            out[f"sample_fwd_{precision}{'_cl' if cl else ''}_flash_{flag}_s"] = median(times)
    tb = cfg["train_batch"]
    xb = torch.randn(tb, NUM_CLASSES, size // 2, size // 2).contiguous(memory_format=torch.channels_last)
    tt = torch.randint(0, TRAIN_TIMESTEPS, (tb,))
    for flag, net in nets.items():
        net.train().to(memory_format=torch.channels_last)
        times = []
        for i in range(max(reps - 2, 1) + 1):
            t0 = time.perf_counter()
            with autocast("cpu", "bf16"):
                y = net(xb, timesteps=tt)
            y.float().pow(2).mean().backward()
            net.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
        out[f"train_fwd_bwd_bf16_cl_{size // 2}px_b{tb}_flash_{flag}_s"] = median(times)
    return out


WORKERS: dict[tuple[str, str], Callable[[dict, dict], dict]] = {
    ("train", "seed"): train_seed,
    ("train", "meddiff"): train_meddiff,
    ("sample", "seed"): sample_seed,
    ("sample", "meddiff"): sample_meddiff,
    ("peak", "-"): peak_and_flops,
    ("attention", "-"): attention_check,
}


def worker(jobs: list[dict], cfg: dict, result_path: str) -> None:
    """Run `jobs` in this process and write their results as JSON to `result_path`."""
    import torch

    results = []
    for job in jobs:
        t0 = time.perf_counter()
        res = WORKERS[(job["kind"], job["impl"])](job, cfg)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        res.update(
            {
                "job": job,
                "wall_s": time.perf_counter() - t0,
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                "torch_threads": torch.get_num_threads(),
                "user_cpu_s": usage.ru_utime,
                "system_cpu_s": usage.ru_stime,
                "minor_page_faults": usage.ru_minflt,
                **proc_memory_mib(),
            }
        )
        results.append(res)
    Path(result_path).write_text(json.dumps(results))


# ----------------------------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------------------------


def job_list(cfg: dict) -> list[dict]:
    """Every configuration, one subprocess each (in --quick, grouped by malloc setting)."""
    jobs = [{"kind": "peak", "impl": "-", "variant": "-", "size": 0, "malloc": False, "name": "peak_flops"}]
    for size in cfg["sizes"]:
        train = [
            ("seed", "fp32", False),
            ("meddiff", "fp32", False),
            ("meddiff", "fast", True),
            ("meddiff", "bf16", True),
        ]
        if size >= 128:  # the malloc trap needs tensors > 32 MiB: 128² batch 4 fp32 has them, 64² does not
            train += [("seed", "fp32", True), ("meddiff", "fp32", True)]
        sample = [("seed", "fp32", False), ("meddiff", "fp32", False), ("meddiff", "fast", True)]
        for kind, variants in (("train", train), ("sample", sample)):
            for impl, variant, malloc in variants:
                suffix = "_malloc" if malloc and variant == "fp32" else ""
                name = f"{kind}_{size}_{impl}_{variant}{suffix}"
                jobs.append(
                    {"kind": kind, "impl": impl, "variant": variant, "size": size, "malloc": malloc, "name": name}
                )
    jobs.append({"kind": "attention", "impl": "-", "variant": "-", "size": 0, "malloc": False, "name": "attention"})
    return jobs


def run_jobs(jobs: list[dict], cfg: dict, malloc: bool) -> list[dict]:
    """Run `jobs` in one fresh subprocess, with or without the glibc malloc setting."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["MEDDIFF_NO_REEXEC"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "shared"), env.get("PYTHONPATH")]))
    if malloc:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(jobs), "--cfg", json.dumps(cfg)]
        busy0, child0, t0 = machine_busy_s(), _children_cpu_s(), time.perf_counter()
        subprocess.run([*cmd, "--result", str(result)], env=env, check=True)
        wall, own = time.perf_counter() - t0, _children_cpu_s() - child0
        foreign = max(machine_busy_s() - busy0 - own, 0.0)
        results = json.loads(result.read_text())
    for r in results:  # CPU time other processes took while this subprocess ran: > ~5% means the timings are suspect
        r["foreign_cpu_s"], r["foreign_cpu_fraction"] = foreign, foreign / (wall * (os.cpu_count() or 1))
    return results


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_info() -> dict:
    """CPU, memory, library versions (diffusers too), date."""
    return common_machine_info("diffusers")


def update_readme(table: str) -> None:
    """Replace this benchmark's generated block in bench/README.md (other sections are left as they are)."""
    update_readme_block(BEGIN, END, "SegGuidedDiff (breast MRI bundle) vs the seed: `bench/seg_guided.py`", table)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --worker, one batch of its configurations)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny network, few steps: a smoke run (< 1 min)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/seg_guided[_quick].json)")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    ap.add_argument(
        "--max-wait",
        type=float,
        default=None,
        help="before each configuration, wait up to this many seconds (default 300; --quick: 0) for "
        "other processes to leave the CPUs idle (0: do not wait); CPU use by others is recorded either way",
    )
    ap.add_argument("--retries", type=int, default=2, help="repeat a configuration if others used the CPUs meanwhile")
    ap.add_argument("--max-foreign", type=float, default=0.05, help="accepted CPU share of other processes")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), json.loads(args.cfg), args.result)
        return 0

    sys.path.insert(0, str(REPO / "shared"))
    from meddiff.io import save_json

    cfg = QUICK if args.quick else FULL
    if args.max_wait is None:
        args.max_wait = 0.0 if args.quick else 300.0
    if args.quick:
        args.retries = 0
    out = Path(args.out) if args.out else RESULTS / ("seg_guided_quick.json" if args.quick else "seg_guided.json")
    machine = machine_info()
    start = time.perf_counter()
    jobs = job_list(cfg)
    raw: dict[str, dict] = {}
    if args.quick:  # two processes (one per malloc setting) instead of one per configuration
        batches = [[j for j in jobs if j["malloc"] == m] for m in (False, True)]
    else:
        batches = [[j] for j in jobs]
    measured_wall = 0.0
    for batch in batches:
        for attempt in range(1, args.retries + 2):
            busy = wait_for_quiet(args.max_wait) if args.max_wait > 0 else None
            t0 = time.perf_counter()
            results = run_jobs(batch, cfg, batch[0]["malloc"])
            foreign = max(r["foreign_cpu_fraction"] for r in results)
            if foreign <= args.max_foreign or attempt > args.retries:
                break
            print(f"  other processes took {100 * foreign:.0f}% of the CPUs during the run: repeating it", flush=True)
        measured_wall += time.perf_counter() - t0
        for r in results:
            r["foreign_cpu_fraction_before"], r["attempts"] = busy, attempt
            raw[r["job"]["name"]] = r
        names = ", ".join(j["name"] for j in batch)
        print(f"[{time.perf_counter() - start:6.0f} s] {names} ({time.perf_counter() - t0:.0f} s)", flush=True)
    res = {
        "benchmark": "seg_guided",
        "quick": args.quick,
        "machine": machine,
        "config": cfg,
        "notes": {
            "train_batch": f"training batch {cfg['train_batch']} for both sizes",
            "sample_batch": f"sampling batch {cfg['sample_batch']}; seconds are per image",
            "ddpm": "DDPM-1000 seconds are extrapolated: median per-step time of the real loop over "
            "ddpm_extrapolated_from_steps steps (after warm-up) x 1000, for the seed and meddiff alike",
            "meddiff_fp32": "the bundle's train.json trainer at precision fp32: make_adamw is its optimizer, so "
            "fused AdamW is on in meddiff fp32 too",
            "malloc": f"'fast' and '*_malloc' runs set GLIBC_TUNABLES={MALLOC_TUNABLES}; the others do not",
            "peak_rss": "VmHWM of each configuration's own subprocess"
            + (" (quick: shared processes, so cumulative)" if args.quick else ""),
        },
        **summarize(raw, cfg),
    }
    res["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    res["total_wall_s"] = time.perf_counter() - start
    res["measured_wall_s"] = measured_wall  # the accepted runs only: no waiting, no repeats
    save_json(res, out)
    table = render_markdown(res)
    print(table)
    if not args.quick and not args.no_readme:
        update_readme(table)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
