"""Merge quality-study runs made in separate device calls into one study: one table, one verdict, one figure.

A 10-minute device call holds a few fine-tunes, so the study's variants (dense seeds, SLA, sparse-only,
linear-only) come from several ``quality_study.py --phase finetune --resume-from <same weights>`` runs. They are one
study when they start from the same pretrained model and fine-tune with the same settings; only the dense seeds and
the baselines differ. This checks that, takes each variant once (a variant run twice, like SLA with the same seed in
two calls, must have given the same validation curve), recomputes the verdict over all of them and writes the
study's Markdown, JSON and figure with study_report's code. ``--levers`` adds runs from the same pretrained model
that changed one setting to close the gap (more steps, another sparsity, feature map, proj_l learning rate,
distillation): a table of what each changed and where its variants ended against the study's dense mean, and, for
the study and the levers that changed only the sparsity, SLA's and sparse-only's gap to dense against the sparsity
with the sparsity at which SLA's gap reaches the goal: interpolated between the two measured points that bracket it
when the series has them (a measured bracket), else extrapolated on a straight line through the two least sparse
points (an extrapolation, said so).

    python benchmarks/quality/merge_runs.py RUN.json RUN.json ... --out benchmarks/results/<date>-quality-study-h200 \
        [--levers RUN.json ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from study_report import LOSS_TOLERANCE, _final, _fmt, _mean, markdown_report, plot, verdict

SHARED_CONFIG = ("model", "model_overrides", "scene", "frames", "size", "text_len", "train_samples", "val_samples",
                 "fvd_videos", "reference_videos", "batch_size", "finetune_steps", "finetune_lr", "proj_lr_scale",
                 "sparsity", "feature_map", "teacher_weight", "calibrate_clips", "draws", "sample_steps")
"""Settings that make runs comparable: the data, the model and the fine-tune (not the seeds or the baselines)."""
SHARED_RESULTS = ("pretrain", "attention_before", "model", "parameters", "tokens_per_clip", "key_blocks")
"""Recorded results every run of one study shares: the same pretrained weights give the same pretrain record and
the same attention errors before fine-tuning."""


def merge(runs: list[dict]) -> dict:
    """One results dict (study_report's form) with every run's variants; ValueError naming what disagrees."""
    if len(runs) < 2:
        raise ValueError(f"give at least two runs to merge, got {len(runs)}")
    first = runs[0]
    for i, run in enumerate(runs):
        if run.get("status") != "complete":
            raise ValueError(f"run {i} has status {run.get('status')!r}: merge complete runs only")
    for i, run in enumerate(runs[1:], start=1):
        for key in SHARED_CONFIG:
            if run["config"].get(key) != first["config"].get(key):
                raise ValueError(f"run {i} has config {key}={run['config'].get(key)!r}, run 0 "
                                 f"{first['config'].get(key)!r}: not one study")
        for key in SHARED_RESULTS:
            if run.get(key) != first.get(key):
                raise ValueError(f"run {i}'s {key} differs from run 0's: not the same pretrained model")
    merged = {**first, "variants": {}, "commands": [r["command"] for r in runs]}
    for i, run in enumerate(runs):
        for name, variant in run["variants"].items():
            seen = merged["variants"].get(name)
            if seen is not None and seen["val_curve"] != variant["val_curve"]:
                raise ValueError(f"variant {name!r} of run {i} ended at {variant['val_curve'][-1][1]:.6f}, an earlier "
                                 f"run's at {seen['val_curve'][-1][1]:.6f}: the same variant must repeat exactly")
            merged["variants"].setdefault(name, variant)
    # dense seeds first, in seed order, then the others as the runs listed them
    runs_by_name = merged["variants"]
    dense = sorted(n for n, r in runs_by_name.items() if r["variant"] == "dense")
    merged["variants"] = {n: runs_by_name[n] for n in dense + [n for n in runs_by_name if n not in dense]}
    merged["config"] = {**first["config"], "dense_seeds": sorted({s for r in runs for s in r["config"]["dense_seeds"]}),
                        "baselines": sorted({b for r in runs for b in r["config"]["baselines"]})}
    merged["command"] = " + ".join(f"({c})" for c in merged["commands"])
    merged["timings"] = {key: sum(r["timings"].get(key, 0) for r in runs) for key in first["timings"]}
    merged["verdict"] = verdict(merged)
    return merged


def _own_dense(run: dict) -> float | None:
    """The run's dense fine-tunes' mean final loss, None without one."""
    own = [_final(r) for r in run["variants"].values() if r["variant"] == "dense"]
    return sum(own) / len(own) if own else None


def _changed(study: dict, run: dict) -> dict:
    return {k: run["config"].get(k) for k in SHARED_CONFIG if run["config"].get(k) != study["config"].get(k)}


def lever_rows(study: dict, levers: list[dict], names: list[str]) -> list[dict]:
    """Per lever run: the settings it changed against the study and each variant's final loss against the study's
    dense mean; ValueError for a run from other pretrained weights (its numbers would not compare)."""
    dense = study["verdict"]["dense_loss"]
    rows = []
    for name, run in zip(names, levers):
        if run.get("pretrain") != study.get("pretrain"):
            raise ValueError(f"lever run {name} starts from other pretrained weights than the study")
        changed = _changed(study, run)
        own_dense = _own_dense(run)
        for variant, r in run["variants"].items():
            final = _final(r)
            rows.append(dict(run=name, changed=changed, variant=variant, steps=r["val_curve"][-1][0], final=final,
                             vs_dense=(final - dense) / dense,
                             vs_own_dense=None if own_dense is None else (final - own_dense) / own_dense))
    return rows


def lever_table(rows: list[dict], dense: float) -> str:
    lines = ["## Levers tried from the same pretrained model", "",
             f"Each run changed the settings listed; final validation loss against this study's dense mean {dense:.5f} "
             "and against the same run's own dense fine-tune (the fair comparison when the steps changed).",
             "", "| run | changed | variant | steps | final val loss | vs study's dense | vs run's dense |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        changed = ", ".join(f"{k}={v}" for k, v in r["changed"].items()) or "(nothing: a repeat)"
        lines.append(f"| `{r['run']}` | {changed} | {r['variant']} | {r['steps']} | {r['final']:.5f} | "
                     f"{r['vs_dense']:+.1%} | {'n/a' if r['vs_own_dense'] is None else format(r['vs_own_dense'], '+.1%')} |")
    return "\n".join(lines) + "\n"


def sparsity_series(study: dict, levers: list[dict], names: list[str]) -> list[dict]:
    """SLA's and sparse-only's gap to dense at each block sparsity tried: the study and the lever runs that changed
    only the sparsity (lever_rows has checked their pretrained weights), most sparse first. Each gap is against the
    run's own dense fine-tune (the study's: its dense seeds' mean), which saw the same batches and noise."""
    runs = [("this study", study)]
    runs += [(n, r) for n, r in zip(names, levers) if _changed(study, r).keys() == {"sparsity"}]
    rows = []
    for name, run in runs:
        dense, variants = _own_dense(run), run["variants"]
        finals = {v: _final(variants[v]) for v in ("sla", "sparse_only") if v in variants}
        before = (run.get("attention_before") or {}).get("sla") or {}
        rows.append(dict(
            run=name, sparsity=run["config"]["sparsity"],
            realised=_mean(before["sparsity"]) if before.get("sparsity") else None,
            error_before=_mean(before["error"]) if before.get("error") else None,
            **{f"{v}_gap": None if dense is None or v not in finals else (finals[v] - dense) / dense
               for v in ("sla", "sparse_only")},
            sla_minus_sparse_only=finals["sla"] - finals["sparse_only"] if len(finals) == 2 else None))
    return sorted(rows, key=lambda r: -r["sparsity"])


def goal_sparsity(series: list[dict]) -> dict | None:
    """Where SLA's gap to dense reaches the goal (LOSS_TOLERANCE), as {realised, method, points}: ``points`` the two
    (realised sparsity, SLA gap) pairs the estimate rests on, least sparse first. A measured bracket when one exists:
    the most sparse point within the goal and the next sparser one (above it, by that choice), with the crossing
    interpolated on the straight line between them. Otherwise an extrapolation on the line through the two least
    sparse points. None when neither applies: fewer than two points, every point within the goal (no crossing inside
    the series nor towards lower sparsity), or, with no point within the goal, a gap that does not fall with the
    sparsity."""
    points = sorted((r["realised"], r["sla_gap"]) for r in series
                    if r["realised"] is not None and r["sla_gap"] is not None)
    within = [p for p in points if p[1] <= LOSS_TOLERANCE]
    if within:
        low = within[-1]
        sparser = [p for p in points if p[0] > low[0]]
        if not sparser:
            return None
        high = sparser[0]
        crossing = low[0] + (LOSS_TOLERANCE - low[1]) * (high[0] - low[0]) / (high[1] - low[1])
        return dict(realised=crossing, method="measured bracket", points=[list(low), list(high)])
    if len(points) < 2 or points[1][0] == points[0][0]:
        return None
    (s0, g0), (s1, g1) = points[:2]
    slope = (g1 - g0) / (s1 - s0)
    if slope <= 0:
        return None
    return dict(realised=s0 - (g0 - LOSS_TOLERANCE) / slope, method="extrapolation", points=[[s0, g0], [s1, g1]])


def goal_sentence(goal: dict) -> str:
    """The goal estimate in words, saying whether it was measured around or extrapolated."""
    (s0, g0), (s1, g1) = goal["points"]
    reaches = (f"reaches the goal (SLA within {LOSS_TOLERANCE:.0%} of dense) at {goal['realised']:.1%} realised block "
               "sparsity")
    if goal["method"] == "measured bracket":
        return (f"SLA's gap to dense crosses the goal between two measured points, {s0:.2%} ({g0:+.2%}) and "
                f"{s1:.2%} ({g1:+.2%}): a measured bracket. A straight line between them {reaches}, interpolated "
                "(the bracket is measured, the point inside it is not).")
    return (f"No measured point is within the goal; a straight line through the two least sparse points, {s0:.2%} "
            f"({g0:+.2%}) and {s1:.2%} ({g1:+.2%}), {reaches}: an extrapolation, not a measured run.")


def series_table(series: list[dict], dense_spread: float | None) -> str:
    lines = ["## Gap to dense against sparsity", "",
             "SLA and sparse-only from the same pretrained model at each block sparsity tried (this study and the "
             "lever runs that changed only the sparsity); final validation loss against the same run's own dense "
             "fine-tune (this study: its dense seeds' mean). Attention error: SLA's mean relative L2 over layers "
             "before fine-tuning.", "",
             "| sparsity (set / realised) | run | SLA vs dense | sparse-only vs dense | SLA minus sparse-only "
             "| SLA attention error before |", "|---|---|---|---|---|---|"]
    for r in series:
        run = r["run"] if r["run"] == "this study" else f"`{r['run']}`"
        lines.append(f"| {r['sparsity']} / {_fmt(r['realised'], '.2%')} | {run} | {_fmt(r['sla_gap'], '+.2%')} | "
                     f"{_fmt(r['sparse_only_gap'], '+.2%')} | {_fmt(r['sla_minus_sparse_only'], '+.5f')} | "
                     f"{_fmt(r['error_before'], '.3f')} |")
    diffs = [abs(r["sla_minus_sparse_only"]) for r in series if r["sla_minus_sparse_only"] is not None]
    if diffs and dense_spread is not None:
        lines += ["", f"SLA's final loss differs from sparse-only's by at most {max(diffs):.5f} at any sparsity "
                  f"(dense seed spread {dense_spread:.5f}): " + ("not separated." if max(diffs) <= dense_spread
                                                                 else "separated at some sparsity.")]
    goal = goal_sparsity(series)
    if goal is not None:
        lines += ["", goal_sentence(goal)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="quality-study JSON files of one study")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes PREFIX.md, .json and .png")
    parser.add_argument("--levers", nargs="*", type=Path, default=[],
                        help="runs from the same pretrained model with one setting changed, tabled after the verdict")
    args = parser.parse_args(argv)
    merged = merge([json.loads(p.read_text()) for p in args.runs])
    merged["merged_from"] = [p.name for p in args.runs]
    lever_runs, lever_names = [json.loads(p.read_text()) for p in args.levers], [p.name for p in args.levers]
    levers = lever_rows(merged, lever_runs, lever_names)
    merged["levers"] = levers
    series = sparsity_series(merged, lever_runs, lever_names)
    merged["sparsity_series"], merged["goal_sparsity"] = series, goal_sparsity(series)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image = args.out.with_suffix(".png")
    plot(merged, image)
    text = markdown_report(merged, image.name)
    if levers:
        text += "\n" + lever_table(levers, merged["verdict"]["dense_loss"])
    if len(series) > 1:
        text += "\n" + series_table(series, merged["verdict"].get("dense_loss_spread"))
    text += "\nMerged from: " + ", ".join(f"`{p.name}`" for p in args.runs) + " (`benchmarks/quality/merge_runs.py`).\n"
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(merged, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
