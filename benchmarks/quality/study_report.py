"""The quality study's report: the verdict against the goal, the Markdown write-up and the figure.

Goal (issue #15, the paper's Table 1 at small scale): SLA's final validation loss within 1 % of the dense
fine-tune's (the mean over the dense seeds), its FVD no worse than the worse dense seed (inside the seeds' spread or
better), and sparse-only and linear-only measurably worse: above SLA's loss by more than the dense seeds' spread.
"""

from __future__ import annotations

import sys
from pathlib import Path

LOSS_TOLERANCE = 0.01
FVD_PREFIX = "fvd_"
"""Keys of a variant's FVD scores: fvd_<extractor>."""
NAMES = {"sla": "SLA", "sparse_only": "sparse-only", "linear_only": "linear-only"}


def _final(r: dict) -> float:
    return r["val_curve"][-1][1]


def verdict(results: dict) -> dict:
    """The goal's checks on the variants finished so far; a check whose variants are missing is None."""
    runs = results["variants"]
    dense = [r for r in runs.values() if r["variant"] == "dense"]
    out: dict = {"loss_within_1pct": None, "fvd_within_dense_spread": None, "sparse_only_worse": None,
                 "linear_only_worse": None, "goal_met": None}
    if not dense:
        return out
    losses = [_final(r) for r in dense]
    fvds = [r["fvd_random"] for r in dense]
    out["dense_loss"] = sum(losses) / len(losses)
    out["dense_loss_spread"] = max(losses) - min(losses) if len(losses) > 1 else None
    out["dense_fvd_range"] = [min(fvds), max(fvds)] if len(fvds) > 1 else None
    if "sla" in runs:
        sla = runs["sla"]
        out["sla_loss_gap"] = (_final(sla) - out["dense_loss"]) / out["dense_loss"]
        out["loss_within_1pct"] = out["sla_loss_gap"] <= LOSS_TOLERANCE
        if out["dense_fvd_range"] is not None:
            out["sla_fvd_excess"] = sla["fvd_random"] - out["dense_fvd_range"][1]
            out["fvd_within_dense_spread"] = out["sla_fvd_excess"] <= 0
        for name in ("sparse_only", "linear_only"):
            if name in runs and out["dense_loss_spread"] is not None:
                out[f"{name}_minus_sla"] = _final(runs[name]) - _final(sla)
                out[f"{name}_worse"] = out[f"{name}_minus_sla"] > out["dense_loss_spread"]
    checks = [out[k] for k in ("loss_within_1pct", "fvd_within_dense_spread", "sparse_only_worse",
                               "linear_only_worse")]
    out["goal_met"] = None if None in checks else all(checks)
    return out


def _hints(results: dict, v: dict) -> list[str]:
    """What the data says would close SLA's gap to dense, when it misses."""
    runs, hints = results["variants"], []
    sla = runs["sla"]
    curve = sla["val_curve"]
    if v["loss_within_1pct"] is False and len(curve) >= 2 and curve[-2][1] > curve[-1][1]:
        drop = (curve[-2][1] - curve[-1][1]) / curve[-1][1]
        steps = curve[-1][0] - curve[-2][0]
        hints.append(f"SLA was still improving at the end ({drop:.2%} over its last {steps} steps, against a "
                     f"{v['sla_loss_gap']:.2%} gap to dense): more fine-tune steps.")
    gap = v.get("sparse_only_minus_sla")
    if gap is not None and v["dense_loss_spread"] is not None and gap <= v["dense_loss_spread"]:
        hints.append(f"SLA is not separated from sparse-only ({gap:+.4f}, dense seed spread "
                     f"{v['dense_loss_spread']:.4f}): the linear branch (proj_l, zero at the start) adds little "
                     "yet; more steps or a higher fine-tune lr for proj_l, another feature map, or distillation "
                     "from the dense teacher (teacher_weight).")
    before = results.get("attention_before", {}).get("sla", {}).get("error")
    if before:
        hints.append(f"SLA's attention error before fine-tuning is {sum(before) / len(before):.3f} (mean relative "
                     "L2 over layers): a larger topk lowers it at a lower sparsity.")
    return hints


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _attention_table(results: dict) -> list[str]:
    before, runs = results.get("attention_before") or {}, results["variants"]
    after = {name: runs[name]["attention_after"] for name in NAMES if runs.get(name, {}).get("attention_after")}
    if not before:
        return []
    cols = [f"{NAMES[n]} before" for n in before] + [f"{NAMES[n]} after" for n in after]
    sparsity = before.get("sla", {}).get("sparsity")
    lines = ["| layer | " + " | ".join(cols) + (" | SLA realised sparsity |" if sparsity else " |"),
             "| --- |" + " --- |" * (len(cols) + bool(sparsity))]
    layers = len(next(iter(before.values()))["error"])
    rows = [(str(i), [r["error"][i] for r in before.values()] + [a[i] for a in after.values()],
             sparsity[i] if sparsity else None) for i in range(layers)]
    rows.append(("mean", [_mean(r["error"]) for r in before.values()] + [_mean(a) for a in after.values()],
                 _mean(sparsity) if sparsity else None))
    for label, values, s in rows:
        lines.append(f"| {label} | " + " | ".join(f"{x:.4f}" for x in values)
                     + (f" | {s:.2%} |" if sparsity else " |"))
    return lines


def _calibration_note(results: dict) -> str:
    """How SLA's proj_l started: calibrated (and the attention error that bought) or at zero."""
    clips = results["config"].get("calibrate_clips", 0)
    if not clips:
        return ", proj_l from zero"
    calibration = (results["variants"].get("sla") or {}).get("calibration")
    errors = (f" (mean attention error on them {calibration['sparse_error']:.3f} -> "
              f"{calibration['calibrated_error']:.3f})" if calibration else "")
    return f", proj_l fitted to the dense model's attention on {clips} training clips before fine-tuning{errors}"


def markdown_report(results: dict, image: str) -> str:
    """The write-up: setup, results table, attention errors and the verdict (``image``: the figure's file name)."""
    c, m, s, v = results["config"], results["model"], results["schedule"], results["verdict"]
    scale = c.get("proj_lr_scale", 1.0)
    t = results["timings"]
    lines = [f"# SLA quality study — {results['date']} ({results['device']})", ""]
    if results["status"] != "complete":
        state = "pretrain phase only" if results["status"] == "pretrained" else "PARTIAL: still running when written"
        lines += [f"**{state}**. Finished: pretraining "
                  f"{'yes' if results.get('pretrain') else 'no'}, fine-tunes {list(results['variants']) or 'none'}.",
                  ""]
    planned = "as given"
    if s["predicted_s"]:
        planned = (f"planned from measured step times to fit a {results['budget_s']:.0f} s budget, "
                   + ("below the preset's caps" if s["scaled"] else "the preset's caps"))
    pretrained = results.get("pretrain")
    pretrain_steps = pretrained["steps"] if pretrained else s["pretrain_steps"]
    sla_before = (results.get("attention_before") or {}).get("sla", {})
    realised = _mean(sla_before["sparsity"]) if sla_before.get("sparsity") else None
    lines += [
        f"- Machine: {results['device']}, torch {results['torch']}, triton {results['triton']}; SLA: "
        f"{results['sla_backend']}; dense: SDPA.",
        f"- Command: `{results['command']}` (phase {results['phase']}); wall time {t.get('total_s', 0):.0f} s "
        f"(setup {t.get('setup_s', 0):.0f}, probe {t.get('probe_s', 0):.0f}, pretrain {t.get('pretrain_s', 0):.0f}, "
        f"fine-tunes {t.get('finetune_s', 0):.0f}).",
        f"- Model: VideoDiT, {m['num_layers']} layers, dim {m['dim']}, {m['num_heads']} heads of "
        f"{m['dim'] // m['num_heads']}, FFN {m['ffn_dim']}, text dim {m['text_dim']}; "
        f"{results['parameters'] / 1e6:.1f} M parameters.",
        f"- Data: built-in synthetic text-to-video set, {c.get('scene', 'plain')} scene, clips of {c['frames']} x "
        f"{c['size']} x {c['size']} latents "
        f"({m['in_channels']} channels) = {results['tokens_per_clip']} tokens ({results['key_blocks']} key blocks "
        f"of 64); {c['train_samples']} train, {c['val_samples']} validation ({c['draws']} noise levels each), "
        f"{c['fvd_videos']} FVD and {c['reference_videos']} reference clips.",
        f"- Schedule ({planned}): dense pretrain {pretrain_steps} AdamW steps (lr {c['pretrain_lr']}, "
        f"warm-up {c['warmup_steps']}, batch {c['batch_size']}), then {s['finetune_steps']} fine-tune steps "
        f"(lr {c['finetune_lr']}; proj_l / linear-only projection lr {c['finetune_lr'] * scale:.3g} (x{scale:g})) "
        "per variant, identical batches and noise per seed.",
        f"- SLA: topk {1 - c['sparsity']:.3g} ({_fmt(realised, '.2%')} realised block sparsity), negligible 0, "
        f"{c['feature_map']} feature map, linear_scope marginal"
        + (f", teacher weight {c['teacher_weight']}" if c["teacher_weight"] else "")
        + _calibration_note(results)
        + ". Sparse-only: the same without the linear branch. Linear-only: normalised linear attention over all "
        "keys with a learnable projection.",
        f"- FVD: seeded random 3D-conv extractor, {c['fvd_videos']} generated vs {c['reference_videos']} reference "
        f"clips, {c['sample_steps']} Euler steps.",
        "",
    ]
    if pretrained:
        lines += [_pretrain_line(pretrained), ""]
    runs = results["variants"]
    if runs:
        fvds = [k for k in next(iter(runs.values())) if k.startswith(FVD_PREFIX)]
        dense_loss = v.get("dense_loss")
        lines += ["| variant | val flow loss (fine-tune start -> end) | vs dense | "
                  + " | ".join(f"FVD ({k[4:]})" for k in fvds) + " | s / step |",
                  "| --- | --- | --- |" + " --- |" * len(fvds) + " --- |"]
        for name, r in runs.items():
            start, end = r["val_curve"][0][1], r["val_curve"][-1][1]
            rel = _fmt(None if dense_loss is None else (end - dense_loss) / dense_loss, "+.2%")
            lines.append(f"| {name} | {start:.4f} -> {end:.4f} | {rel} | "
                         + " | ".join(f"{r[k]:.3f}" for k in fvds) + f" | {r['s_per_step']:.3f} |")
        fvd_range = v.get("dense_fvd_range")
        fvd_range = "n/a" if fvd_range is None else f"{fvd_range[0]:.3f}-{fvd_range[1]:.3f}"
        lines += ["", f"Dense seeds: final loss spread {_fmt(v.get('dense_loss_spread'), '.4f')}, FVD range "
                  f"{fvd_range}.", "", f"![validation curves and FVD]({image})", ""]
    table = _attention_table(results)
    if table:
        lines += ["## Attention error per layer", "",
                  "Relative L2 of each layer's attention output against full attention on the same q, k, v. Before: "
                  "fresh layers of each variant on the pretrained dense model's q, k, v (SLA's proj_l starts at zero, "
                  "so SLA equals sparse-only there). After: each fine-tuned model on its own q, k, v.", "", *table, ""]
    lines += ["## Verdict", ""]
    lines += _verdict_lines(v)
    if v.get("loss_within_1pct") is False or v.get("fvd_within_dense_spread") is False:
        lines += ["", "What the data points to:", ""] + [f"- {h}" for h in _hints(results, v)]
    return "\n".join(lines) + "\n"


def _pretrain_line(p: dict) -> str:
    """Total steps, each call's step range and speed, and the validation curve across calls."""
    calls = p.get("calls") or [{"start": 0, **p}]  # a record written before resumable pretraining: one call

    def curve(points: list) -> str:
        return ", ".join(f"{step}: {loss:.4f}" for step, loss in points)

    if len(calls) == 1:
        return (f"Pretraining ({p['steps']} steps, {p['s_per_step']:.3f} s/step): validation loss "
                f"{curve(calls[0]['val_curve'])}.")
    ranges = ", ".join(f"steps {c['start']}-{c['start'] + c['steps']} at {c['s_per_step']:.3f} s/step" for c in calls)
    joined = curve(calls[0]["val_curve"]) + "".join(f" | resumed {curve(c['val_curve'])}" for c in calls[1:])
    return f"Pretraining ({p['steps']} steps in {len(calls)} calls: {ranges}): validation loss {joined}."


def _verdict_lines(v: dict) -> list[str]:
    def mark(ok):
        return "not measured" if ok is None else ("met" if ok else "**missed**")

    lines = []
    if v.get("sla_loss_gap") is not None:
        lines.append(f"- SLA final validation loss vs the dense mean {v['dense_loss']:.4f}: "
                     f"{v['sla_loss_gap']:+.2%} (goal within {LOSS_TOLERANCE:.0%}): {mark(v['loss_within_1pct'])}"
                     + ("" if v["loss_within_1pct"] else f", by {v['sla_loss_gap'] - LOSS_TOLERANCE:.2%}") + ".")
    if v.get("sla_fvd_excess") is not None:
        lines.append(f"- SLA FVD against the dense seeds' range {v['dense_fvd_range'][0]:.3f}-"
                     f"{v['dense_fvd_range'][1]:.3f}: {v['sla_fvd_excess']:+.3f} above its top: "
                     f"{mark(v['fvd_within_dense_spread'])}.")
    for name in ("sparse_only", "linear_only"):
        if v.get(f"{name}_minus_sla") is not None:
            lines.append(f"- {NAMES[name]} final loss minus SLA's: {v[f'{name}_minus_sla']:+.4f} (dense seed spread "
                         f"{v['dense_loss_spread']:.4f}): measurably worse: "
                         + ("yes." if v[f"{name}_worse"] else "**no**."))
    lines.append(f"- Goal: {mark(v['goal_met'])}.")
    return lines


def plot(results: dict, path: Path) -> None:
    """Fine-tune validation curves, FVD bars and the per-layer attention error before fine-tuning."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    runs, before = results["variants"], results.get("attention_before") or {}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    curves, bars, errors = axes
    for name, r in runs.items():
        steps, losses = zip(*r["val_curve"])
        curves.plot(steps, losses, marker=".", label=name)
    curves.set_xlabel("fine-tune step")
    curves.set_ylabel("validation flow-matching loss")
    curves.set_yscale("log")  # the variants of interest differ by a few %, linear-only by several times
    curves.grid(alpha=0.3)
    if runs:
        curves.legend(fontsize="small")
    names = list(runs)
    bars.bar(names, [runs[n]["fvd_random"] for n in names])
    bars.set_ylabel("FVD (random 3D-conv features)")
    bars.tick_params(axis="x", rotation=30)
    for name, r in before.items():
        errors.plot(range(len(r["error"])), r["error"], marker="o", label=f"{NAMES[name]}, before fine-tune")
    for name in NAMES:
        if runs.get(name, {}).get("attention_after"):
            errors.plot(range(len(runs[name]["attention_after"])), runs[name]["attention_after"], marker="x",
                        linestyle="--", label=f"{NAMES[name]}, after")
    errors.xaxis.set_major_locator(MaxNLocator(integer=True))
    errors.set_xlabel("layer")
    errors.set_ylabel("relative L2 vs full attention")
    errors.grid(alpha=0.3)
    if before:
        errors.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
