"""`atcache bench`'s report: the trainers' figures over rounds, the loader's against training's need, the ratios
against their goals, and the few readable lines the CLI prints (bench.json has everything)."""

from __future__ import annotations

import statistics
from pathlib import Path

from atcache.tools.plans import report_name

# The trainers bench measures (student modes) and their names in the report: plain, cache (warp targets), online, replay
TRAINER_MODES = ("plain", "warp", "online", "replay")
TRAINERS = tuple(report_name(m) for m in TRAINER_MODES)
GRADIENT_MODES = ("grad", "grad_online", "flip")  # bench --gradient: gradient-based AT (cached, live) and the flip term
GRADIENT_RATIOS = {  # ratio name -> (trainer, trainer), img/s over img/s
    "grad_over_plain": ("grad", "plain"),
    "grad_over_grad_online": ("grad", "grad_online"),
    "grad_over_replay": ("grad", "replay"),
    "flip_over_plain": ("flip", "plain"),
}
# Goals for the reference setup (GPU, YOLO11m -> YOLO11s, imgsz 640, batch 64): ratio name -> (comparison, value)
GOALS = {
    "cache_over_plain": (">=", 0.97),
    "cache_over_online": (">=", 1.8),
    "mem_cache_over_plain": ("<=", 1.05),
    "build_over_inference": (">=", 0.90),
    "replay_over_plain": (">=", 0.97),
}
GOAL_SETUP = {"teacher": "yolo11m", "student": "yolo11s", "imgsz": 640, "batch": 64}

def over_rounds(results: list[dict]) -> dict:
    """One trainer's rounds: medians of img/s, step time and peak memory, the spread of img/s, every round's figures
    (the rest, e.g. loader timings, from the first round)."""
    ips = [r["img_per_s"] for r in results]
    med = statistics.median(ips)
    out = {**results[0], "rounds": len(results), "img_per_s": med,
           "median_step_s": statistics.median(r["median_step_s"] for r in results),
           "peak_mem_gb": statistics.median(r["peak_mem_gb"] for r in results),
           "img_per_s_rounds": ips, "peak_mem_gb_rounds": [r["peak_mem_gb"] for r in results],
           "position_in_round": [r["position"] for r in results],
           "img_per_s_spread": (max(ips) - min(ips)) / med if med else None,
           "step_s_rounds": [r.get("step_s") for r in results]}
    out.pop("step_s", None)
    return out


def round_ratios(train: dict, a: str, b: str) -> list[float]:
    """a/b img/s per round (the two measured in the same round)."""
    return [x / y for x, y in zip(train[a]["img_per_s_rounds"], train[b]["img_per_s_rounds"])]


def loader_figures(train: dict) -> dict:
    """What the loader can produce (samples, and cached targets alone, times its workers) vs what training uses."""
    plain, cache = train["plain"].get("loader", {}), train["cache"].get("loader", {})
    workers = max(train["cache"]["workers"], 1)
    need = train["cache"]["img_per_s"]
    out = {
        "workers": train["cache"]["workers"],
        "plain_samples_per_s_per_worker": plain.get("samples_per_s"),
        "cache_samples_per_s_per_worker": cache.get("samples_per_s"),
        "targets_per_s_per_worker": cache.get("targets_per_s"),
        "rendered_targets_per_s": cache.get("rendered_targets_per_s"),
        "render_batch": cache.get("render_batch"),
        "training_need_img_per_s": need,
    }
    if plain.get("samples_per_s") and cache.get("samples_per_s"):
        out["cache_samples_over_plain"] = cache["samples_per_s"] / plain["samples_per_s"]
    if cache.get("targets_per_s"):
        out["targets_over_training_need"] = workers * cache["targets_per_s"] / need
        out["cache_samples_over_training_need"] = workers * cache["samples_per_s"] / need
    return out


# ------------------------------------------------------------------------------------------------------- summary
def goals(ratios: dict, cfg, device) -> dict:
    """Each goal with its value and whether it is met; `reference_setup` says if this run is the setup they are for."""
    reference = device.type == "cuda" and all(
        Path(str(getattr(cfg, k))).stem == v if isinstance(v, str) else getattr(cfg, k) == v for k, v in GOAL_SETUP.items())
    out = {"reference_setup": reference, "setup": "GPU, " + ", ".join(f"{k} {v}" for k, v in GOAL_SETUP.items())}
    for name, (op, target) in GOALS.items():
        value = ratios[name]
        out[name] = {"goal": f"{op} {target}", "value": value, "met": value >= target if op == ">=" else value <= target}
    return out


def format_report(report: dict) -> str:
    """The bench as a few readable lines (the JSON has everything)."""
    t, b, s, r = report["train"], report["build"], report["storage"], report["ratios"]
    lines = [f"device: {report['device']}", "",
             f"{'trainer':<11} {'img/s':>9} {'rounds (img/s)':>24} {'median step s':>14} {'peak mem GB':>12}"]
    lines += [f"{k:<11} {t[k]['img_per_s']:>9.1f} {' '.join(f'{x:.1f}' for x in t[k]['img_per_s_rounds']):>24} "
              f"{t[k]['median_step_s']:>14.4f} {t[k]['peak_mem_gb']:>12.2f}" for k in t]
    rb = report["replay_build"]
    lines += ["", f"build {b['build_img_per_s']:.1f} img/s vs teacher inference {b['inference_img_per_s']:.1f} img/s",
              f"replay build {rb['replay_build_img_per_s']:.1f} views/s vs augmented loader + teacher "
              f"{rb['floor_img_per_s']:.1f} img/s ({rb['views']} views, {rb['bytes_per_view'] / 1e3:.1f} KB/view)",
              *([] if not report.get("gradient") else [
                  f"build --gradient {report['gradient']['build_img_per_s']:.1f} img/s, replay build --gradient "
                  f"{report['gradient']['replay_build_img_per_s']:.1f} views/s; gradients (stride "
                  f"{report['gradient']['stride']}) add {report['gradient']['gradient_bytes_per_image'] / 1e3:.1f} "
                  f"KB/image, {report['gradient']['gradient_bytes_per_view'] / 1e3:.1f} KB/view"]),
              f"store {s['bytes_per_image'] / 1e3:.1f} KB/image ({s['map_dtype']}; raw {s['raw_float16_bytes_per_image'] / 1e3:.1f} KB); "
              f"cosine vs float32 >= {min(v['min'] for v in s['cosine_vs_float32'].values()):.6f}"]
    loader = report["loader"]
    if loader.get("cache_samples_over_plain"):
        lines.append(f"loader: {loader['cache_samples_per_s_per_worker']:.0f} samples/s per worker with warp targets vs "
                     f"{loader['plain_samples_per_s_per_worker']:.0f} without ({loader['cache_samples_over_plain']:.2f}x)")
    if loader.get("rendered_targets_per_s"):
        lines.append(f"warp targets rendered on the training device: {loader['rendered_targets_per_s']:.0f} targets/s "
                     f"(batch {loader['render_batch']}) vs training need {loader['training_need_img_per_s']:.1f} img/s")
    elif loader.get("targets_per_s_per_worker"):
        lines.append(f"loader: {loader['targets_per_s_per_worker']:.0f} targets/s per worker x {max(loader['workers'], 1)} "
                     f"vs training need {loader['training_need_img_per_s']:.1f} img/s")
    lines += ["", "ratios (medians over rounds; [min, max] of the same-round ratios):"]
    for name, value in r.items():
        goal = report["goals"].get(name)
        mark = f"   goal {goal['goal']}: {'met' if goal['met'] else 'missed'}" if goal else ""
        spread = report.get("ratio_spread_over_rounds", {}).get(name)
        within = f" [{spread['min']:.3f}, {spread['max']:.3f}]" if spread else ""
        lines.append(f"  {name:<34} {value:>7.3f}{within}{mark}" if value is not None else f"  {name:<34}     n/a")
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    if not report["goals"]["reference_setup"]:
        lines.append(f"  (goals are set for {report['goals']['setup']}; this run is not that setup)")
    return "\n".join(lines)
