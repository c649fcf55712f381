"""The one plan from a student mode to what it runs, for every tool that trains students (demo, bench, study).

A student mode (config.STUDENT_MODES: plain, online, static, warp, replay, grad, grad_online, flip) is one (trainer, targets) pair
of DistillSettings and the term it weights; `plan` turns it, with the sources it reads (the teacher, the static cache, the replay cache), into
the settings the trainer receives and says which source it needs built first. No torch, no ultralytics."""

from __future__ import annotations

from dataclasses import dataclass

from atcache.config import DEFAULT_AT_WEIGHT, STUDENT_MODE_FIELDS, STUDENT_MODES, DistillSettings
from atcache.errors import AtcacheError

# demo and bench report the warp student under its trainer's name, 'cache' (JSON keys, table rows, ratio names
# cache_over_plain ...); every other mode under its own name
REPORT_NAMES = {"warp": "cache"}


@dataclass(frozen=True)
class Sources:
    """What AT students read: `layers` (student, teacher) pairs, the teacher checkpoint (online), the static cache
    (static, warp) and the replay cache (replay; grad: one built with --gradient)."""

    layers: tuple[tuple[int, int], ...] = ()
    teacher: str = ""
    cache: str = ""
    replay_cache: str = ""


@dataclass(frozen=True)
class StudentPlan:
    """A student mode's settings and what must exist before it trains: 'teacher' (online), 'cache' (static, warp),
    'replay' (a replay build of the student's epochs with the run's aug seed), or '' (plain)."""

    mode: str
    settings: DistillSettings
    needs: str

    @property
    def replay_build(self) -> bool:
        return self.needs == "replay"


def plan(mode: str, sources: Sources, at_weight: float | None = None, aug_seed: int | None = None) -> StudentPlan:
    """The settings of student `mode`. `at_weight`: the weight of the mode's term (at_weight; grad: gradient_weight,
    flip: flip_weight), None: the default 1; `aug_seed` seeds each sample's augmentation (None: ultralytics' own). A
    replay (or grad) student takes its aug seed from its cache (built with it), so its settings leave it out."""
    if mode not in STUDENT_MODES:
        raise AtcacheError(f"student mode {mode!r} is unknown; choose among {', '.join(STUDENT_MODES)}")
    trainer, targets = STUDENT_MODE_FIELDS[mode]
    weight = DEFAULT_AT_WEIGHT if at_weight is None else at_weight
    if mode == "flip":
        return StudentPlan(mode, DistillSettings(mode="plain", aug_seed=aug_seed, flip_weight=weight), "")
    if trainer == "plain":
        return StudentPlan(mode, DistillSettings(mode="plain", aug_seed=aug_seed), "")
    if mode == "grad":
        return StudentPlan(mode, DistillSettings(mode="cache", cache=sources.replay_cache, targets="replay",
                                                 layers=sources.layers, at_weight=0.0, gradient_weight=weight),
                           "replay")
    if mode == "grad_online":
        return StudentPlan(mode, DistillSettings(mode="online", teacher=sources.teacher, layers=sources.layers,
                                                 at_weight=0.0, gradient_weight=weight, aug_seed=aug_seed), "teacher")
    if trainer == "online":
        return StudentPlan(mode, DistillSettings(mode="online", teacher=sources.teacher, layers=sources.layers,
                                                 at_weight=weight, aug_seed=aug_seed), "teacher")
    if targets == "replay":
        return StudentPlan(mode, DistillSettings(mode="cache", cache=sources.replay_cache, targets="replay",
                                                 layers=sources.layers, at_weight=weight), "replay")
    return StudentPlan(mode, DistillSettings(mode="cache", cache=sources.cache, targets=targets, layers=sources.layers,
                                             at_weight=weight, aug_seed=aug_seed), "cache")


def report_name(mode: str) -> str:
    """The name demo and bench give student `mode` in their reports ('cache' for warp)."""
    return REPORT_NAMES.get(mode, mode)


def mode_of(report: str) -> str:
    """The student mode behind a demo/bench report name ('cache' -> warp)."""
    return {v: k for k, v in REPORT_NAMES.items()}.get(report, report)
