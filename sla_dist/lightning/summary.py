"""The end of a training run: the loss curve as a PNG and a summary block of what the run produced and what to run
next. Both read the run's CSV log, so they cover the whole run across resumes, not only the last session."""

from __future__ import annotations

import csv
import shlex
from dataclasses import dataclass
from pathlib import Path


def read_curves(metrics_csv: str | Path, keys: tuple[str, ...] = ("train/loss", "val/flow")) -> dict[str, list]:
    """{key: [(step, value), ...]} of the logged values of ``keys`` in a Lightning CSV log (empty when missing)."""
    curves: dict[str, list] = {k: [] for k in keys}
    path = Path(metrics_csv)
    if not path.is_file():
        return curves
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            for key in keys:
                if row.get(key) not in (None, ""):
                    curves[key].append((int(row["step"]), float(row[key])))
    return curves


def plot_loss(curves: dict[str, list], path: str | Path) -> Path | None:
    """The curves as a PNG (log-scale loss over steps); None when there is nothing to plot or no matplotlib."""
    if not any(curves.values()):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, marker="o" if len(points) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass
class RunSummary:
    """What one ``sla-dist train`` invocation ends with."""

    output_dir: str
    step: int
    max_steps: int
    start_step: int
    wall_time: float
    tokens_seen: int
    curves: dict
    checkpoint: str | None
    sample: str | None = None
    loss_plot: str | None = None

    def render(self) -> str:
        out = self.output_dir
        rows = [("steps", f"{self.step} / {self.max_steps} (this session: {self.start_step} -> {self.step})")]
        for key, label in (("train/loss", "final loss"), ("val/flow", "val flow loss")):
            points = self.curves.get(key) or []
            if points:
                rows.append((label, f"{points[-1][1]:.4f} (step {points[-1][0]})"))
        steps = self.step - self.start_step
        speed = f"{steps / self.wall_time:.3g} steps/s" if steps and self.wall_time > 0 else "no steps run"
        if steps and self.tokens_seen:
            speed += f", {self.tokens_seen / self.wall_time:.4g} tokens/s"
        rows.append(("wall time", f"{_duration(self.wall_time)} ({speed})"))
        rows.append(("checkpoint", self.checkpoint or "none written"))
        if self.sample:
            rows.append(("sample", self.sample))
        if self.loss_plot:
            rows.append(("loss curve", self.loss_plot))
        rows.append(("logs", f"{out}/logs  (tensorboard --logdir {shlex.quote(out + '/logs')})"))
        width = max(len(name) for name, _ in rows)
        lines = [f"== sla-dist train: {out} " + "=" * max(4, 60 - len(out))]
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        if self.checkpoint:
            ckpt = shlex.quote(self.checkpoint)
            lines += ["  next:",
                      f"    sla-dist export {ckpt} {shlex.quote(out + '/model.safetensors')}",
                      f"    sla-dist eval {ckpt} --out {shlex.quote(out + '/eval')}"]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
