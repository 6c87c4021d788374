"""Histology augmentation (bundles/histology_augmentation): guided samplers at equal intended-class rate, and training
precision, on this CPU, in one run.

**Sampling.** The bundle's three models are trained on built-in synthetic tiles
(`meddiff.data.histology.make_synthetic_histology`: ADI, DEB, LYM, TUM, 16 training + 4 test tiles per class, 64 px)
with the bundle's own configs through ``monai.bundle.run``, layered as ``configs/demo.json``'s ``demo_plan`` says
(``train_autoencoder.json``; ``+ train_diffusion.json``; ``+ train_classifier.json``) with ``configs/demo.json`` merged
last (the demo's tiny networks, read at 32 px: 8x8x3 latents), each stage's ``num_epochs`` from the command line
(``--bundle-root`` reuses models trained before). Then ``configs/inference.json`` (+ ``demo.json``) runs in this
process (``ConfigWorkflow``, run id "run") for each setting, on the same weights, classes, item seeds and batch size:

- ddim50: DDIM, 50 steps, eta 1, classifier scale 10: the seed's sampler and the bundle's default;
- dpmpp_2m_10 / dpmpp_2m_20: DPM-Solver++(2M), 10 / 20 steps, classifier scale 10: the few-step solver;
- ddim50_unguided: as ddim50 with classifier scale 0 (the baseline of the guidance check).

Seconds per sample = wall time of ``evaluator.run()`` (sampling, guidance, decoding and writing the PNGs; the networks
are built and the autoencoder and classifier loaded before the clock starts, the diffusion weights by the evaluator's
loader handler inside it) / number of tiles; every setting runs ``--repeats`` times round-robin after one untimed
warm-up run, median. Quality: each guided setting's folder is scored by
`meddiff.evaluation.histology.evaluate_histology_augmentation` (``downstream_seeds=()``, the unguided folder as
``unguided_dir``), whose guidance-check classifier is trained anew in each call from the same seed and data (so the
calls' classifiers, test accuracies and unguided rates must agree; the JSON records them per call). Per setting: the
intended-class rate overall and per class, FID overall against the real training tiles, the ratio of ddim50's
s/sample to its own, and whether its rate is within the tolerance of ddim50's: ``|p - p_ddim50| <= 2 SE``, SE the
binomial standard error of the difference of two independent rates, ``sqrt(p (1 - p) / n + p0 (1 - p0) / n0)``
(``1 / n`` when both rates are 0 or 1). The settings share item seeds, so their rates are positively correlated and
this SE overstates the noise of the difference: the tolerance is generous.

**Training precision.** One training step, fp32 against bf16 autocast (``meddiff.precision.autocast`` through the
bundle's own inferers, i.e. the bundle's ``precision: bf16``), side by side in this process: two copies of the same
initial weights, the same batches (the synthetic tiles), posterior noise, diffusion noise and timesteps at every step,
steps interleaved (the order alternating), median over the timed steps after warm-up steps:

- autoencoder: one `AdversarialTrainer` iteration as the bundle wires it: `AutoencoderKLInferer` (posterior sample,
  under autocast), `AutoencoderLoss` (L1 + 1e-6 KL), `PatchDiscriminator` on the fakes, `GeneratorAdversarialLoss`
  (hinge, weight 0.5, CompVis' adaptive weight from the decoder's last layer) active from the first step, backward,
  Adam step (lr 5.4e-5, betas 0.5, 0.9); then the discriminator on reals and detached fakes,
  `DiscriminatorAdversarialLoss`, backward, its Adam step. The discriminator runs in fp32 in both, as the trainer
  calls it (``d_inferer`` is a plain `SimpleInferer`; the bundle's precision reaches the generator only);
- latent diffusion: `DiffusionTrainingInferer` (scaled-linear 1000-step schedule, autocast) on latents, L1 on eps,
  backward, gradient clipping at 1.0, fused AdamW (``make_adamw``, lr 5e-5). Latents are N(0, 1) draws (the bundle's
  scaled latents have unit variance by construction); the frozen autoencoder's encoding that `LatentPrepareBatch`
  adds to each bundle step (fp32, no autocast) is left out.

At the seed's architectures (autoencoder channels [128, 256, 512], 2 res blocks, 3 latent channels, discriminator 64
channels, 3 layers; UNet [192, 384, 384, 768, 768], attention [T, T, T, T, F], head channels C / 8, 2 res blocks,
resblock_updown) at a CPU-feasible size (``--seed-size`` px tiles, 64: 16 px latents, the smallest the UNet's four
halvings allow; ``--seed-batch`` 2; the seed trains at 256 px, batch 6 and 4), and at the demo's tiny architecture
(``demo.json``: 32 px tiles, batch 16). Reported: s/step, images/s, the bf16 / fp32 speed ratio, and beside it the
numerical cost: the relative loss difference (bf16 - fp32) / fp32 at step 1 (identical weights: the forward's
rounding alone) and at the last step k (after k - 1 optimizer steps each: rounding plus the trajectories' drift), and
the relative distance of the predictions (reconstruction, or eps) at step k. Early training is chaotic, so a third
copy, the control, trains in fp32 from the initial weights rounded to bf16: its distance from the fp32 copy at step k
is the drift a perturbation of bf16's size causes by itself, the floor against which the bf16 numbers are read.

The whole run re-executes itself with the glibc malloc setting (`meddiff.precision.MALLOC_TUNABLES`), as
``python -m meddiff`` does, waits for a quiet machine before each part, and records the other processes' CPU share.

Usage:
    OMP_NUM_THREADS=2 python bench/histology_augmentation.py           # the benchmark (about 15 min on 2 cores)
    OMP_NUM_THREADS=2 python bench/histology_augmentation.py --quick   # smoke run (few epochs and steps), /tmp
    python bench/histology_augmentation.py --report bench/results/histology_augmentation_cpu.json   # the table
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
BUNDLE = REPO / "bundles" / "histology_augmentation"
CONFIGS = BUNDLE / "configs"
OUT = REPO / "bench" / "results" / "histology_augmentation_cpu.json"
QUICK_OUT = Path(tempfile.gettempdir()) / "histology_augmentation_quick.json"
BEGIN, END = "<!-- histology_augmentation:tables:begin -->", "<!-- histology_augmentation:tables:end -->"
TITLE = "Histology augmentation, guided DDIM-50 vs the few-step solver, bf16 vs fp32 training: " + (
    "`bench/histology_augmentation.py`"
)
CLASSES = ("ADI", "DEB", "LYM", "TUM")
BASE = "ddim50"
UNGUIDED = "ddim50_unguided"
SETTINGS = {  # inference.json settings per row
    "ddim50": {"sampler": "ddim", "num_inference_steps": 50, "eta": 1.0, "classifier_scale": 10.0},
    "dpmpp_2m_10": {"sampler": "dpmpp_2m", "num_inference_steps": 10, "classifier_scale": 10.0},
    "dpmpp_2m_20": {"sampler": "dpmpp_2m", "num_inference_steps": 20, "classifier_scale": 10.0},
    "ddim50_unguided": {"sampler": "ddim", "num_inference_steps": 50, "eta": 1.0, "classifier_scale": 0.0},
}
QUICK_STEPS = {"ddim50": 6, "dpmpp_2m_10": 2, "dpmpp_2m_20": 4, "ddim50_unguided": 6}
STAGE_EPOCHS = {  # the last config of a demo_plan training step -> the command-line flag of its epochs
    "train_autoencoder.json": "ae_epochs",
    "train_diffusion.json": "diffusion_epochs",
    "train_classifier.json": "classifier_epochs",
}
# the seed's architectures (train_autoencoder.json / train_diffusion.json defaults) and the demo's (demo.json)
SEED_ARCH = {
    "autoencoder": {"channels": [128, 256, 512], "num_res_blocks": 2, "norm_num_groups": 32},
    "discriminator": {"channels": 64, "num_layers_d": 3},
    "unet": {
        "channels": [192, 384, 384, 768, 768],
        "attention_levels": [True, True, True, True, False],
        "num_res_blocks": 2,
        "num_head_channels": [24, 48, 48, 96, 96],
        "norm_num_groups": 32,
        "resblock_updown": True,
    },
}
TINY_ARCH = {
    "autoencoder": {"channels": [16, 32, 32], "num_res_blocks": 1, "norm_num_groups": 8},
    "discriminator": {"channels": 16, "num_layers_d": 2},
    "unet": {
        "channels": [32, 64],
        "attention_levels": [False, True],
        "num_res_blocks": 1,
        "num_head_channels": [8, 16],
        "norm_num_groups": 8,
        "resblock_updown": False,
    },
}
LATENT_CHANNELS, DOWNSAMPLE = 3, 4  # the autoencoder halves the side twice (three levels)


def part_clock():
    """A clock for one part of the run: call the result to get its wall seconds and the other processes' CPU share."""
    import resource

    from common import machine_busy_s

    def self_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    t0, b0, c0 = time.perf_counter(), machine_busy_s(), self_cpu()

    def stop() -> dict:
        wall = time.perf_counter() - t0
        others = machine_busy_s() - b0 - (self_cpu() - c0)
        return {"wall_s": round(wall, 1), "others_cpu_share": round(others / (wall * (os.cpu_count() or 1)), 3)}

    return stop


# ----------------------------------------------------------------------------------------------------------- sampling
def train_models(bundle_root: Path, dataset_dir: Path, epochs: dict, logging_file: str) -> dict:
    """The bundle's training steps of demo.json's demo_plan, with demo.json merged last; seconds per stage."""
    from meddiff.demo import demo_plan, run_bundle

    seconds = {}
    for step in demo_plan(BUNDLE):
        if step["run_id"] != "training":
            continue
        last = step["configs"][-1]
        settings = {**step.get("settings", {}), "num_epochs": epochs[STAGE_EPOCHS[last]]}
        print(f"training {' + '.join(step['configs'])} + demo.json: {settings}", flush=True)
        start = time.perf_counter()
        run_bundle(
            BUNDLE,
            "training",
            [*step["configs"], "demo.json"],
            logging_file=logging_file,
            bundle_root=str(bundle_root),
            dataset_dir=str(dataset_dir),
            **settings,
        )
        seconds[last] = round(time.perf_counter() - start, 1)
    return seconds


def models_present(bundle_root: Path) -> bool:
    return all((bundle_root / "models" / m / "model.pt").is_file() for m in ("autoencoder", "diffusion", "classifier"))


def generate(bundle_root: Path, dataset_dir: Path, output_dir: Path, settings: dict, logging_file: str) -> dict:
    """One inference.json (+ demo.json) run in this process: seconds of ``evaluator.run()``, of the whole workflow,
    tiles written and network calls (UNet forwards; classifier forwards, each with a backward for the gradient)."""
    from monai.bundle import ConfigWorkflow

    start = time.perf_counter()
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "demo.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=logging_file,
        workflow_type=None,
        run_id="run",
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        overwrite=True,
        progress=False,
        **settings,
    )
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    calls = {"unet": 0, "classifier": 0}
    hooks = [
        workflow.parser.get_parsed_content("network").register_forward_hook(
            lambda *a: calls.__setitem__("unet", calls["unet"] + 1)
        )
    ]
    classifier = workflow.parser.get_parsed_content("classifier")
    if classifier is not None:
        hooks.append(
            classifier.register_forward_hook(lambda *a: calls.__setitem__("classifier", calls["classifier"] + 1))
        )
    ready = time.perf_counter()
    evaluator.run()
    run_s = time.perf_counter() - ready
    for hook in hooks:
        hook.remove()
    batches = len(evaluator.data_loader)
    num = len(json.loads((output_dir / "generation.json").read_text())["items"])
    workflow.finalize()
    return {
        "run_s": run_s,
        "workflow_s": time.perf_counter() - start,
        "n": num,
        "batches": batches,
        "unet_calls_per_batch": calls["unet"] / batches,
        "classifier_calls_per_batch": calls["classifier"] / batches,
        "batch_size": int(workflow.parser.get_parsed_content("batch_size")),
    }


def tolerance(p: float, n: int, p0: float, n0: int) -> float:
    """Twice the binomial standard error of the difference of two independent rates (1 / n when it is 0)."""
    se = math.sqrt(p * (1 - p) / n + p0 * (1 - p0) / n0)
    return 2 * se if se > 0 else 1.0 / min(n, n0)


def sampling_part(args: argparse.Namespace, report: dict) -> None:
    from common import wait_for_quiet

    from meddiff.data.histology import histology_datalist, make_synthetic_histology
    from meddiff.demo import QUIET_LOGGING
    from meddiff.evaluation.histology import evaluate_histology_augmentation

    logging_file = str(QUIET_LOGGING)
    root = Path(args.bundle_root) if args.bundle_root else Path(tempfile.mkdtemp(prefix="histology_bench_"))
    data = Path(
        make_synthetic_histology(root / "data", classes=CLASSES, per_class=args.per_class, size=64, test_per_class=4)
    )
    epochs = {k: getattr(args, k) for k in STAGE_EPOCHS.values()}
    part = {
        "bundle_root": str(root),
        "dataset_dir": str(data),
        "data": {"classes": list(CLASSES), "per_class": args.per_class, "test_per_class": 4, "tile_px": 64},
    }
    clocks = {}
    if models_present(root):
        print(f"reusing the models under {root}/models", flush=True)
        part["training"] = {"reused": True}
    else:
        stop = part_clock()
        part["training"] = {"epochs": epochs, "seconds": train_models(root, data, epochs, logging_file)}
        clocks["model_training"] = stop()
    part["clocks"] = clocks
    demo = json.loads((CONFIGS / "demo.json").read_text())
    steps = QUICK_STEPS if args.quick else {k: s["num_inference_steps"] for k, s in SETTINGS.items()}
    settings = {k: {**s, "num_inference_steps": steps[k]} for k, s in SETTINGS.items()}
    common = {"samples_per_class": args.samples_per_class, "seed": args.seed}
    part["settings"] = settings
    part["overrides"] = {
        "all runs": {**common, "overwrite": True, "progress": False},
        "demo.json (merged last, as the demo)": {
            k: demo[k]
            for k in (
                "image_size",
                "batch_size",
                "autoencoder_channels",
                "network_channels",
                "classifier_channels",
                "num_inference_steps",
            )
            if k in demo
        },
        "note": "num_inference_steps, sampler, eta and classifier_scale of each row replace demo.json's; the "
        "bundle's configs are not edited",
    }
    out = root / "eval"
    print("warm-up inference run (untimed)", flush=True)
    generate(
        root,
        data,
        out / "warmup",
        {**settings[BASE], "num_inference_steps": 2, "samples_per_class": 1, "seed": args.seed},
        logging_file,
    )
    runs: dict[str, list[dict]] = {k: [] for k in settings}
    wait_for_quiet(args.max_wait)
    stop = part_clock()
    for rep in range(args.repeats):
        for name, s in settings.items():
            r = generate(root, data, out / name, {**s, **common}, logging_file)
            runs[name].append(r)
            print(
                f"  [{rep + 1}/{args.repeats}] {name}: {r['run_s']:.2f} s for {r['n']} tiles "
                f"(workflow {r['workflow_s']:.1f} s)",
                flush=True,
            )
    clocks["timed_sampling"] = stop()
    timing = {}
    for name, rs in runs.items():
        per = [r["run_s"] / r["n"] for r in rs]
        timing[name] = {
            "samples": rs[0]["n"],
            "batch_size": rs[0]["batch_size"],
            "batches": rs[0]["batches"],
            "unet_calls_per_batch": rs[0]["unet_calls_per_batch"],
            "classifier_calls_per_batch": rs[0]["classifier_calls_per_batch"],
            "s_per_sample": round(statistics.median(per), 4),
            "s_per_sample_runs": [round(p, 4) for p in per],
            "workflow_s_runs": [round(r["workflow_s"], 2) for r in rs],
        }
    for name in timing:
        timing[name]["speedup_vs_ddim50"] = round(timing[BASE]["s_per_sample"] / timing[name]["s_per_sample"], 2)
    part["timing"] = timing

    # quality: every guided folder scored with the unguided one beside it; the check classifier is retrained per call
    split = histology_datalist(data, classes=list(CLASSES), labelled=True)
    image_size = int(demo["image_size"])
    check = {
        "downstream_network": args.check_network,
        "downstream_epochs": args.check_epochs,
        "downstream_batch_size": 32,
        "downstream_learning_rate": 1e-4,
    }
    part["check_classifier"] = {
        **check,
        "seed": 0,
        "trained_on": f"{len(split['training'])} real training tiles",
        "scored_on": f"{len(split['testing'])} real test tiles",
        "image_size": image_size,
    }
    quality = {}
    stop = part_clock()
    for name in settings:
        if name == UNGUIDED:
            continue
        print(f"scoring {name} (check classifier: {args.check_network}, {args.check_epochs} epochs)", flush=True)
        start = time.perf_counter()
        m = evaluate_histology_augmentation(
            split["training"],
            split["testing"],
            out / name,
            out / name / "metrics.json",
            image_size=image_size,
            unguided_dir=out / UNGUIDED,
            label_fractions=(1.0,),
            downstream_seeds=(),
            classes=split["classes"],
            device="cpu",
            overwrite=True,
            progress=False,
            **check,
        )
        g = m["guidance"]
        quality[name] = {
            "intended_class_rate": g["guided"]["overall"],
            "n": g["guided"]["num_images"],
            "per_class": {c: v["rate"] for c, v in g["guided"]["per_class"].items()},
            "fid": m["fid"]["guided"]["overall"]["fid"],
            "verdict": m["verdict"],
            "check_classifier_test_accuracy": g["classifier"]["test_accuracy"],
            "unguided_rate_this_call": g["unguided"]["overall"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        if name == BASE:
            quality[UNGUIDED] = {
                "intended_class_rate": g["unguided"]["overall"],
                "n": g["unguided"]["num_images"],
                "per_class": {c: v["rate"] for c, v in g["unguided"]["per_class"].items()},
                "fid": m["fid"]["unguided"]["overall"]["fid"],
                "scored_in": BASE,
            }
            part["fid_real_test"] = m["fid"]["real_test"]["fid"]
            part["chance"] = g["chance"]
        print(
            f"  {name}: rate {g['guided']['overall']:.3f}, FID {quality[name]['fid']}, check accuracy "
            f"{g['classifier']['test_accuracy']:.3f}; {m['verdict']}",
            flush=True,
        )
    clocks["scoring"] = stop()
    base = quality[BASE]
    for q in quality.values():
        tol = tolerance(q["intended_class_rate"], q["n"], base["intended_class_rate"], base["n"])
        q["difference_vs_ddim50"] = round(q["intended_class_rate"] - base["intended_class_rate"], 4)
        q["tolerance_2se"] = round(tol, 4)
        q["within_tolerance_of_ddim50"] = bool(abs(q["difference_vs_ddim50"]) <= tol + 1e-12)
    calls = [q for n_, q in quality.items() if n_ != UNGUIDED]
    part["check_consistent"] = {
        "test_accuracies": sorted({q["check_classifier_test_accuracy"] for q in calls}),
        "unguided_rates": sorted({q["unguided_rate_this_call"] for q in calls}),
    }
    part["check_consistent"]["same"] = all(len(v) == 1 for v in part["check_consistent"].values())
    part["guided_above_unguided"] = base["intended_class_rate"] > quality[UNGUIDED]["intended_class_rate"]
    part["quality"] = quality
    report["sampling"] = part


# ----------------------------------------------------------------------------------------------------------- training
def load_tiles(dataset_dir: Path, size: int):
    """Every synthetic training tile at `size` px, (N, 3, S, S) float32 in [-1, 1]."""
    import numpy as np
    import torch

    from meddiff.data.histology import histology_datalist, read_tile

    items = histology_datalist(dataset_dir, classes=list(CLASSES), labelled=True)["training"]
    return torch.from_numpy(np.stack([read_tile(item["image"], size) for item in items]))


def make_autoencoder(arch: dict, seed: int):
    """The bundle's `AutoencoderKL` and `PatchDiscriminator` (train_autoencoder.json) at `arch`, seeded."""
    import torch
    from monai.networks.nets import AutoencoderKL, PatchDiscriminator

    torch.manual_seed(seed)
    a = arch["autoencoder"]
    g = AutoencoderKL(
        spatial_dims=2,
        in_channels=3,
        out_channels=3,
        channels=a["channels"],
        num_res_blocks=a["num_res_blocks"],
        attention_levels=[False] * len(a["channels"]),
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=a["norm_num_groups"],
        with_encoder_nonlocal_attn=True,
        with_decoder_nonlocal_attn=True,
        use_flash_attention=True,
    )
    d = PatchDiscriminator(spatial_dims=2, in_channels=3, out_channels=1, norm="BATCH", **arch["discriminator"])
    return g, d


def build_autoencoder_step(models, precision: str):
    """A step function (images, noise seed) -> losses: one `AdversarialTrainer` iteration as the bundle wires it."""
    import torch

    from meddiff.autoencoder import (
        AutoencoderKLInferer,
        AutoencoderLoss,
        DiscriminatorAdversarialLoss,
        GeneratorAdversarialLoss,
    )

    g, d = models
    g_opt = torch.optim.Adam(g.parameters(), lr=5.4e-5, betas=(0.5, 0.9))
    d_opt = torch.optim.Adam(d.parameters(), lr=5.4e-5, betas=(0.5, 0.9))
    inferer = AutoencoderKLInferer(sample=True, precision=precision)
    rec_loss = AutoencoderLoss(inferer, kl_weight=1e-6)
    g_adv = GeneratorAdversarialLoss(0.5, start_iteration=0, adaptive_layer=g.decoder.blocks[-1].conv.weight)
    d_adv = DiscriminatorAdversarialLoss(0.5, start_iteration=0)
    g_adv.engine = SimpleNamespace(state=SimpleNamespace(output={}))  # the trainer's output the adaptive weight reads

    def step(images, noise_seed: int) -> dict:
        torch.manual_seed(noise_seed)  # the posterior sample's eps (AutoencoderKL draws it with randn_like)
        g.train()
        g_opt.zero_grad(set_to_none=True)
        fakes = inferer(images, g)
        fake_logits = d(fakes.float().contiguous())
        rec = rec_loss(fakes, images).mean()
        g_adv.engine.state.output = {"reconstruction_loss": rec}
        gen = g_adv(fake_logits).mean()
        (rec + gen).backward()
        g_opt.step()
        d.train()
        d.zero_grad(set_to_none=True)
        real_logits, fake_logits = d(images.contiguous().detach()), d(fakes.contiguous().detach())
        disc = d_adv(real_logits, fake_logits).mean()
        disc.backward()
        d_opt.step()
        return {
            "reconstruction": rec.item(),
            "generator_adversarial": gen.item(),
            "discriminator": disc.item(),
            "_prediction": fakes.detach(),
        }

    return step


def build_diffusion_step(unet, precision: str):
    """A step function ((latents, noise, timesteps), noise seed) -> loss: the bundle's latent diffusion step."""
    import torch

    from meddiff.inferers import DiffusionTrainingInferer
    from meddiff.precision import make_adamw
    from meddiff.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0155
    )
    inferer = DiffusionTrainingInferer(scheduler, conditioning="none", precision=precision)
    opt, l1 = make_adamw(unet.parameters(), lr=5e-5, weight_decay=0.0, device="cpu"), torch.nn.L1Loss()

    def step(batch, noise_seed: int) -> dict:
        latents, noise, timesteps = batch
        unet.train()
        opt.zero_grad(set_to_none=True)
        prediction = inferer(latents, unet, noise, timesteps)
        loss = l1(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item(), "_prediction": prediction.detach()}

    return step


def make_unet(arch: dict, seed: int):
    import torch
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(seed)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        use_flash_attention=True,
        **arch["unet"],
    )


def rounded_to_bf16(models):
    """A copy of `models` (a module or a tuple of modules) with every parameter rounded to bf16 and back to fp32."""
    import torch

    models = copy.deepcopy(models)
    with torch.no_grad():
        for module in models if isinstance(models, tuple) else (models,):
            for p in module.parameters():
                p.copy_(p.bfloat16().float())
    return models


def _rel_norm(a, b) -> float | None:
    norm = float(a.norm())
    return float((b - a).norm()) / norm if norm > 0 else None


def side_by_side(build, models, batches: list, warmup: int, repeats: int) -> dict:
    """fp32 and bf16 copies of `models` stepped on the same batches, interleaved (order rotating); median s/step over
    the steps after `warmup`; losses per step; per step, |pred_bf16 - pred_fp32| / |pred_fp32| (Frobenius norms; None
    where the fp32 prediction is 0, as MONAI's zero-initialised UNet output is at step 1).

    A third copy, the control, trains in fp32 from the initial weights rounded to bf16: its distance from fp32 is how
    far the trajectory moves from a perturbation of bf16's size alone (the drift floor of the bf16 comparison)."""
    steps = {
        "fp32": build(models, "fp32"),
        "bf16": build(copy.deepcopy(models), "bf16"),
        "control": build(rounded_to_bf16(models), "fp32"),
    }
    names = list(steps)
    seconds = {p: [] for p in steps}
    losses = {p: [] for p in steps}
    prediction_diff = {"bf16": [], "control": []}
    for i, batch in enumerate(batches[: warmup + repeats]):
        preds = {}
        for p in names[i % 3 :] + names[: i % 3]:
            start = time.perf_counter()
            out = steps[p](batch, 1000 + i)
            seconds[p].append(time.perf_counter() - start)
            preds[p] = out.pop("_prediction").float()
            losses[p].append(out)
        for p in prediction_diff:
            prediction_diff[p].append(_rel_norm(preds["fp32"], preds[p]))
        print(f"    step {i + 1}: fp32 {seconds['fp32'][-1]:.2f} s, bf16 {seconds['bf16'][-1]:.2f} s", flush=True)
    res = {"warmup_steps": warmup, "timed_steps": repeats, "k": warmup + repeats}
    res["prediction_rel_diff"], res["control_prediction_rel_diff"] = prediction_diff["bf16"], prediction_diff["control"]
    for p in steps:
        med = statistics.median(seconds[p][warmup:])
        res[p] = {"s_per_step": round(med, 4), "s_per_step_all": [round(s, 3) for s in seconds[p]], "losses": losses[p]}
    for when, idx in (("step1", 0), ("last_step", -1)):
        for p, label in (("bf16", "loss_rel_diff"), ("control", "control_loss_rel_diff")):
            a, b = losses["fp32"][idx], losses[p][idx]
            res[f"{label}_{when}"] = {k: (b[k] - a[k]) / abs(a[k]) if a[k] else None for k in a}
    return res


def training_part(args: argparse.Namespace, report: dict, dataset_dir: Path) -> None:
    import torch

    rows = []
    plans = [("demo (tiny)", TINY_ARCH, 32, 16, args.tiny_warmup, args.tiny_repeats)]
    if not args.quick:
        plans.insert(0, ("seed", SEED_ARCH, args.seed_size, args.seed_batch, args.seed_warmup, args.seed_repeats))
    for label, arch, size, batch, warmup, repeats in plans:
        k = warmup + repeats
        tiles = load_tiles(dataset_dir, size)
        g = torch.Generator().manual_seed(args.seed)
        image_batches = [tiles[torch.randint(0, len(tiles), (batch,), generator=g)] for _ in range(k)]
        print(f"autoencoder step, {label} architecture, {size} px, batch {batch}", flush=True)
        models = make_autoencoder(arch, args.seed)
        params = sum(p.numel() for p in models[0].parameters()), sum(p.numel() for p in models[1].parameters())
        res = side_by_side(build_autoencoder_step, models, image_batches, warmup, repeats)
        rows.append(
            {
                "model": "autoencoder + discriminator",
                "architecture": label,
                "arch": arch["autoencoder"],
                "discriminator": arch["discriminator"],
                "params": params,
                "image_px": size,
                "batch": batch,
                **res,
            }
        )
        del models
        latent = size // DOWNSAMPLE
        latent_batches = [
            (
                torch.randn(batch, LATENT_CHANNELS, latent, latent, generator=g),
                torch.randn(batch, LATENT_CHANNELS, latent, latent, generator=g),
                torch.randint(0, 1000, (batch,), generator=g),
            )
            for _ in range(k)
        ]
        print(f"latent diffusion step, {label} architecture, {latent} px latents, batch {batch}", flush=True)
        unet = make_unet(arch, args.seed)
        params = sum(p.numel() for p in unet.parameters())
        res = side_by_side(build_diffusion_step, unet, latent_batches, warmup, repeats)
        rows.append(
            {
                "model": "latent diffusion UNet",
                "architecture": label,
                "arch": arch["unet"],
                "params": params,
                "image_px": size,
                "latent_px": latent,
                "batch": batch,
                **res,
            }
        )
        del unet
    for row in rows:
        row["images_per_s"] = {p: round(row["batch"] / row[p]["s_per_step"], 3) for p in ("fp32", "bf16")}
        row["bf16_speed_vs_fp32"] = round(row["fp32"]["s_per_step"] / row["bf16"]["s_per_step"], 3)
    report["training"] = {"rows": rows}


# ------------------------------------------------------------------------------------------------------------- report
def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _rel(x) -> str:
    return "n/a" if x is None else f"{x:+.1e}"


def _sci(x) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def table(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"Run {m['date']}: {m['cpu_count']} CPU cores ({m['cpu_model']}; flags seen: {', '.join(m['cpu_flags'])}; "
        f"avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, amx_bf16 {'yes' if m['amx_bf16'] else 'no'}), "
        f"torch {m['torch']}, monai {m['monai']}, {m['torch_threads']} threads, GLIBC_TUNABLES "
        f"{'set' if m['glibc_tunables'] else 'unset'}; whole run {r['wall_s'] / 60:.1f} min; other processes used "
        f"{100 * r['others_cpu_share']:.0f}% of the CPUs meanwhile. All ratios are between settings run side by side "
        f"in this one process.{' QUICK smoke run: numbers mean nothing.' if r['args']['quick'] else ''}"
    ]
    s = r.get("sampling")
    if s:
        t, q, tr = s["timing"], s["quality"], s["training"]
        trained = (
            "reused from --bundle-root"
            if tr.get("reused")
            else ", ".join(f"{k.split('.')[0].replace('train_', '')} {v} s" for k, v in tr["seconds"].items())
        )
        ep = tr.get("epochs", {})
        n = t[BASE]["samples"]
        lines += [
            "",
            f"**Guided sampling** (the bundle's `inference.json` + `demo.json`: tiny networks at 32 px, 8x8x3 latents; "
            f"models trained by the bundle's configs on {len(s['data']['classes'])} synthetic classes x "
            f"{s['data']['per_class']} tiles"
            + (f", {ep['ae_epochs']}/{ep['diffusion_epochs']}/{ep['classifier_epochs']} epochs" if ep else "")
            + f" ({trained}); {n} tiles per setting ({r['args']['samples_per_class']} per class, batch "
            f"{t[BASE]['batch_size']}, seed {r['args']['seed']}); s/sample = median of {r['args']['repeats']} "
            f"`evaluator.run()` / {n}, round-robin after a warm-up run. Rate = share of tiles a "
            f"{s['check_classifier']['downstream_network']} ({s['check_classifier']['downstream_epochs']} epochs on "
            f"the real training tiles, test accuracy {q[BASE]['check_classifier_test_accuracy']:.2f}, chance "
            f"{s['chance']:.2f}) assigns to their intended class; tolerance = 2 x the binomial SE of the difference "
            f"to ddim50 (independent-sample SE; the rows share seeds, so it is generous):",
            "",
            "| setting | steps | UNet / classifier calls per batch | s/sample | ddim50 ÷ this | intended-class rate "
            f"({', '.join(s['data']['classes'])}) | rate − ddim50 (tolerance) | within tolerance | FID (vs "
            f"{s['data']['per_class'] * len(s['data']['classes'])} real) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in SETTINGS:
            ti, qi = t[name], q[name]
            per = " / ".join(_pct(v) for v in qi["per_class"].values())
            within = "reference" if name == BASE else ("**yes**" if qi["within_tolerance_of_ddim50"] else "**no**")
            fid = "n/a" if qi["fid"] is None else f"{qi['fid']:.1f}"
            label = f"**{name}**" if name == BASE else name
            lines.append(
                f"| {label} (scale {s['settings'][name]['classifier_scale']:g}) | "
                f"{s['settings'][name]['num_inference_steps']} | "
                f"{ti['unet_calls_per_batch']:g} / {ti['classifier_calls_per_batch']:g} | {ti['s_per_sample']:.4f} | "
                f"**{ti['speedup_vs_ddim50']:.2f}** | {_pct(qi['intended_class_rate'])} ({per}) | "
                f"{100 * qi['difference_vs_ddim50']:+.1f} pp (±{100 * qi['tolerance_2se']:.1f}) | {within} | {fid} |"
            )
        clocks = s.get("clocks", {})
        floor = s.get("fid_real_test")
        cc = s["check_consistent"]
        lines += [
            "",
            f"FID floor (the {4 * len(s['data']['classes'])} real test tiles vs the real training tiles): "
            f"{'n/a' if floor is None else f'{floor:.1f}'}. Guided ddim50 above unguided: "
            f"**{'yes' if s['guided_above_unguided'] else 'NO'}** ({_pct(q[BASE]['intended_class_rate'])} vs "
            f"{_pct(q[UNGUIDED]['intended_class_rate'])}); the evaluator's verdict on ddim50: {q[BASE]['verdict']} "
            f"The check classifier, retrained in each scoring call: "
            + (
                "identical across calls (same test accuracy and unguided rate)."
                if cc["same"]
                else f"NOT identical across calls (test accuracies {cc['test_accuracies']}, unguided rates "
                f"{cc['unguided_rates']}): the rates compare only roughly."
            ),
        ]
        if clocks:
            lines[-1] += (
                " "
                + "; ".join(
                    f"{k.replace('_', ' ')} {v['wall_s'] / 60:.1f} min (other processes "
                    f"{100 * v['others_cpu_share']:.0f}% of the CPUs)"
                    for k, v in clocks.items()
                )
                + "."
            )
    rows = r.get("training", {}).get("rows", [])
    if rows:
        lines += [
            "",
            "**Training step, bf16 autocast vs fp32** (the bundle's inferers with `precision` bf16 vs fp32; same "
            "initial weights, batches and noise; steps interleaved; median of the timed steps after warm-up). Loss "
            "Δ = (loss_bf16 − loss_fp32) / loss_fp32 at step 1 (identical weights: rounding only) and at the last step "
            "k (after k − 1 optimizer steps each); pred Δ = ‖pred_bf16 − pred_fp32‖ / ‖pred_fp32‖ (reconstruction, or "
            "eps) at step k. Drift floor = the same two numbers at step k for an fp32 copy started from the initial "
            "weights rounded to bf16 (a perturbation of bf16's size, then fp32 arithmetic):",
            "",
            "| model | architecture (params) | tile px / latent px, batch | fp32 s/step | bf16 s/step "
            "| fp32 img/s | bf16 img/s | **bf16 ÷ fp32 speed** | loss Δ step 1 | loss Δ step k | pred Δ step k "
            "| drift floor step k: loss Δ / pred Δ | steps (warm-up + timed) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            key = "reconstruction" if row["model"].startswith("autoencoder") else "loss"
            params = row["params"] if isinstance(row["params"], int) else sum(row["params"])
            px = f"{row['image_px']}" + (f" / {row['latent_px']}" if "latent_px" in row else "")
            parity1, parityk = row["loss_rel_diff_step1"][key], row["loss_rel_diff_last_step"][key]
            floor = row.get("control_loss_rel_diff_last_step", {}).get(key)
            floor_pred = (row.get("control_prediction_rel_diff") or [None])[-1]
            lines.append(
                f"| {row['model']} | {row['architecture']} ({params / 1e6:.1f}M) | {px}, b{row['batch']} | "
                f"{row['fp32']['s_per_step']:.3f} | {row['bf16']['s_per_step']:.3f} | {row['images_per_s']['fp32']} | "
                f"{row['images_per_s']['bf16']} | **{row['bf16_speed_vs_fp32']:.2f}** | {_rel(parity1)} | "
                f"{_rel(parityk)} | {_sci(row['prediction_rel_diff'][-1])} | {_rel(floor)} / {_sci(floor_pred)} | "
                f"{row['warmup_steps']} + {row['timed_steps']} |"
            )
        lines += [
            "",
            "Autoencoder rows: the loss is the reconstruction loss (L1 + 1e-6 KL); the discriminator runs in fp32 in "
            "both (as the `AdversarialTrainer` calls it), so only the generator changes precision. Diffusion rows: "
            "L1 on eps; the latents are N(0, 1) draws and the autoencoder's encoding of each batch (fp32 in the "
            "bundle) is not timed. MONAI zero-initialises the UNet's output layer: at step 1 both predict exactly 0 "
            "(loss Δ 0 by construction, pred Δ undefined), and after a few steps at lr 5e-5 the prediction is still "
            "small, so L1 ≈ mean |eps| in both and the loss Δ says little there; pred Δ is the informative number. "
            "Quality beyond these (a bf16-trained model's samples) was not measured.",
        ]
        clock = r["training"].get("clock")
        if clock:
            lines.append(
                f"Training part: {clock['wall_s'] / 60:.1f} min, other processes used "
                f"{100 * clock['others_cpu_share']:.0f}% of the CPUs meanwhile."
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    import torch
    from common import machine_info, run_clock, update_readme_block, wait_for_quiet, write_report

    torch.set_num_threads(args.threads)
    clock = run_clock()
    report = {"benchmark": "histology_augmentation", "args": vars(args), "machine": machine_info()}
    busy = {}
    if not args.skip_sampling:
        busy["before_sampling"] = round(wait_for_quiet(args.max_wait), 3)
        sampling_part(args, report)
        dataset_dir = Path(report["sampling"]["dataset_dir"])
    else:
        from meddiff.data.histology import make_synthetic_histology

        dataset_dir = Path(
            make_synthetic_histology(
                tempfile.mkdtemp(prefix="histology_bench_"),
                classes=CLASSES,
                per_class=args.per_class,
                size=64,
                test_per_class=4,
            )
        )
    if not args.skip_training:
        busy["before_training"] = round(wait_for_quiet(args.max_wait), 3)
        stop = part_clock()
        training_part(args, report, dataset_dir)
        report["training"]["clock"] = stop()
    report["others_busy_fraction_before_parts"] = busy
    out = Path(args.out) if args.out else QUICK_OUT if args.quick else OUT
    wall = write_report(report, out, clock)
    text = table(report)
    print(f"wrote {out} ({wall / 60:.1f} min)\n{text}", flush=True)
    if not args.quick and not args.no_readme and not (args.skip_sampling or args.skip_training):
        update_readme_block(BEGIN, END, TITLE, readme_block(report, out))
        print("updated bench/README.md", flush=True)
    return report


def readme_block(r: dict, out: Path) -> str:
    rel = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    return (
        "Issue: seconds per guided sample, the seed's DDIM-50 with the classifier gradient against the few-step solver "
        "(DPM-Solver++ 2M) at equal intended-class rate, and the autoencoder + diffusion training throughput, bf16 "
        "against fp32, in one run. The module docstring of `bench/histology_augmentation.py` states exactly what is "
        "compared.\n\n"
        "    OMP_NUM_THREADS=2 python bench/histology_augmentation.py          # the benchmark, ~15 min on 2 cores\n"
        "    OMP_NUM_THREADS=2 python bench/histology_augmentation.py --quick  # smoke run, writes to /tmp\n"
        f"    python bench/histology_augmentation.py --report {rel}   # print the tables\n\n"
        f"Results: `{rel}`. This block is written by the script.\n\n" + table(r)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ae-epochs", dest="ae_epochs", type=int, default=None, help="autoencoder epochs (100)")
    ap.add_argument("--diffusion-epochs", dest="diffusion_epochs", type=int, default=None, help="diffusion (300)")
    ap.add_argument("--classifier-epochs", dest="classifier_epochs", type=int, default=None, help="classifier (100)")
    ap.add_argument(
        "--bundle-root", default=None, help="reuse (or train into) this bundle root; default a new /tmp dir"
    )
    ap.add_argument("--per-class", type=int, default=16, help="synthetic training tiles per class")
    ap.add_argument("--samples-per-class", type=int, default=None, help="tiles generated per class and setting (16)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per sampling setting (3)")
    ap.add_argument("--check-network", default=None, help="guidance-check classifier (densenet121)")
    ap.add_argument("--check-epochs", type=int, default=None, help="its epochs (30, the demo's downstream_epochs)")
    ap.add_argument("--seed-size", type=int, default=64, help="tile px of the seed-architecture training steps")
    ap.add_argument("--seed-batch", type=int, default=2)
    ap.add_argument("--seed-warmup", type=int, default=1)
    ap.add_argument("--seed-repeats", type=int, default=3)
    ap.add_argument("--tiny-warmup", type=int, default=None, help="warm-up steps, demo architecture (2)")
    ap.add_argument("--tiny-repeats", type=int, default=None, help="timed steps, demo architecture (5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine before a part")
    ap.add_argument("--skip-sampling", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    ap.add_argument("--quick", action="store_true", help="smoke run: few epochs, steps and samples; writes to /tmp")
    ap.add_argument("--out", default=None, help=f"result JSON (default {OUT.relative_to(REPO)}; --quick: /tmp)")
    ap.add_argument("--report", default=None, help="print the table of a result JSON and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return 0
    quick = {
        "ae_epochs": 2,
        "diffusion_epochs": 3,
        "classifier_epochs": 2,
        "samples_per_class": 2,
        "repeats": 1,
        "check_network": "small_cnn",
        "check_epochs": 2,
        "tiny_warmup": 1,
        "tiny_repeats": 1,
    }
    full = {
        "ae_epochs": 100,
        "diffusion_epochs": 300,
        "classifier_epochs": 100,
        "samples_per_class": 16,
        "repeats": 3,
        "check_network": "densenet121",
        "check_epochs": 30,
        "tiny_warmup": 2,
        "tiny_repeats": 5,
    }
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    run(args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if "--report" not in sys.argv:
        from meddiff.precision import reexec_with_malloc_tuning

        reexec_with_malloc_tuning()
    sys.exit(main())
