"""The evaluation report: ``report.json`` (everything measured), ``report.md`` (side-by-side tables, sample grids,
plots) and the attention-fidelity plot (matplotlib, optional: without it the report says so and keeps the table).
"""

from __future__ import annotations

import json
from pathlib import Path


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_fidelity(results: dict[str, dict], path: str | Path) -> bool:
    """One panel per checkpoint: relative L1 error vs dense per layer, a line per sparsity. False without
    matplotlib (nothing written)."""
    if not has_matplotlib():
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        fidelity = results[name]
        layers = [entry["layer"] for entry in fidelity["layers"]]
        for j, sparsity in enumerate(fidelity["sparsities"]):
            ax.plot(layers, [entry["error"][j] for entry in fidelity["layers"]], marker="o",
                    label=f"{sparsity:.0%} sparse")
        ax.set_title(name)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("relative L1 error vs dense")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    """report.md from the report dict (built by evaluate.py: ``evaluate`` and ``evaluate_checkpoint``)."""
    runs = report["checkpoints"]
    lines = ["# Evaluation report", "", f"Recipe(s): {', '.join(sorted({r['recipe'] for r in runs.values()}))}  ",
             f"Sampler: {report['sampler']}  ", f"FVD extractor: {report['fvd_extractor']}; reference: "
             f"{report['reference']}", "", "| checkpoint | attention | val flow loss | FVD | CLIP score |",
             "| --- | --- | --- | --- | --- |"]
    for name, run in runs.items():
        attention = f"SLA in layers {run['sla_layers']}" if run["sla_layers"] else "dense"
        lines.append(f"| {name} | {attention} | {_fmt(run['val_loss'])} | {_fmt(run['fvd'])} | "
                     f"{_fmt(run['clip_score'])} |")
    lines += ["", "## Attention fidelity (relative L1 error vs dense, per layer)", ""]
    for name, run in runs.items():
        fidelity = run["fidelity"]
        header = " | ".join(f"{s:.0%} sparse" for s in fidelity["sparsities"])
        lines += [f"**{name}** (probe at sigma {fidelity['sigma']})", "", f"| layer | {header} |",
                  "| --- |" + " --- |" * len(fidelity["sparsities"])]
        for entry in fidelity["layers"]:
            cells = " | ".join(f"{e:.4f} ({r:.0%})" for e, r in zip(entry["error"], entry["realized_sparsity"]))
            lines.append(f"| {entry['layer']}{' (SLA)' if entry['sla'] else ''} | {cells} |")
        lines.append("")
    lines.append("Cells: error (realised block sparsity).")
    if report.get("fidelity_plot"):
        lines += ["", f"![attention fidelity]({report['fidelity_plot']})"]
    if report.get("training_curves"):
        lines += ["", "## Training curves (each run's CSV log)", "", f"![training curves]({report['training_curves']})"]
    lines += ["", "## Samples", ""]
    for name, run in runs.items():
        lines += [f"**{name}**: rows = prompts, columns = frames", "", f"![{name}]({run['grid']})", ""]
        lines += [f"{i}. {prompt}" for i, prompt in enumerate(run["prompts"])] + [""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path
