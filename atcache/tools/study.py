"""`atcache study`: a seeded accuracy study of what attention transfer from the cache buys, at CPU scale.

One teacher, trained on the whole training split; students that see a subset of it, trained the same way (data,
epochs, hyperparameters, `--aug-seed` = seed) in each mode: plain, online AT, from the cache with static, warp and
replay targets, gradient-based AT from replay targets (grad) and the flip-symmetry term (flip), over several seeds;
every student is scored on the whole validation split. Reports per-seed values, mean / std per mode and each mode's
per-seed difference to plain with its 95 % confidence interval (JSON and a Markdown table), rewritten after every
seed; a rerun in the same OUT (or with the same --ledger) reuses the students already trained with the same settings."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import yaml

from atcache.config import BuildConfig
from atcache.tools import plans
from atcache.settings import STUDY_MODES, StudyConfig  # noqa: F401  (STUDY_MODES: the default --modes)
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


def run_study(config: StudyConfig, out: Path, ledger: Path | None = None) -> Iterator[str]:
    """Data, teacher (reused when OUT already holds one trained with the same settings), caches, then every mode for
    every seed; writes OUT/accuracy.json and OUT/accuracy.md and yields progress lines. Students recorded in their run
    folder or in `ledger` with the same settings are reused; `ledger` gets every finished student's record."""
    from atcache.teacher.pipeline import build_cache
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
    if fresh and _ledger_teacher(ledger, teacher_key, out, marker):
        fresh = False
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
    teacher_sha = _sha256(Path(teacher["checkpoint"]))
    if ledger is not None and (_ledger(ledger)["teacher"] or {}).get("sha256") != teacher_sha:
        _keep_teacher(ledger, teacher)

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
    gradients = "grad" in config.modes  # the replay caches then hold J_T too (one cache serves replay and grad)
    runs: dict[str, dict] = {name: {"per_seed": []} for name, _, _ in _mode_names(config)}
    counts = dict(config.mode_seeds)
    setup = {"device": device_name(resolve_device(config.device)),
             "teacher": {"checkpoint": teacher["checkpoint"], "metrics": teacher["metrics"],
                         "train_s": teacher.get("seconds")},
             "data": {"student_train_images": config.student_images,
                      "val_images": len(_val_files(student_yaml)), "layers": [t for _, t in layers]},
             "cache_build_s": cache_report.seconds}
    for k, seed in enumerate(config.seeds):
        replay_built, replay_s = False, 0.0
        sources = plans.Sources(layers=layers, teacher=teacher["checkpoint"], cache=str(cache),
                                replay_cache=str(out / f"replay_seed{seed}{_tag(config, epochs=True)}"
                                                       f"{'_grad' if gradients else ''}.zarr"))
        for name, mode, weight in _mode_names(config):
            if k >= counts.get(mode, len(config.seeds)):
                continue
            student = student_plan(mode, weight, seed, sources)
            run_name = f"{name}_seed{seed}{_tag(config, True)}"
            folder = out / "students" / run_name  # ultralytics' run folder (project, name, exist_ok)
            entry = _finished_run(folder, ledger, student.settings, {**overrides, "seed": seed}, teacher_sha)
            if entry is None and student.replay_build and not replay_built:  # the teacher on this seed's views
                report = build(Path(sources.replay_cache), replay_epochs=config.student_epochs, aug_seed=seed,
                               gradient=gradients)
                replay_built, replay_s = True, report.seconds
                yield f"seed {seed}: build-cache --replay-epochs {config.student_epochs}: {report.summary()}"
            if entry is None:
                t0 = time.perf_counter()
                r = measure_training(student.settings, {**overrides, "seed": seed, "name": run_name})
                m = r.get("metrics", {})
                entry = {"seed": seed, **{key: m.get(col, 0.0) for key, col in SCORES.items()},
                         "img_per_s": r["img_per_s"], "wall_s": time.perf_counter() - t0,
                         "cache_build_s": replay_s if student.replay_build else None, "save_dir": r["save_dir"]}
                _record_run(folder, ledger, student.settings, {**overrides, "seed": seed}, entry, teacher_sha)
            runs[name]["per_seed"].append(entry)
            yield f"seed {seed} {name}: mAP50 {entry['mAP50']:.3f} mAP50-95 {entry['mAP50-95']:.3f} in {entry['wall_s']:.0f}s"
        results = _summary(config, setup, runs, time.perf_counter() - t_start)  # written after every seed
        (out / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "accuracy.md").write_text(study_table(results) + "\n")
    yield ""
    yield from study_table(results).splitlines()
    yield f"results: {out / 'accuracy.md'} and {out / 'accuracy.json'} ({results['seconds']:.0f}s in all)"


RUN_RECORD = "atcache_study_run.json"  # in a finished student's run folder: its settings and figures


def _finished_run(folder: Path, ledger: Path | None, settings, overrides: dict, teacher_sha: str) -> dict | None:
    """The figures of a student this study already trained with the same settings and teacher (its run folder's
    record, else the ledger's; a rerun after an interruption continues where it stopped), else None."""
    record, kept = folder / RUN_RECORD, _ledger(ledger)["students"]
    saved = json.loads(record.read_text()) if record.is_file() else kept.get(folder.name)
    if saved is None or saved.get("teacher_sha256") != teacher_sha:
        return None
    if saved["settings"] != settings.to_json() or saved["overrides"] != json.loads(json.dumps(overrides)):
        return None
    if ledger is not None and kept.get(folder.name) != saved:  # trained before the ledger was given
        _record_run(folder, ledger, settings, overrides, saved["entry"], teacher_sha)
    return {**saved["entry"], "reused": True}


def _ledger(path: Path | None) -> dict:
    """{"teacher": its record, "students": {run name: record}} of a study's ledger file (empty if none)."""
    saved = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    return {"teacher": saved.get("teacher"), "students": saved.get("students", {})}


def _write_ledger(path: Path, ledger: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"teacher": ledger["teacher"], "students": dict(sorted(ledger["students"].items()))},
                              indent=1) + "\n")
    tmp.replace(path)


def _record_run(folder: Path, ledger: Path | None, settings, overrides: dict, entry: dict, teacher_sha: str) -> None:
    record = {"settings": settings.to_json(), "overrides": overrides, "teacher_sha256": teacher_sha, "entry": entry}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_RECORD).write_text(json.dumps(record, indent=2))
    if ledger is not None:
        kept = _ledger(ledger)
        kept["students"][folder.name] = record
        _write_ledger(ledger, kept)


def _teacher_file(ledger: Path) -> Path:
    return ledger.with_name(ledger.stem + "_teacher.pt")


def _keep_teacher(ledger: Path | None, teacher: dict) -> None:
    """The ledger keeps a copy of the trained teacher (its students are only comparable with that teacher)."""
    if ledger is None:
        return
    import shutil

    kept = _ledger(ledger)
    ledger.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(teacher["checkpoint"], _teacher_file(ledger))
    kept["teacher"] = {k: teacher[k] for k in ("key", "metrics", "seconds")} | {
        "sha256": _sha256(_teacher_file(ledger)), "file": _teacher_file(ledger).name}
    _write_ledger(ledger, kept)


def _ledger_teacher(ledger: Path | None, key: dict, out: Path, marker: Path) -> bool:
    """Put the ledger's teacher (trained with the same settings) into OUT as this study's teacher; False if none."""
    saved = _ledger(ledger)["teacher"] if ledger is not None else None
    if not saved or saved["key"] != json.loads(json.dumps(key)) or not _teacher_file(ledger).is_file():
        return False
    import shutil

    best = out / "teacher" / "weights" / "best.pt"
    best.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_teacher_file(ledger), best)
    if _sha256(best) != saved["sha256"]:
        return False
    marker.write_text(json.dumps({"key": key, "checkpoint": str(best), "metrics": saved["metrics"],
                                  "seconds": saved.get("seconds")}, indent=2))
    return True


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer `df`: the closed forms in theta = atan(t / sqrt(df)) (Abramowitz &
    Stegun 26.7.3-4), exact for the few degrees of freedom a study has."""
    theta = math.atan(t / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:  # odd: A = 2/pi (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...)), df - 3 powers of c
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    else:  # even: A = sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...), df - 2 powers of c
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = math.sin(theta) * total
    return 0.5 + a / 2  # A is P(|T| <= t) for t >= 0; odd in t


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with integer `df` >= 1 (bisection on `_t_cdf`; 0.975 gives the two-sided 95 %
    interval's factor: 12.706 at df 1, 2.262 at 9)."""
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def paired_difference(values: list[float], plain: list[float]) -> dict:
    """Per-seed differences mode - plain (same seed: same init, same batches) with their mean, std and the 95 %
    confidence interval of the mean (Student's t, n - 1 degrees of freedom)."""
    d = [a - b for a, b in zip(values, plain)]
    mean, std = _mean_std(d)
    half = t_quantile(0.975, len(d) - 1) * std / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return {"n": len(d), "differences": d, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def _summary(config: StudyConfig, setup: dict, runs: dict, seconds: float) -> dict:
    """The study's JSON: per mode the per-seed values, mean / std, and the paired difference to plain."""
    modes = {}
    for name, run in runs.items():
        seeds = run["per_seed"]
        if not seeds:
            continue
        m = modes[name] = {key: [s[key] for s in seeds] for key in ("mAP50", "mAP50-95", "img_per_s", "wall_s")}
        m["seeds"] = [s["seed"] for s in seeds]
        for key in ("mAP50", "mAP50-95", "img_per_s"):
            m[f"{key}_mean"], m[f"{key}_std"] = _mean_std(m[key])
        if any(s.get("cache_build_s") is not None for s in seeds):
            m["cache_build_s"] = [s["cache_build_s"] for s in seeds]
    plain = modes.get("plain")
    for name, m in modes.items():
        if plain is None or name == "plain":
            continue
        common = [s for s in m["seeds"] if s in plain["seeds"]]
        if common:
            pick = lambda mode, key: [mode[key][mode["seeds"].index(s)] for s in common]  # noqa: E731
            m["vs_plain"] = {"seeds": common, **{key: paired_difference(pick(m, key), pick(plain, key))
                                                 for key in SCORES}}
    return {"config": asdict(config), **setup, "modes": modes, "seconds": seconds}


def _val_files(data_yaml: Path) -> tuple[str, ...]:
    from atcache.data.splits import split_files

    return split_files(data_yaml, "val").files


def study_table(results: dict) -> str:
    """Modes x (mean +- std over seeds, and the paired difference to plain with its 95 % CI) as a Markdown table,
    with the setup in its last line."""
    c, d = results["config"], results["data"]
    lines = ["| mode | mAP50 | mAP50-95 | mAP50 − plain (95 % CI) | mAP50-95 − plain (95 % CI) | img/s | seeds |",
             "|---|---|---|---|---|---|---|"]

    def diff(m: dict, key: str) -> str:
        v = m.get("vs_plain", {}).get(key)
        if not v:
            return ""
        lo, hi = v["ci95"]
        return f"{v['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if v["n"] > 1 else f"{v['mean']:+.3f}"

    for name, m in results["modes"].items():
        lines.append(f"| {name} | {m['mAP50_mean']:.3f} ± {m['mAP50_std']:.3f} | "
                     f"{m['mAP50-95_mean']:.3f} ± {m['mAP50-95_std']:.3f} | {diff(m, 'mAP50')} | "
                     f"{diff(m, 'mAP50-95')} | {m['img_per_s_mean']:.1f} | {len(m['seeds'])} |")
    t = results["teacher"]["metrics"]
    lines.append(f"| teacher {Path(c['teacher']).stem} (reference) | {t.get(SCORES['mAP50'], 0):.3f} | "
                 f"{t.get(SCORES['mAP50-95'], 0):.3f} | | | | |")
    lines += ["", f"{Path(c['student']).stem} students, {c['student_epochs']} epochs on {d['student_train_images']} "
                  f"training images, imgsz {c['imgsz']}, batch {c['batch']}, term weight "
                  f"{', '.join(map(str, c['at_weights']))} (at_weight; grad: gradient_weight, flip: flip_weight), "
                  f"layers {','.join(map(str, c['layers']))}, "
                  f"scored on {d['val_images']} validation images; teacher {Path(c['teacher']).stem} trained "
                  f"{c['teacher_epochs']} epochs on the whole training split; mean ± std over each mode's seeds (the "
                  f"first of {', '.join(map(str, c['seeds']))}; count in the last column); differences to plain "
                  f"paired by seed (same init, same batches), mean and 95 % t-interval; device: {results['device']}."]
    return "\n".join(lines)
