"""Merge quality-study runs made in separate device calls into one study: one table, one verdict, one figure.

A 10-minute device call holds a few fine-tunes, so the study's variants (dense seeds, SLA, sparse-only,
linear-only) come from several ``quality_study.py --phase finetune --resume-from <same weights>`` runs. They are one
study when they start from the same pretrained model and fine-tune with the same settings; only the dense seeds and
the baselines differ. This checks that, takes each variant once (a variant run twice, like SLA with the same seed in
two calls, must have given the same validation curve), recomputes the verdict over all of them and writes the
study's Markdown, JSON and figure with study_report's code. ``--levers`` adds runs from the same pretrained model
that changed one setting to close the gap (more steps, another sparsity, feature map, proj_l learning rate,
distillation): a table of what each changed and where its variants ended against the study's dense mean.

    python benchmarks/quality/merge_runs.py RUN.json RUN.json ... --out benchmarks/results/<date>-quality-study-h200 \
        [--levers RUN.json ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from study_report import markdown_report, plot, verdict

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


def lever_rows(study: dict, levers: list[dict], names: list[str]) -> list[dict]:
    """Per lever run: the settings it changed against the study and each variant's final loss against the study's
    dense mean; ValueError for a run from other pretrained weights (its numbers would not compare)."""
    dense = study["verdict"]["dense_loss"]
    rows = []
    for name, run in zip(names, levers):
        if run.get("pretrain") != study.get("pretrain"):
            raise ValueError(f"lever run {name} starts from other pretrained weights than the study")
        changed = {k: run["config"].get(k) for k in SHARED_CONFIG if run["config"].get(k) != study["config"].get(k)}
        own = [r["val_curve"][-1][1] for v, r in run["variants"].items() if r["variant"] == "dense"]
        own_dense = sum(own) / len(own) if own else None
        for variant, r in run["variants"].items():
            final = r["val_curve"][-1][1]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="quality-study JSON files of one study")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes PREFIX.md, .json and .png")
    parser.add_argument("--levers", nargs="*", type=Path, default=[],
                        help="runs from the same pretrained model with one setting changed, tabled after the verdict")
    args = parser.parse_args(argv)
    merged = merge([json.loads(p.read_text()) for p in args.runs])
    merged["merged_from"] = [p.name for p in args.runs]
    levers = lever_rows(merged, [json.loads(p.read_text()) for p in args.levers], [p.name for p in args.levers])
    merged["levers"] = levers
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image = args.out.with_suffix(".png")
    plot(merged, image)
    text = markdown_report(merged, image.name)
    if levers:
        text += "\n" + lever_table(levers, merged["verdict"]["dense_loss"])
    text += "\nMerged from: " + ", ".join(f"`{p.name}`" for p in args.runs) + " (`benchmarks/quality/merge_runs.py`).\n"
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(merged, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
