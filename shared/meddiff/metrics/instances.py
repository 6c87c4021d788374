"""Instance segmentation metrics for nuclei: instance F1 at an IoU threshold, AJI, AJI+, binary Dice and PQ.

Conventions:
- an instance map is an integer array (H, W), numpy or torch (a leading channel of one, (1, H, W), is dropped):
  0 is background, every other value one instance; ids need not be contiguous. A boolean map is one instance; a
  float map is accepted when every value is a whole number (stacked tensors are often float). Both maps of one
  comparison have one shape;
- IoU of a true instance G and a predicted instance S: ``|G ∩ S| / |G ∪ S|`` in pixels.

Matching (`match_instances`, `instance_f1`, `dataset_f1`), as StarDist's ``matching`` whose F1 at IoU 0.5 the seed
reports (methods.md 4.6):
- a pair (G, S) may match when ``IoU >= iou_threshold`` (StarDist's ``>=``; MONAI's `PanopticQualityMetric` pairs at
  ``IoU > threshold``, which differs only at an exact tie);
- each instance matches at most once: of all one-to-one assignments of candidate pairs, the one with the most pairs
  and, among those, the largest IoU sum (scipy ``linear_sum_assignment`` maximising ``1 + IoU / (k + 1)`` per
  candidate pair, k = the most pairs possible, so one more pair outweighs any IoU sum). Above 0.5 every instance
  has at most one candidate (two disjoint predictions cannot each cover more than half of one nucleus' union), so
  the assignment only returns the candidates; at 0.5 itself a nucleus cut into two exact halves has two and the
  assignment picks one;
- TP = matched pairs, FP = predictions left unmatched, FN = true instances left unmatched;
  ``F1 = 2 TP / (2 TP + FP + FN)``. An image with no true and no predicted instance scores F1 = 1 (nothing to find,
  nothing found; StarDist returns 0 there). `dataset_f1` sums TP, FP and FN over all images first (StarDist's
  ``matching_dataset(..., by_image=False)``), so large images weigh more than in the mean of per-image F1.

AJI (Aggregated Jaccard Index; Kumar et al. 2017, IEEE TMI 36(7):1550-1560), as Kumar defines it:
- for every true nucleus G_i take the prediction S_j of largest IoU with it (lowest id on ties) and add
  ``|G_i ∩ S_j|`` to C and ``|G_i ∪ S_j|`` to U; S_j is marked used. One S_j may serve several G_i and its pixels
  then count in U once per G_i (the over-penalisation AJI+ removes);
- a G_i that overlaps no prediction adds ``|G_i|`` to U (its best "match" is the empty segment; Kumar's argmax is
  undefined there, and this is how the common implementations read it);
- every prediction never marked used adds its area to U; ``AJI = C / U``; no nucleus and no prediction: AJI = 1.
AJI+ (`aji_plus`; Graham et al. 2019, Med. Image Anal. 58:101563): the same sums over a one-to-one pairing, the
assignment of largest IoU sum among pairs that overlap (``linear_sum_assignment``); unpaired true and predicted
instances add their areas to U.

Binary Dice (`binary_dice`): ``2 |P ∩ T| / (|P| + |T|)`` on the foregrounds (id > 0), 1 when both are empty.

PQ (`panoptic_quality`; Kirillov et al. 2019): MONAI ``PanopticQualityMetric(num_classes=1,
return_confusion_matrix=True)`` gives TP, FP, FN and the IoU sum of the pairs with ``IoU > 0.5``; then
``RQ = TP / (TP + FP/2 + FN/2)`` (F1 at IoU 0.5), ``SQ = IoU sum / TP``, ``PQ = SQ * RQ``, computed exactly (no
smoothing term). No nucleus and no prediction: PQ = SQ = RQ = 1; no matched pair otherwise: all three 0 (SQ is
0/0 there and reads 0, as in MONAI and HoVer-Net).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from meddiff.errors import UserError
from meddiff.options import Rule

__all__ = [
    "InstanceMatch",
    "aji",
    "aji_plus",
    "as_instance_map",
    "binary_dice",
    "dataset_f1",
    "instance_f1",
    "match_instances",
    "panoptic_quality",
]

_IOU_THRESHOLD = Rule("float", low=0.0, high=1.0, low_open=True, hint="the IoU a matched pair needs, e.g. 0.5")


@dataclass(frozen=True)
class InstanceMatch:
    """The one-to-one matching of true and predicted instances of one image.

    Args:
        tp: matched pairs.
        fp: predicted instances left unmatched.
        fn: true instances left unmatched.
        pairs: ``(true id, predicted id)`` of each matched pair, in order of true id.
        ious: the IoU of each pair, in the order of `pairs`.
    """

    tp: int
    fp: int
    fn: int
    pairs: list[tuple[int, int]] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)


def as_instance_map(inst: Any, name: str = "instance") -> np.ndarray:
    """`inst` as an int64 numpy (H, W), refused (naming it `name`) unless it is a map of whole ids >= 0."""
    array = inst.detach().cpu().numpy() if isinstance(inst, torch.Tensor) else np.asarray(inst)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise UserError(f"the {name} instance map has shape {array.shape}: give one map (H, W) or (1, H, W).")
    if array.dtype == bool:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array) & (array == np.round(array))):
            raise UserError(
                f"the {name} instance map holds {array.dtype} values that are not whole numbers: give integer "
                "instance ids (0 = background)."
            )
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise UserError(f"the {name} instance map holds negative ids: use 0 for background and ids > 0 for instances.")
    return array


def _pair(true: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    true, pred = as_instance_map(true, "true"), as_instance_map(pred, "predicted")
    if true.shape != pred.shape:
        raise UserError(
            f"the true instance map is {true.shape} but the predicted one {pred.shape}: compare maps of one size."
        )
    return true, pred


@dataclass(frozen=True)
class _Overlap:
    """Pixel counts of two instance maps.

    Args:
        true_ids: ids of the true instances (background excluded), ascending.
        pred_ids: ids of the predicted instances, ascending.
        inter: ``|G_i ∩ S_j|``, shape (len(true_ids), len(pred_ids)).
        true_area: ``|G_i|``.
        pred_area: ``|S_j|``.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    inter: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.true_area[:, None] + self.pred_area[None, :] - self.inter

    @property
    def iou(self) -> np.ndarray:
        union = self.union
        return np.divide(self.inter, union, out=np.zeros(union.shape), where=union > 0)


def _overlap(true: np.ndarray, pred: np.ndarray) -> _Overlap:
    """Contingency table of the two maps' ids (row/column 0 of the full table is background, then dropped)."""
    true_ids, true_index = np.unique(np.concatenate([[0], true.ravel()]), return_inverse=True)
    pred_ids, pred_index = np.unique(np.concatenate([[0], pred.ravel()]), return_inverse=True)
    true_index, pred_index = true_index[1:], pred_index[1:]  # drop the prepended 0 that guarantees a background row
    shape = (len(true_ids), len(pred_ids))
    table = np.bincount(true_index * shape[1] + pred_index, minlength=shape[0] * shape[1]).reshape(shape)
    return _Overlap(
        true_ids=true_ids[1:],
        pred_ids=pred_ids[1:],
        inter=table[1:, 1:],
        true_area=table[1:].sum(axis=1),
        pred_area=table[:, 1:].sum(axis=0),
    )


def match_instances(true: Any, pred: Any, iou_threshold: float = 0.5) -> InstanceMatch:
    """One-to-one matching of true and predicted instances at ``IoU >= iou_threshold`` (see the module docstring).

    Args:
        true: the true instance map (H, W).
        pred: the predicted instance map, same shape.
        iou_threshold: the IoU a pair needs, in (0, 1].
    """
    iou_threshold = _IOU_THRESHOLD("iou_threshold", iou_threshold)
    overlap = _overlap(*_pair(true, pred))
    num_true, num_pred = len(overlap.true_ids), len(overlap.pred_ids)
    iou = overlap.iou
    candidate = (iou >= iou_threshold) & (overlap.inter > 0)
    pairs: list[tuple[int, int]] = []
    ious: list[float] = []
    if candidate.any():
        most = min(num_true, num_pred)
        weight = np.where(candidate, 1.0 + iou / (most + 1), 0.0)
        rows, cols = linear_sum_assignment(weight, maximize=True)
        for r, c in sorted(zip(rows.tolist(), cols.tolist())):
            if candidate[r, c]:
                pairs.append((int(overlap.true_ids[r]), int(overlap.pred_ids[c])))
                ious.append(float(iou[r, c]))
    tp = len(pairs)
    return InstanceMatch(tp=tp, fp=num_pred - tp, fn=num_true - tp, pairs=pairs, ious=ious)


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2.0 * tp / denominator


def instance_f1(true: Any, pred: Any, iou_threshold: float = 0.5) -> float:
    """Instance F1 ``2 TP / (2 TP + FP + FN)`` of one image at ``IoU >= iou_threshold``; 1 when both are empty."""
    match = match_instances(true, pred, iou_threshold)
    return _f1(match.tp, match.fp, match.fn)


def dataset_f1(trues: Sequence[Any], preds: Sequence[Any], iou_threshold: float = 0.5) -> float:
    """Instance F1 from TP, FP and FN summed over all images (StarDist's ``matching_dataset``); 1 when all are empty.

    Args:
        trues: true instance maps, one per image.
        preds: predicted instance maps, in the same order.
        iou_threshold: the IoU a pair needs.
    """
    if len(trues) != len(preds):
        raise UserError(f"dataset_f1 got {len(trues)} true maps but {len(preds)} predictions: give one per image.")
    if len(trues) == 0:
        raise UserError("dataset_f1 got no images: give at least one (true, predicted) pair of instance maps.")
    tp = fp = fn = 0
    for true, pred in zip(trues, preds):
        match = match_instances(true, pred, iou_threshold)
        tp, fp, fn = tp + match.tp, fp + match.fp, fn + match.fn
    return _f1(tp, fp, fn)


def aji(true: Any, pred: Any) -> float:
    """Aggregated Jaccard Index of Kumar et al. 2017 (a prediction may serve several nuclei; see the module)."""
    overlap = _overlap(*_pair(true, pred))
    inter, union, iou = overlap.inter, overlap.union, overlap.iou
    used = np.zeros(len(overlap.pred_ids), dtype=bool)
    total_inter, total_union = 0, 0
    for i in range(len(overlap.true_ids)):
        if inter.shape[1] == 0 or not inter[i].any():
            total_union += int(overlap.true_area[i])
            continue
        j = int(np.argmax(iou[i]))
        total_inter += int(inter[i, j])
        total_union += int(union[i, j])
        used[j] = True
    total_union += int(overlap.pred_area[~used].sum())
    return 1.0 if total_union == 0 else total_inter / total_union


def aji_plus(true: Any, pred: Any) -> float:
    """AJI+ of Graham et al. 2019: AJI over a one-to-one pairing of largest IoU sum (see the module docstring)."""
    overlap = _overlap(*_pair(true, pred))
    inter, union, iou = overlap.inter, overlap.union, overlap.iou
    paired_true = np.zeros(len(overlap.true_ids), dtype=bool)
    paired_pred = np.zeros(len(overlap.pred_ids), dtype=bool)
    total_inter, total_union = 0, 0
    if inter.size and inter.any():
        rows, cols = linear_sum_assignment(iou, maximize=True)
        for r, c in zip(rows, cols):
            if inter[r, c] > 0:
                total_inter += int(inter[r, c])
                total_union += int(union[r, c])
                paired_true[r] = paired_pred[c] = True
    total_union += int(overlap.true_area[~paired_true].sum()) + int(overlap.pred_area[~paired_pred].sum())
    return 1.0 if total_union == 0 else total_inter / total_union


def binary_dice(true: Any, pred: Any) -> float:
    """Dice ``2 |P ∩ T| / (|P| + |T|)`` of the foregrounds (id > 0); 1 when both are empty."""
    true, pred = _pair(true, pred)
    true, pred = true > 0, pred > 0
    total = int(true.sum()) + int(pred.sum())
    return 1.0 if total == 0 else 2.0 * int((true & pred).sum()) / total


def panoptic_quality(true: Any, pred: Any) -> dict[str, float]:
    """PQ, SQ and RQ of one image through MONAI's `PanopticQualityMetric` (pairs at IoU > 0.5; see the module).

    Args:
        true: the true instance map (H, W).
        pred: the predicted instance map, same shape.

    Returns:
        ``{"pq", "sq", "rq", "tp", "fp", "fn"}``; the counts are MONAI's (IoU > 0.5).
    """
    from monai.metrics import PanopticQualityMetric

    true, pred = _pair(true, pred)

    def panoptic(inst: np.ndarray) -> torch.Tensor:
        inst = torch.as_tensor(inst, dtype=torch.int64)
        return torch.stack([inst, (inst > 0).long()])[None]  # (1, 2, H, W): instance ids, class 1 on nuclei

    metric = PanopticQualityMetric(num_classes=1, reduction="none", return_confusion_matrix=True)
    tp, fp, fn, iou_sum = (float(v) for v in metric(y_pred=panoptic(pred), y=panoptic(true)).reshape(-1)[:4])
    if tp + fp + fn == 0:
        pq = sq = rq = 1.0
    elif tp == 0:
        pq = sq = rq = 0.0
    else:
        rq, sq = tp / (tp + 0.5 * fp + 0.5 * fn), iou_sum / tp
        pq = sq * rq
    return {"pq": pq, "sq": sq, "rq": rq, "tp": int(tp), "fp": int(fp), "fn": int(fn)}
