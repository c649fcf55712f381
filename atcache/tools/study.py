"""`atcache study`: a seeded accuracy study of what attention transfer from the cache buys, at CPU scale.

One teacher, trained on the whole training split; students that see a subset of it, trained the same way (data,
epochs, hyperparameters, `--aug-seed` = seed) in each mode: plain, online AT, and from the cache with static, warp
and replay targets, over several seeds; every student is scored on the whole validation split. Reports per-seed
values and mean / std per mode (JSON and a Markdown table)."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import yaml

from atcache.config import STUDENT_MODES, BuildConfig
from atcache.tools import plans
from atcache.tools.settings import StudyConfig

STUDY_MODES = STUDENT_MODES  # the CLI's --modes choices (the one list, config.STUDENT_MODES)
SCORES = {"mAP50": "metrics/mAP50(B)", "mAP50-95": "metrics/mAP50-95(B)"}


def _mode_names(config: StudyConfig) -> list[tuple[str, str, float | None]]:
    """(name in the report, mode, at_weight): AT modes get '@w' suffixes when several weights are studied."""
    out = []
    for mode in config.modes:
        if mode == "plain":
            out.append(("plain", mode, None))
            continue
        for w in config.at_weights:
            out.append((mode if len(config.at_weights) == 1 else f"{mode}@w{w:g}", mode, w))
    return out


def _tag(config: StudyConfig, epochs: bool) -> str:
    """Suffix of the caches and student runs of settings that differ from the defaults, so that studies of several
    setups in one OUT keep each other's caches and runs (the teacher is shared)."""
    default, parts = StudyConfig(), []
    if config.layers != default.layers:
        parts.append("L" + "-".join(map(str, config.layers)))
    if config.student_images != default.student_images:
        parts.append(f"n{config.student_images}")
    if epochs and config.student_epochs != default.student_epochs:
        parts.append(f"e{config.student_epochs}")
    return "".join(f"_{p}" for p in parts)


def _student_data(data_yaml: Path, n: int, out: Path) -> Path:
    """A data YAML whose train split is the first `n` training images (ultralytics' order) and whose val split is the
    teacher's whole val split."""
    from atcache.data.splits import load_data_yaml, split_files

    split = split_files(data_yaml, "train")
    if n > len(split.files):
        from atcache.errors import AtcacheError

        raise AtcacheError(f"--student-images {n} is more than the {len(split.files)} training images; "
                           "lower it or generate more with --images")
    listing = out / "student_train.txt"
    listing.write_text("".join(f"{split.absolute(i)}\n" for i in range(n)))
    data = load_data_yaml(data_yaml)
    student = {"path": str(data["path"]), "train": str(listing), "val": data["val"], "names": data["names"]}
    path = out / "student.yaml"
    path.write_text(yaml.safe_dump(student, sort_keys=False))
    return path


def student_plan(mode: str, weight: float | None, seed: int, sources: plans.Sources):
    """What the study trains for `mode` at `weight` and `seed`: the one plan, every student with --aug-seed = seed."""
    return plans.plan(mode, sources, at_weight=weight, aug_seed=seed)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_study(config: StudyConfig, out: Path) -> Iterator[str]:
    """Data, teacher (reused when OUT already holds one trained with the same settings), caches, then every mode for
    every seed; writes OUT/accuracy.json and OUT/accuracy.md and yields progress lines."""
    from atcache.build.pipeline import build_cache
    from atcache.tools.demo import DEMO_HYP, train_teacher
    from atcache.devices import resolve_device
    from atcache.tools.measure import device_name, measure_training
    from atcache.data.synthetic import make_demo_data
    from atcache.data.voc import prepare_voc

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    devkit = make_demo_data(out / "data", images=config.images, size=max(2 * config.imgsz, 96), seed=0, progress=False)
    data_yaml = prepare_voc(devkit, out / "data" / "VOC", progress=False)
    student_yaml = _student_data(data_yaml, config.student_images, out)
    yield f"data: {config.images} synthetic images, students train on {config.student_images} of the training split"

    teacher_key = {k: getattr(config, k) for k in ("images", "imgsz", "teacher", "teacher_epochs", "batch")}
    marker = out / "teacher.json"
    fresh = not (marker.is_file() and json.loads(marker.read_text())["key"] == teacher_key)
    if not fresh:
        teacher = json.loads(marker.read_text())
        yield f"teacher: reused {teacher['checkpoint']}"
    else:
        t0 = time.perf_counter()
        best, metrics = train_teacher(config.teacher, data_yaml, out, config.teacher_epochs, config.imgsz,
                                      config.device, config.batch)
        teacher = {"key": teacher_key, "checkpoint": str(best), "metrics": metrics, "seconds": time.perf_counter() - t0}
        marker.write_text(json.dumps(teacher, indent=2))
        yield f"teacher: {config.teacher} {config.teacher_epochs} epochs in {teacher['seconds']:.0f}s -> {best}"

    def build(path: Path, **kw):
        """The teacher's cache; one this study built before for the same teacher is reused (resumed)."""
        return build_cache(BuildConfig(teacher=teacher["checkpoint"], data=str(student_yaml), out=str(path),
                                       split="train", imgsz=config.imgsz, batch=16, device=config.device, workers=2,
                                       layers=config.layers,
                                       overwrite=fresh, resume=not fresh, chunk_rows=64, progress=False, **kw))

    cache = out / f"cache{_tag(config, epochs=False)}.zarr"
    cache_report = build(cache)
    yield f"build-cache: {cache_report.summary()}"
    layers = tuple((i, i) for i in config.layers)
    overrides = {"model": config.student, "data": str(student_yaml), "epochs": config.student_epochs,
                 "imgsz": config.imgsz, "batch": config.batch, "device": config.device, "workers": 2,
                 "project": str(out / "students"), "exist_ok": True, "plots": False, "val": False,
                 "deterministic": True, **DEMO_HYP}
    runs: dict[str, dict] = {name: {"per_seed": []} for name, _, _ in _mode_names(config)}
    for seed in config.seeds:
        replay_built, replay_s = False, 0.0
        sources = plans.Sources(layers=layers, teacher=teacher["checkpoint"], cache=str(cache),
                                replay_cache=str(out / f"replay_seed{seed}{_tag(config, epochs=True)}.zarr"))
        for name, mode, weight in _mode_names(config):
            student = student_plan(mode, weight, seed, sources)
            if student.replay_build and not replay_built:  # the teacher on this seed's augmented views
                report = build(Path(sources.replay_cache), replay_epochs=config.student_epochs, aug_seed=seed)
                replay_built, replay_s = True, report.seconds
                yield f"seed {seed}: build-cache --replay-epochs {config.student_epochs}: {report.summary()}"
            settings = student.settings
            t0 = time.perf_counter()
            r = measure_training(settings, {**overrides, "seed": seed, "name": f"{name}_seed{seed}{_tag(config, True)}"})
            wall = time.perf_counter() - t0
            m = r.get("metrics", {})
            runs[name]["per_seed"].append({
                "seed": seed, **{k: m.get(key, 0.0) for k, key in SCORES.items()}, "img_per_s": r["img_per_s"],
                "wall_s": wall, "cache_build_s": replay_s if mode == "replay" else None, "save_dir": r["save_dir"]})
            yield (f"seed {seed} {name}: mAP50 {m.get(SCORES['mAP50'], 0):.3f} mAP50-95 {m.get(SCORES['mAP50-95'], 0):.3f}"
                   f" in {wall:.0f}s")
    modes = {}
    for name, run in runs.items():
        seeds = run["per_seed"]
        modes[name] = {key: [s[key] for s in seeds] for key in ("mAP50", "mAP50-95", "img_per_s", "wall_s")}
        modes[name]["seeds"] = [s["seed"] for s in seeds]
        for key in ("mAP50", "mAP50-95", "img_per_s"):
            modes[name][f"{key}_mean"], modes[name][f"{key}_std"] = _mean_std(modes[name][key])
        if name.startswith("replay"):
            modes[name]["cache_build_s"] = [s["cache_build_s"] for s in seeds]
    results = {
        "config": asdict(config),
        "device": device_name(resolve_device(config.device)),
        "teacher": {"checkpoint": teacher["checkpoint"], "metrics": teacher["metrics"],
                    "train_s": teacher.get("seconds")},
        "data": {"student_train_images": config.student_images,
                 "val_images": len(_val_files(student_yaml)), "layers": [t for _, t in layers]},
        "cache_build_s": cache_report.seconds,
        "modes": modes,
        "seconds": time.perf_counter() - t_start,
    }
    (out / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "accuracy.md").write_text(study_table(results) + "\n")
    yield ""
    yield from study_table(results).splitlines()
    yield f"results: {out / 'accuracy.md'} and {out / 'accuracy.json'} ({results['seconds']:.0f}s in all)"


def _val_files(data_yaml: Path) -> tuple[str, ...]:
    from atcache.data.splits import split_files

    return split_files(data_yaml, "val").files


def study_table(results: dict) -> str:
    """Modes x (mean +- std over seeds) as a Markdown table, with the setup in its last line."""
    c, d = results["config"], results["data"]
    lines = ["| mode | mAP50 | mAP50-95 | img/s | seeds |", "|---|---|---|---|---|"]
    for name, m in results["modes"].items():
        lines.append(f"| {name} | {m['mAP50_mean']:.3f} ± {m['mAP50_std']:.3f} | "
                     f"{m['mAP50-95_mean']:.3f} ± {m['mAP50-95_std']:.3f} | {m['img_per_s_mean']:.1f} | "
                     f"{len(m['seeds'])} |")
    t = results["teacher"]["metrics"]
    lines.append(f"| teacher {Path(c['teacher']).stem} (reference) | {t.get(SCORES['mAP50'], 0):.3f} | "
                 f"{t.get(SCORES['mAP50-95'], 0):.3f} | | |")
    lines += ["", f"{Path(c['student']).stem} students, {c['student_epochs']} epochs on {d['student_train_images']} "
                  f"training images, imgsz {c['imgsz']}, batch {c['batch']}, at_weight {', '.join(map(str, c['at_weights']))}, "
                  f"layers {','.join(map(str, c['layers']))}, "
                  f"scored on {d['val_images']} validation images; teacher {Path(c['teacher']).stem} trained "
                  f"{c['teacher_epochs']} epochs on the whole training split; mean ± std over seeds "
                  f"{', '.join(map(str, c['seeds']))}; device: {results['device']}."]
    return "\n".join(lines)
