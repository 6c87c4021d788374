"""Every option a user can set, parsed once and strictly, by name.

Options reach a bundle as JSON values from its config files, or as command-line flags through python-fire, which
hands ``--overwrite false`` over as the string ``'false'`` (truthy in Python) and ``--learning_rate 1e400`` as
``inf``. Each option name has one rule in `RULES`; `parse(name, value)` applies it and raises `OptionError` naming
the option, the value and what it accepts. Library classes parse the options they take by name; config
expressions that hand an option to a MONAI object wrap it as ``$meddiff.options.parse('num_epochs', @num_epochs)``.

Rules:
- booleans: ``true``/``false`` (any case) or JSON booleans; nothing else (not 0/1, not ``yes``);
- integers: ints, or strings of digits; never bools; floats only when integral;
- real numbers: finite, within the stated bounds;
- ``None`` only where the rule allows it (``optional``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from meddiff.errors import OptionError

__all__ = ["RULES", "Rule", "check", "check_inference_steps", "parse", "parse_all"]

_TRUE, _FALSE = "true", "false"


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in (_TRUE, _FALSE):
        return value.strip().lower() == _TRUE
    raise OptionError(f"--{name} must be true or false, got {value!r}.")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise OptionError(f"--{name} must be a whole number, got {value!r}.")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise OptionError(f"--{name} must be a whole number, got {value!r}.")


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise OptionError(f"--{name} must be a number, got {value!r}.")
    try:
        number = float(value)
    except ValueError:
        raise OptionError(f"--{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise OptionError(f"--{name} must be a finite number, got {value!r}.")
    return number


def _sequence(name: str, value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise OptionError(f'--{name} must be a list such as "[1, 2]", got {value!r}.')


@dataclass(frozen=True)
class Rule:
    """How one option is parsed.

    Args:
        kind: "bool", "int", "float", "choice", "floats" (a list of numbers), "ints" (a list of whole numbers) or
            "bools" (a list of true/false: ``--attention_levels "[false,true]"`` reaches a config as strings).
        low: smallest accepted number (each element for lists); None for no bound.
        high: largest accepted number; None for no bound.
        low_open: True when `low` itself is refused (strictly greater than).
        high_open: True when `high` itself is refused.
        optional: None is accepted (and returned) as "not set".
        choices: accepted strings for kind "choice".
        length: exact list length for list kinds.
        increasing: list elements must be strictly increasing.
        hint: what the option means, appended to the error.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    choices: tuple[str, ...] = ()
    length: int | None = None
    increasing: bool = False
    hint: str = ""

    def _bounds(self) -> str:
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(b for b in (lo, hi) if b)

    def _check_range(self, name: str, number: float, shown: Any) -> None:
        below = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        above = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if below or above:
            hint = f" ({self.hint})" if self.hint else ""
            raise OptionError(f"--{name} must be {self._bounds()}, got {shown!r}{hint}.")

    def __call__(self, name: str, value: Any) -> Any:
        if value is None:
            if self.optional:
                return None
            raise OptionError(f"--{name} must be set (it has no default).")
        if self.kind == "bool":
            return _bool(name, value)
        if self.kind == "choice":
            text = str(value).strip().lower()
            if text not in self.choices:
                raise OptionError(f"--{name} must be one of {', '.join(self.choices)}, got {value!r}.")
            return text
        if self.kind in ("int", "float"):
            number = _int(name, value) if self.kind == "int" else _float(name, value)
            self._check_range(name, number, value)
            return number
        items = _sequence(name, value)
        if self.length is not None and len(items) != self.length:
            raise OptionError(f"--{name} must list {self.length} numbers, got {value!r}.")
        if self.kind == "bools":
            return [_bool(name, v) for v in items]
        element = _int if self.kind == "ints" else _float
        numbers = [element(name, v) for v in items]
        for number in numbers:
            self._check_range(name, number, value)
        if self.increasing and any(b <= a for a, b in zip(numbers, numbers[1:])):
            raise OptionError(f"--{name} must be increasing, got {value!r}.")
        return numbers


_BOOL = Rule("bool")
_POSITIVE_INT = Rule("int", low=1)
_COUNT = Rule("int", low=0)

RULES: dict[str, Rule] = {
    # run control
    "overwrite": _BOOL,
    "resume": _BOOL,
    "progress": _BOOL,
    "seed": Rule("int", low=0, high=2**63 - 1),
    "max_items": Rule("int", low=1, optional=True, hint="leave it out to use every item"),
    "num_workers": _COUNT,
    "device": Rule("choice", choices=("cpu", "cuda")),
    # data
    "img_size": Rule("int", low=8, high=4096),
    "num_img_channels": Rule("int", low=1, high=4),
    "num_classes": Rule("int", low=2, high=255, optional=True, hint="leave it out to take it from the data"),
    "min_foreground_fraction": Rule("float", low=0.0, high=1.0, high_open=True),
    "num_raters": _POSITIVE_INT,
    "split": Rule("choice", choices=("train", "training", "test", "testing")),
    "use_ablated_segmentations": _BOOL,
    "ablation_prob": Rule("float", low=0.0, high=1.0),
    "ablated_classes": Rule("ints", low=1),
    "diversity_masks": Rule("int", low=0, hint="masks sampled several times for per-mask diversity; 0 for none"),
    "samples_per_mask": Rule("int", low=2, hint="samples per diversity mask; a pair is the least"),
    # training
    "attention_levels": Rule("bools", hint="one true/false per level of network_channels"),
    "resblock_updown": _BOOL,
    "batch_size": _POSITIVE_INT,
    "num_epochs": _POSITIVE_INT,
    "segmenter_epochs": _POSITIVE_INT,
    "val_fraction": Rule(
        "float", low=0.0, high=1.0, high_open=True, hint="the fraction of training cases held out; 0 for no validation"
    ),
    "val_interval": Rule("int", low=1, hint="epochs between two validations"),
    "save_interval": Rule("int", low=1, hint="epochs between two resumable checkpoints"),
    "num_val_timesteps": Rule("int", low=1, hint="timesteps each held-out item is scored at"),
    "learning_rate": Rule("float", low=0.0, high=1.0, low_open=True),
    "lr_warmup_steps": _COUNT,
    "weight_decay": Rule("float", low=0.0, high=1.0),
    "grad_clip_norm": Rule("float", low=0.0, low_open=True, hint="the largest gradient norm kept"),
    "ema_decay": Rule(
        "float", low=0.0, high=1.0, high_open=True, hint="the weight average's decay, e.g. 0.9999; 0 for no average"
    ),
    "kl_weight": Rule("float", low=0.0),
    "latent_dim": Rule("int", low=1, high=1024),
    "free_bits": Rule("float", low=0.0, high=10.0, hint="nats per latent dimension; 0 turns free bits off"),
    "cimd_design": Rule("choice", choices=("paper", "cvae")),
    "channels_last": _BOOL,
    "precision": Rule("choice", choices=("auto", "fp32", "bf16", "fp16")),
    # diffusion
    "num_train_timesteps": Rule("int", low=2, high=100_000),
    "num_inference_steps": _POSITIVE_INT,
    "sampler": Rule("choice", choices=("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")),
    "guidance_scale": Rule("float", low=0.0, high=100.0, hint="1 is plain conditional sampling, 0 unconditional"),
    "guidance_scales": Rule(
        "floats", low=0.0, high=100.0, optional=True, hint="a sweep, e.g. [1.3, 1.4, 1.5, 1.6]; leave it out for one"
    ),
    "skip_steps": Rule("int", low=0, hint="sampling steps skipped by starting from the noised image"),
    "num_samples": Rule("int", low=2, hint="an ensemble needs at least 2 members"),
    "d_a_distance": Rule("choice", choices=("dice", "variance")),
    # polyp clusters and pairs
    "split_seed": Rule("int", low=0, high=2**63 - 1, hint="the seed of the train/test split, shared by every stage"),
    "test_fraction": Rule("float", low=0.0, high=1.0, low_open=True, high_open=True),
    "num_clusters": Rule("int", low=1, high=1000),
    "cluster_index": Rule("int", low=0, optional=True, hint="leave it out for the full model on every image"),
    "lambda_vlb": Rule("float", low=0.0, hint="the hybrid loss's VLB weight; 0.001 as Nichol & Dhariwal"),
    "samples_per_image": _POSITIVE_INT,
    "num_targets": Rule("int", low=1, optional=True, hint="leave it out to take every image of the cluster once"),
    "target_selection": Rule("choice", choices=("cycle", "random")),
    "jump_length": _POSITIVE_INT,
    "jump_n_sample": _POSITIVE_INT,
    "mask_dilation": _COUNT,
    "mask_opening": _COUNT,
    "inpaint": _BOOL,
    "include_full": _BOOL,
    "style": _BOOL,
    "use_noise_aug_all": _BOOL,
    "use_colormatch": _BOOL,
    "style_steps": _POSITIVE_INT,
    "style_skip_steps": _COUNT,
    "downstream_seeds": Rule("ints", low=0),
    "downstream_epochs": _POSITIVE_INT,
    # nuclei layouts (MoNuSeg)
    "patch_size": Rule("int", low=16, high=4096, hint="the side of the patches cut from each tile; the seed's is 128"),
    "drop_rate": Rule("float", low=0.0, high=1.0, hint="the share of training samples whose condition is nulled"),
    "drop_hvb_only": _BOOL,
    "pairing": Rule("choice", choices=("match_struct", "shuffle", "self")),
    "samples_per_structure": _POSITIVE_INT,
    "num_structures": Rule("int", low=1, optional=True, hint="leave it out to take every patch of the cluster once"),
    "cluster_method": Rule("choice", choices=("kmeans", "umap_hdbscan")),
    "downstream_ratios": Rule("ints", low=1, hint="synthetic per real patch in each real+synthetic arm, e.g. [1, 2]"),
    "coreset_fraction": Rule("float", low=0.0, high=1.0, low_open=True, hint="the memory bank's share of patches"),
    "ood_filter": _BOOL,
    # histology augmentation (NCT-CRC-HE)
    "image_size": Rule("int", low=16, high=4096, hint="the side tiles are resized and cropped to; the seed's is 256"),
    "label_fraction": Rule("float", low=0.0, high=1.0, low_open=True, hint="the labelled share of the training tiles"),
    "label_fractions": Rule("floats", low=0.0, high=1.0, low_open=True, hint="e.g. [0.05, 0.1, 1.0]"),
    "latent_channels": Rule("int", low=1, high=64),
    "adversarial_weight": Rule("float", low=0.0, hint="the patch adversarial loss's weight; 0 for none"),
    "adversarial_start": Rule("int", low=0, hint="iterations before the discriminator joins (CompVis disc_start)"),
    "perceptual_weight": Rule("float", low=0.0, hint="needs --perceptual_weights, a local file; 0 for none"),
    "classifier_noise": Rule("choice", choices=("noisy", "zero"), hint="noisy: random t; zero: the seed's t = 0"),
    "classifier_scale": Rule("float", low=0.0, high=1000.0, hint="the seed's 10; 0 is unguided"),
    "eta": Rule("float", low=0.0, high=1.0, hint="DDIM noise: 1 as the seed, 0 deterministic"),
    "samples_per_class": _POSITIVE_INT,
    "top_k": Rule("int", low=1, optional=True, hint="kept per class after filtering; leave it out to keep all"),
    "filter_samples": _BOOL,
    # DICOM nodule path
    "crop_size": Rule("int", low=8, high=4096),
    "crop_spacing_mm": Rule(
        "float", low=0.0, low_open=True, high=100.0, optional=True, hint="leave it out for the series spacing"
    ),
    "hu_window": Rule("floats", length=2, increasing=True, low=-5000.0, high=40000.0, hint="[lowest HU, highest HU]"),
    "frequency_thresholds": Rule(
        "floats", low=0.0, high=1.0, low_open=True, high_open=True, increasing=True, hint="member fractions in (0, 1)"
    ),
}


def parse(name: str, value: Any) -> Any:
    """`value` parsed by the rule for option `name`; raises OptionError naming the option and what it accepts."""
    rule = RULES.get(name)
    if rule is None:
        raise KeyError(f"no parsing rule for option {name!r}: add one to meddiff.options.RULES")
    return rule(name, value)


def parse_all(**values: Any) -> dict[str, Any]:
    """Parse several options at once (each by its own name); returns the parsed values."""
    return {name: parse(name, value) for name, value in values.items()}


def check_inference_steps(num_inference_steps: Any, num_train_timesteps: Any) -> None:
    """Refuse more sampling steps than the model has training timesteps."""
    steps, total = parse("num_inference_steps", num_inference_steps), parse("num_train_timesteps", num_train_timesteps)
    check(
        steps <= total,
        f"--num_inference_steps ({steps}) must be at most the model's --num_train_timesteps ({total}).",
    )


def check(condition: bool, message: str) -> None:
    """Raise OptionError(`message`) unless `condition` holds: for rules that tie two options together."""
    if not condition:
        raise OptionError(message)
