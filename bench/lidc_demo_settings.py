"""Which LIDC demo settings converge in the demo's few CPU minutes? A sweep of bundle overrides, 2 seeds each.

`python -m meddiff demo --bundle lidc_ambiguous_segmentation` trains the CIMD bundle with its `configs/demo.json`
(32 px, network [32, 64], 600 epochs of 16 synthetic cases at batch 8 = 1200 iterations, lr 1e-3, DDPM 10) on
`meddiff.data.lidc.make_synthetic_lidc` data, samples 8-member ensembles of the test cases and evaluates them
(`meddiff.ensembles.evaluate_ensembles`, whose `verdict` says "undertrained" when members mark < 1/3 or > 3x the
raters' foreground or the GED is no better than all-empty members').

For every candidate (bundle overrides on top of demo.json, plus synthetic-data arguments such as ``num_train``) and
seed (the bundle's ``seed``: initialisation, batches, noise, sampling; the data stay the demo's, seed 0), one process
runs the demo's three bundle runs (`meddiff.demo.run_bundle`: training with train.json + demo.json, inference with
inference.json + demo.json, evaluation with evaluate.json on top) and records the iterations trained (from the
checkpoint), seconds per phase, and per sampling step count (the same weights sampled at each of ``--steps``) the
mean metrics and the verdict, over all ``--num-test`` test cases and over the first 4 (the demo's own test set:
cases are drawn in order from one random stream, so the first 4 test cases are the demo's). ``precision`` is forced
to fp32, TF32 off, so that a GPU run matches a CPU without bf16 units (on CUDA "auto" would pick bf16; the JSON records
what it resolves to on the machine). Training writes its resumable checkpoint once at the end rather than after every
epoch (``--save-every-epoch`` keeps train.json's way); that changes the time, not the training. Several runs go in
parallel processes (``--jobs``); the results file is rewritten atomically after every run, and runs still going at
``--deadline-s`` are stopped and recorded as such (runs that the seconds per iteration seen so far say cannot end
in time are not started).

On one GPU the processes time-share it: on an H200, 16 at once trained at 0.13 s per iteration each (about 120
iterations per second in all, the GPU 99 % busy), so 1200 iterations took about 157 s per run; size ``--jobs`` and
``--deadline-s`` for that.

Relative CPU cost of a candidate = FLOPs of its training (forward + backward of the whole CIMD network, per
iteration, times iterations) plus sampling (denoiser forward of 8 members x steps x the demo's 4 test cases),
divided by the same for today's demo.json (DDPM 10); counted with `torch.utils.flop_counter` on the CPU. Small
networks at 32 px are partly overhead-bound on a CPU, so smaller networks or batches cost somewhat more than this.

Usage:
    python bench/lidc_demo_settings.py --jobs 16 --out $OUT/lidc_demo_settings.json   # the sweep (a GPU machine)
    python bench/lidc_demo_settings.py --quick --candidates demo,px64_ep300 --jobs 2  # smoke run, about 1 minute
    python bench/lidc_demo_settings.py --report bench/results/lidc_demo_settings_vm_cuda.json  # the table of a JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = "lidc_ambiguous_segmentation"
CONFIGS = REPO / "bundles" / BUNDLE / "configs"
RESULTS = REPO / "bench" / "results"
DEMO = json.loads((CONFIGS / "demo.json").read_text())
DEMO_DATA = {"num_train": 16, "num_test": 4, "size": 128, "seed": 0}  # make_synthetic_lidc's defaults: the demo's
DEMO_TEST = DEMO_DATA["num_test"]
DEMO_STEPS = DEMO["num_inference_steps"]
SMALL_NET = {"network_channels": [16, 32], "num_head_channels": 16, "norm_num_groups": 8}
MODEL_KEYS = (
    "img_size",
    "network_channels",
    "attention_levels",
    "num_res_blocks",
    "num_head_channels",
    "norm_num_groups",
    "encoder_channels",
    "encoder_convs_per_block",
    "latent_dim",
    "cimd_design",
)

# name -> (bundle overrides on top of demo.json, synthetic-data arguments on top of DEMO_DATA); in priority order
CANDIDATES: dict[str, tuple[dict, dict]] = {
    "demo": ({}, {}),
    "lr2e-3": ({"learning_rate": 2e-3}, {}),
    "lr3e-4": ({"learning_rate": 3e-4}, {}),
    "bs4": ({"batch_size": 4}, {}),  # 600 epochs of 16 at batch 4: 2400 iterations, the same images seen
    "bs4_lr2e-3": ({"batch_size": 4, "learning_rate": 2e-3}, {}),
    "train64_ep150": ({"num_epochs": 150}, {"num_train": 64}),  # 1200 iterations at batch 8, 4x the variety
    "train64_ep150_bs4_lr2e-3": ({"num_epochs": 150, "batch_size": 4, "learning_rate": 2e-3}, {"num_train": 64}),
    "net16-32_ep2400": ({**SMALL_NET, "num_epochs": 2400}, {}),  # 4800 iterations of a network ~1/4 the size
    "ep1200": ({"num_epochs": 1200}, {}),
    "px48": ({"img_size": 48}, {}),
    "px64_ep300": ({"img_size": 64, "num_epochs": 300}, {}),
    "ep2400": ({"num_epochs": 2400}, {}),
    "train64_ep150_lr3e-4": ({"num_epochs": 150, "learning_rate": 3e-4}, {"num_train": 64}),  # 1200 iterations
    "no_ema": ({"ema_decay": 0.0}, {}),  # the raw weights, as the demo sampled before the weight average
}
QUICK = {"num_epochs": 2}


def data_args(candidate: str, num_test: int) -> dict:
    """make_synthetic_lidc arguments of a candidate (the demo's, with `num_test` test cases)."""
    return {**DEMO_DATA, **CANDIDATES[candidate][1], "num_test": num_test}


def data_key(args: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in sorted(args.items()))


def settings_of(candidate: str, quick: bool) -> dict:
    """demo.json with the candidate's overrides (and the quick ones): the settings the bundle runs with."""
    return {**DEMO, **CANDIDATES[candidate][0], **(QUICK if quick else {})}


def iterations_of(settings: dict, num_train: int) -> int:
    """Training iterations: epochs x batches per epoch (the bundle's DataLoader keeps the last, smaller batch)."""
    return settings["num_epochs"] * math.ceil(num_train / settings["batch_size"])


def atomic_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- one run


def checkpoint_handler_index() -> int:
    """Index of the `TrainingCheckpoint` handler in train.json's ``train#handlers``."""
    handlers = json.loads((CONFIGS / "train.json").read_text())["train"]["handlers"]
    return next(i for i, h in enumerate(handlers) if h.get("_target_", "").endswith("TrainingCheckpoint"))


def worker(spec: dict) -> None:
    """One candidate at one seed: train, then sample and evaluate at each step count; write the result after each."""
    import torch

    from meddiff.demo import QUIET_LOGGING, bundles_dir, run_bundle
    from meddiff.ensembles import ensemble_verdict
    from meddiff.io import load_torch

    root, out = Path(spec["root"]), Path(spec["result"])
    bundle_dir = bundles_dir() / BUNDLE
    settings = {
        "bundle_root": str(root),
        "dataset_dir": spec["dataset_dir"],
        "logging_file": str(QUIET_LOGGING),
        "precision": "fp32",
        "seed": spec["seed"],
        **spec["overrides"],
    }
    train_settings = dict(settings)
    if not spec["save_every_epoch"]:  # one resumable checkpoint at the end instead of one per epoch: time only
        epochs = {**DEMO, **spec["overrides"]}["num_epochs"]
        train_settings[f"train#handlers#{checkpoint_handler_index()}#save_interval"] = epochs
    # fp32 as on a CPU: no TF32 in cuDNN convolutions (on by default) or matmuls
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    result = {"device": "cuda" if torch.cuda.is_available() else "cpu", "tf32": False, "phase": "training"}
    result["by_steps"] = {}
    atomic_json(result, out)
    start = time.perf_counter()
    run_bundle(bundle_dir, "training", ["train.json", "demo.json"], **train_settings)
    result["train_s"] = round(time.perf_counter() - start, 2)
    state = load_torch(root / "models" / "checkpoint.pt")
    result["iterations"], result["epochs"] = int(state["iteration"]), int(state["epoch"])
    result["s_per_iteration"] = round(result["train_s"] / max(1, result["iterations"]), 5)
    runs = [(steps, weights) for steps in spec["steps"] for weights in spec.get("weights", ["final"])]
    for steps, weights in runs:
        key = str(steps) if weights == "final" else f"{steps}_{weights}"
        result["phase"] = f"sampling {key}"
        atomic_json(result, out)
        s = {
            **settings,
            "num_inference_steps": steps,
            "weights_file": str(root / "models" / ("model.pt" if weights == "final" else "model_best.pt")),
            "output_dir": str(root / f"samples_{key}"),
            "grid_file": str(root / f"grid_{key}.png"),
            "metrics_file": str(root / f"metrics_{key}.json"),
        }
        start = time.perf_counter()
        run_bundle(bundle_dir, "run", ["inference.json", "demo.json"], **s)
        infer_s = time.perf_counter() - start
        start = time.perf_counter()
        run_bundle(bundle_dir, "evaluate", ["inference.json", "evaluate.json", "demo.json"], **s)
        eval_s = time.perf_counter() - start
        metrics = json.loads((root / f"metrics_{key}.json").read_text())
        names = sorted(metrics["per_image"], key=int)[: spec["demo_test"]]
        keys = metrics["mean"].keys()
        demo_mean = {k: sum(metrics["per_image"][n][k] for n in names) / len(names) for k in keys}
        result["by_steps"][key] = {
            "infer_s": round(infer_s, 2),
            "eval_s": round(eval_s, 2),
            "num_images": metrics["num_images"],
            "mean": metrics["mean"],
            "verdict": metrics["verdict"],
            "demo_images": names,
            "mean_demo": demo_mean,
            "verdict_demo": ensemble_verdict(demo_mean),
        }
    result["phase"] = "done"
    atomic_json(result, out)


# ---------------------------------------------------------------------------------------------------- costs


def flop_counts(settings: dict, num_samples: int) -> dict:
    """FLOPs of one training iteration (forward + backward, whole network) and one sampling step (all members)."""
    import torch
    from monai.bundle import ConfigParser
    from torch.utils.flop_counter import FlopCounterMode

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")])
    parser.update({"device": "$torch.device('cpu')", **{k: settings[k] for k in MODEL_KEYS if k in settings}})
    net = parser.get_parsed_content("network_def").train()
    size, batch = settings["img_size"], settings["batch_size"]
    torch.manual_seed(0)
    x, image, mask = (torch.randn(batch, 1, size, size) for _ in range(3))
    t, alpha_bar = torch.randint(0, 1000, (batch,)), torch.rand(batch)
    with FlopCounterMode(display=False) as counter:
        eps, kl = net(x, t, image=image, mask=mask, alpha_bar=alpha_bar)
        (eps.square().mean() + kl.sum()).backward()
    train = counter.get_total_flops()
    net.eval()
    x, image = torch.randn(num_samples, 1, size, size), torch.randn(num_samples, 1, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.denoise(x, torch.full((num_samples,), 500), image, None)
    params = sum(p.numel() for p in net.parameters())
    return {"train_per_iteration": int(train), "sample_per_step": int(counter.get_total_flops()), "params": params}


def relative_costs(candidates: list[str], steps: list[int], quick: bool) -> dict:
    """Per candidate: FLOPs and the CPU cost of its demo relative to today's demo.json at each sampling step count."""
    import torch

    torch.set_num_threads(1)
    base_settings = dict(DEMO)
    base = flop_counts(base_settings, DEMO["num_samples"])
    base_total = (
        base["train_per_iteration"] * iterations_of(base_settings, DEMO_DATA["num_train"])
        + base["sample_per_step"] * DEMO_STEPS * DEMO_TEST
    )
    out = {}
    for name in candidates:
        settings = settings_of(name, quick)
        counts = flop_counts(settings, settings["num_samples"])
        its = iterations_of(settings, data_args(name, DEMO_TEST)["num_train"])
        train = counts["train_per_iteration"] * its
        out[name] = {
            **counts,
            "iterations": its,
            "train_rel": round(train / base_total, 3),
            "relative_cpu_cost": {
                str(s): round((train + counts["sample_per_step"] * s * DEMO_TEST) / base_total, 3) for s in steps
            },
        }
    return out


# ---------------------------------------------------------------------------------------------------- the sweep


def device_tag() -> str:
    """ "cuda" where the runs will use a GPU, else "cpu" (part of the default result file name)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_facts() -> dict:
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from common import machine_info

    from meddiff.precision import resolve_precision

    info = machine_info()
    info["host"] = socket.gethostname()
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
        info["precision_auto_on_cuda"] = resolve_precision("auto", "cuda").value
    info["precision_auto_on_cpu"] = resolve_precision("auto", "cpu").value
    info["precision_used"] = "fp32 (forced)"
    return info


def sweep(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    names = args.candidates.split(",") if args.candidates else list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    steps = [2] if args.quick else args.steps
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lidc_demo_settings_"))
    out = Path(args.out) if args.out else RESULTS / f"lidc_demo_settings_{socket.gethostname()}_{device_tag()}.json"
    from meddiff.data.lidc import make_synthetic_lidc

    datasets = {}
    for name in names:
        params = data_args(name, args.num_test)
        key = data_key(params)
        if key not in datasets:
            datasets[key] = str(make_synthetic_lidc(work / "data" / key, **params))
    # the order of launch: every candidate at the first seed, then at the next; the longest first within a seed
    runs = []
    for seed in args.seeds:
        per_seed = []
        for name in names:
            settings = settings_of(name, args.quick)
            params = data_args(name, args.num_test)
            its = iterations_of(settings, params["num_train"])
            per_seed.append({"candidate": name, "seed": seed, "iterations_planned": its, "data": params})
        runs += sorted(
            per_seed, key=lambda r: -r["iterations_planned"] * settings_of(r["candidate"], False)["img_size"] ** 2
        )
    report = {
        "benchmark": "lidc_demo_settings",
        "args": vars(args),
        "machine": machine_facts(),
        "demo_json": DEMO,
        "candidates": {n: {"overrides": CANDIDATES[n][0], "data": data_args(n, args.num_test)} for n in names},
        "runs": [],
        "finished": False,
    }
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    pending, running, done = list(runs), [], []
    deadline = t_start + args.deadline_s
    costs_done = False

    def record(run: dict, status: str) -> None:
        res = json.loads(Path(run["result"]).read_text()) if Path(run["result"]).is_file() else {}
        row = {k: run[k] for k in ("candidate", "seed", "iterations_planned", "data")}
        row.update(status=status, rc=run["proc"].returncode, wall_s=round(time.perf_counter() - run["t0"], 1), **res)
        if status != "ok":
            log = Path(run["log"]).read_text(errors="replace") if Path(run["log"]).is_file() else ""
            row["log_tail"] = log[-3000:]
        done.append(row)
        report["runs"] = done
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        atomic_json(report, out)
        s = row.get("by_steps", {}).get(str(steps[0]), {}).get("mean", {})
        print(
            f"[{report['wall_s']:6.1f}s] {row['candidate']} seed {row['seed']}: {status} in {row['wall_s']} s "
            f"(train {row.get('train_s')} s, {row.get('iterations')} it)"
            + (
                f"; steps {steps[0]}: members {100 * s['member_foreground']:.2f}% raters "
                f"{100 * s['rater_foreground']:.2f}% GED {s['ged']:.3f} (empty {s['ged_empty_members']:.3f})"
                if s
                else ""
            ),
            flush=True,
        )

    while pending or running:
        now = time.perf_counter()
        # per-iteration seconds seen so far (slowest finished run), to skip runs that cannot end before the deadline
        rates = [r["train_s"] / max(1, r["iterations"]) for r in done if r.get("iterations")]
        while pending and len(running) < args.jobs:
            run = pending.pop(0)
            if rates and now + 20 + 1.2 * max(rates) * run["iterations_planned"] > deadline:
                print(f"skipped {run['candidate']} seed {run['seed']}: would not end before the deadline", flush=True)
                done.append({**run, "status": "skipped (deadline)"})
                continue
            tag = f"{run['candidate']}_s{run['seed']}"
            run.update(root=str(work / "runs" / tag), result=str(work / "runs" / f"{tag}.json"))
            run["log"] = str(work / "runs" / f"{tag}.log")
            spec = {
                "root": run["root"],
                "result": run["result"],
                "dataset_dir": datasets[data_key(run["data"])],
                "seed": run["seed"],
                "overrides": {**CANDIDATES[run["candidate"]][0], **(QUICK if args.quick else {})},
                "steps": steps,
                "weights": args.weights,
                "demo_test": DEMO_TEST,
                "save_every_epoch": args.save_every_epoch,
            }
            (work / "runs").mkdir(parents=True, exist_ok=True)
            with open(run["log"], "w") as log:
                run["proc"] = subprocess.Popen(
                    [sys.executable, __file__, "--worker", json.dumps(spec)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            run["t0"] = time.perf_counter()
            running.append(run)
        if not costs_done:  # while the first runs go
            report["costs"] = relative_costs(names, steps, args.quick)
            atomic_json(report, out)
            costs_done = True
        time.sleep(0.5)
        for run in list(running):
            if run["proc"].poll() is not None:
                running.remove(run)
                record(run, "ok" if run["proc"].returncode == 0 else "failed")
        if time.perf_counter() > deadline:
            for run in running:
                run["proc"].kill()
                run["proc"].wait()
                record(run, "stopped at the deadline")
            running = []
            for run in pending:
                done.append({k: run[k] for k in ("candidate", "seed", "iterations_planned")} | {"status": "not run"})
            pending = []
    report["runs"] = [{k: v for k, v in r.items() if k not in ("proc", "t0")} for r in done]
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report["finished"] = True
    atomic_json(report, out)
    print(f"wrote {out}", flush=True)
    print(table(report), flush=True)
    return report


# ---------------------------------------------------------------------------------------------------- the table


def short(verdict: str) -> str:
    return "undertrained" if verdict.startswith("undertrained") else "ok"


def table(report: dict) -> str:
    """A markdown table: one row per candidate, seed and step count."""
    lines = [
        "| candidate | seed | steps | iterations | rel. CPU cost | member fg | rater fg | GED | GED empty | CI | "
        "verdict (all test) | verdict (demo 4) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    costs = report.get("costs", {})
    for run in sorted(report["runs"], key=lambda r: (list(report["candidates"]).index(r["candidate"]), r["seed"])):
        by_steps = run.get("by_steps") or {}
        if not by_steps:
            lines.append(
                f"| {run['candidate']} | {run['seed']} | | {run.get('iterations_planned')} | | | | | | | "
                f"{run['status']} | | {run.get('train_s', '')} |"
            )
            continue
        for steps, r in by_steps.items():
            m, cost = r["mean"], costs.get(run["candidate"], {}).get("relative_cpu_cost", {}).get(steps, "")
            lines.append(
                f"| {run['candidate']} | {run['seed']} | {steps} | {run.get('iterations')} | {cost} | "
                f"{100 * m['member_foreground']:.2f}% | {100 * m['rater_foreground']:.2f}% | {m['ged']:.3f} | "
                f"{m['ged_empty_members']:.3f} | {m['ci']:.3f} | {short(r['verdict'])} | {short(r['verdict_demo'])} | "
                f"{run.get('train_s')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default=None, help=f"comma-separated, from {list(CANDIDATES)} (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the bundle's seed, one run each")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50], help="DDPM steps sampled per trained model")
    ap.add_argument("--num-test", type=int, default=12, help="synthetic test cases (the first 4 are the demo's)")
    ap.add_argument(
        "--weights", nargs="+", default=["final"], choices=["final", "best"],
        help="sample the final weights (model.pt) and/or the best validated ones (model_best.pt)",
    )  # fmt: skip
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel processes")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run")
    ap.add_argument("--deadline-s", type=float, default=3600.0, help="stop runs still going after this many seconds")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} and 2 sampling steps")
    ap.add_argument(
        "--out", default=None, help="result JSON (default bench/results/lidc_demo_settings_<host>_<cuda|cpu>.json)"
    )
    ap.add_argument("--workdir", default=None, help="where data and runs go (default: a new temporary folder)")
    ap.add_argument(
        "--save-every-epoch",
        action="store_true",
        help="keep train.json's checkpoint after every epoch (default: once at the end; the training is the same)",
    )
    ap.add_argument("--report", default=None, help="print the table of a result JSON and exit")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return 0
    sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
