"""ultralytics' detection criterion as atcache uses it outside ultralytics' trainer (the per-image loss of the
gradient-based attention, atcache.attention.gradient; the teacher's gradients at build time), each internal behind one
named function. tests/yolo/test_contracts.py asserts each against the installed ultralytics; none needed a
per-release branch from 8.4.150 through 8.4.190.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

GAIN_KEYS = ("box", "cls", "dfl")


def model_criterion(model):
    """The model's ultralytics criterion: `model.criterion`, else `model.init_criterion()`, kept on the model as
    ultralytics' BaseModel.loss keeps it (so the model's own loss calls reuse it). A model whose `args` is a dict (a
    loaded checkpoint) or missing (a model built from a YAML) has them read over ultralytics' defaults for that call.

    Reads/writes `model.criterion` (BaseModel.loss: set on first use) and `model.args` (v8DetectionLoss.__init__ reads
    it as its `hyp`: the box/cls/dfl gains, and epochs for E2ELoss), calls `model.init_criterion()`, 8.4.150-8.4.190."""
    crit = getattr(model, "criterion", None)
    if crit is None:
        args, had = getattr(model, "args", None), hasattr(model, "args")
        if args is None or isinstance(args, dict):
            from atcache.yolo import DEFAULT_CFG_DICT

            model.args = SimpleNamespace(**{**DEFAULT_CFG_DICT, **(args or {})})
        try:
            crit = model.init_criterion()
        finally:
            if not had:
                del model.args
            else:
                model.args = args
        model.criterion = crit
    return crit


def raw_predictions(preds: Any) -> Any:
    """The head outputs the criterion reads: an eval-mode forward returns (decoded, raw), a train-mode one raw.

    Reads the layout of a detection head's eval output, (decoded, raw), as v8DetectionLoss.parse_output (and
    E2ELoss through it) does, 8.4.150-8.4.190."""
    return preds[1] if isinstance(preds, tuple) else preds


def detection_loss(crit, preds: Any, batch: dict):
    """The criterion's loss of a batch: the gain-weighted (box, cls, dfl) terms times the batch size, a (3,) tensor
    (its sum is what ultralytics' trainer backpropagates). `batch` holds batch_idx, cls and normalised xywh bboxes.

    Reads the first element of what the criterion's __call__ returns, (loss * batch_size, loss items),
    8.4.150-8.4.190. Its buffer is torch.zeros(3) in the default dtype: float64 losses need
    torch.set_default_dtype(torch.float64)."""
    return crit(preds, batch)[0]


def set_loss_gains(crit, gains: dict[str, float]) -> None:
    """The criterion's box/cls/dfl gains set to `gains` (any of GAIN_KEYS); its other hyperparameters are kept.

    Writes `hyp` (read at every call: loss[0] *= hyp.box, ...) of v8DetectionLoss, or of both branches of an
    end-to-end criterion (E2ELoss.one2many and .one2one, which have no `hyp` of their own), 8.4.150-8.4.190."""
    unknown = set(gains) - set(GAIN_KEYS)
    if unknown:
        raise ValueError(f"not a loss gain: {sorted(unknown)}; gains are {', '.join(GAIN_KEYS)}")
    parts = [getattr(crit, b) for b in ("one2many", "one2one") if hasattr(crit, b)] or [crit]
    for part in parts:
        part.hyp = type(part.hyp)(**{**vars(part.hyp), **gains})


def criterion_gains(crit) -> dict[str, float]:
    """The criterion's box/cls/dfl gains (of its one-to-many branch for an end-to-end criterion).

    Reads `hyp` of v8DetectionLoss or of E2ELoss.one2many, 8.4.150-8.4.190."""
    part = getattr(crit, "one2many", crit)
    return {k: float(getattr(part.hyp, k)) for k in GAIN_KEYS}
