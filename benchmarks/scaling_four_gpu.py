"""The scaling model at issue #16's 4-GPU points, and checks against what gpu_suite.sh's parts measured there.

Points, with the parts' own settings:

    ulysses4      one SLA layer under Ulysses at P 2 and 4, L 131072, H 12 and 24, the fused exchange in one chunk,
                  both input layouts: fwd and fwd+bwd as the same run's P 1 layer / P plus the modelled exchange,
                  and the exchange alone (scaling_model.exchange_timing_checks). The exchange's latency and bandwidth
                  were fitted at P 2 only: the P 4 rows test them. Pipelined rows (chunks > 1) are not modelled;
                  their measured efficiency is shown beside the one-chunk rows.
    wan14b-sp4    the 14B recipe's shape at the run's depth (``model.num_layers`` among its overrides), SP 4,
                  ZeRO-3, activation checkpointing: step seconds (the first session's steady median) and nvidia-smi's
                  peak memory.used (the largest of the ranks')
    zero3-sp2dp2  the same at SP 2 x DP 2

Measurements are read from the newest ``benchmarks/results/<date>-<card>x4-<part>.json`` (the name gpu_suite.sh
gives them); a point whose file is absent is predicted only, and no check is made for it. scaling_report.py adds
the checks to the model's and this section to its results file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from scaling_measurements import ExchangeTiming, LayerTiming
from scaling_model import (
    GIB, WAN14, Calibration, Check, Parallel, Prediction, Workload, exchange_timing_checks, predict,
)

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("ulysses4", "wan14b-sp4", "zero3-sp2dp2")
TRAIN_SPLITS = {"wan14b-sp4": (4, 1), "zero3-sp2dp2": (2, 2)}
"""The (SP, DP) each training part runs (e2e_train.py's presets wan14b-sp4 and wan14b-sp2dp2)."""
DEFAULT_LAYERS = 4
"""The presets' model.num_layers: the depth predicted while no measurement says otherwise."""
ULYSSES_POINTS = [(P, H) for P in (2, 4) for H in (12, 24)]
ULYSSES_L = 131072


def newest(part: str, results: Path = RESULTS) -> Path | None:
    """The newest results file of ``part`` for 4 GPUs (``*x4-<part>.json``), None when there is none."""
    found = sorted(results.glob(f"*x4-{part}.json"))
    return found[-1] if found else None


def _load(part: str, results: Path) -> tuple[dict, str] | None:
    path = newest(part, results)
    return (json.loads(path.read_text()), path.with_suffix(".md").name) if path else None


def ulysses_timings(data: dict, source: str) -> list[ExchangeTiming]:
    """The one-chunk fused Ulysses rows at P > 1 of a bench_sequence_parallel.py file, each with its run's P = 1
    row of the same heads and layout."""
    rows = [r for r in data["results"] if r["mode"] == "ulysses"]
    ones = {(r["heads"], r.get("layout", "bhld")): r for r in rows if r["P"] == 1}
    out = []
    for r in rows:
        key = (r["heads"], r.get("layout", "bhld"))
        if r["P"] > 1 and r.get("exchange") == "fused" and r.get("overlap_chunks", 1) == 1 and key in ones:
            one = ones[key]
            label = f"{source}, {key[1]}"
            out.append(ExchangeTiming("fused", r["P"], r["seq_len"], r["heads"], r["exchange_ms"], r["fwd_ms"],
                                      r["fwd_bwd_ms"], LayerTiming(r["seq_len"], r["heads"], 0.05, one["fwd_ms"],
                                                                   one["fwd_bwd_ms"], f"{label}, P 1"), label))
    return out


def train_workload(data: dict | None) -> Workload:
    """The 14B shape at the depth the run's overrides set (the presets' when there is no run)."""
    layers = DEFAULT_LAYERS
    if data is not None:
        meta = data["meta"]
        overrides = [*meta.get("preset", {}).get("overrides", ()), *meta.get("overrides", ())]
        found = [int(m.group(1)) for o in overrides if (m := re.fullmatch(r"model\.num_layers=(\d+)", o))]
        layers = found[-1] if found else None
    return Workload(WAN14.model, WAN14.latents, WAN14.topk, WAN14.text_len, layers)


def train_prediction(part: str, cal: Calibration, data: dict | None) -> tuple[Workload, Parallel, Prediction]:
    sp, dp = TRAIN_SPLITS[part]
    work, par = train_workload(data), Parallel(sp, dp, zero_stage=3, checkpoint=True)
    return work, par, predict(work, par, cal)


def _train_name(part: str, work: Workload, par: Parallel, what: str, source: str) -> str:
    return (f"14B train {what}, {work.config.num_layers} blocks, SP {par.sp} x DP {par.dp}, ZeRO-3, checkpointing, "
            f"topk {work.topk} ({source}, {part})")


def train_checks(part: str, cal: Calibration, data: dict, source: str) -> list[Check]:
    """Step time and nvidia-smi peak of the part's first training session, where it finished."""
    work, par, p = train_prediction(part, cal, data)
    phase = data["results"][0]
    out = []
    if phase.get("ok") and phase.get("step_s"):
        out.append(Check(_train_name(part, work, par, "step", source), phase["step_s"], p.step_s, "s", "check"))
    if phase.get("ok") and phase.get("peak_gib"):
        out.append(Check(_train_name(part, work, par, "peak, nvidia-smi memory.used", source),
                         max(phase["peak_gib"]), p.used_bytes / GIB, "GiB", "check"))
    return out


def checks(cal: Calibration, results: Path = RESULTS) -> list[Check]:
    """Every 4-GPU point with a measurement file: the model against it (none while the files are absent)."""
    out = []
    loaded = _load("ulysses4", results)
    if loaded:
        out += exchange_timing_checks(cal, ulysses_timings(*loaded), "check")
    for part in TRAIN_SPLITS:
        loaded = _load(part, results)
        if loaded:
            out += train_checks(part, cal, *loaded)
    return out


def _efficiencies(data: dict | None) -> dict[tuple[int, int, str], list[str]]:
    """Measured Ulysses efficiency per (P, H, layout): one entry per chunk count, '85 % (2 chunks)'."""
    out: dict[tuple[int, int, str], list[str]] = {}
    for r in (data or {}).get("results", []):
        if r["mode"] == "ulysses" and r["P"] > 1 and "efficiency" in r:
            key = (r["P"], r["heads"], r.get("layout", "bhld"))
            out.setdefault(key, []).append(f"{100 * r['efficiency']:.0f} % ({r.get('overlap_chunks', 1)})")
    return out


def section(cal: Calibration, results: Path = RESULTS) -> list[str]:
    """Markdown: the predictions at every point, the measurement beside each where its file exists."""
    ulysses = _load("ulysses4", results)
    lines = ["## Issue #16: the 4-GPU points", "",
             "Predicted by the model for exactly what gpu_suite.sh's 4-GPU parts run; measured from "
             + (", ".join(f"`{p.name}`" for p in filter(None, map(lambda part: newest(part, results), PARTS)))
                or "no file yet (the parts ulysses4, wan14b-sp4 and zero3-sp2dp2 have not been run)") + ".", "",
             "### Ulysses layer, L 131072, fused exchange (model: SLA on H / P heads + the exchange)", "",
             "| P | H | predicted fwd+bwd ms | predicted efficiency | measured efficiency, bhld (chunks) "
             "| measured efficiency, blhd (chunks) |", "|---|---|---|---|---|---|"]
    measured = _efficiencies(ulysses[0] if ulysses else None)
    ex = cal.exchanges["fused"]
    for P, H in ULYSSES_POINTS:
        t = cal.sla.ms(ULYSSES_L, H / P, 0.05, True) + 2e3 * ex.pass_s(ULYSSES_L, P, H * 128)
        eff = cal.sla.ms(ULYSSES_L, H, 0.05, True) / (P * t)
        cells = [", ".join(measured.get((P, H, layout), [])) or "-" for layout in ("bhld", "blhd")]
        lines.append(f"| {P} | {H} | {t:.1f} | {eff:.0%} | {cells[0]} | {cells[1]} |")
    lines += ["", "### wan2.1-14b shape, ZeRO-3, checkpointing (one sample per SP group)", "",
              "| part | blocks | SP x DP | predicted step s | measured step s | predicted GiB allocated / "
              "memory.used | measured memory.used GiB | full depth: predicted step s, GiB allocated / used |",
              "|---|---|---|---|---|---|---|---|"]
    for part in TRAIN_SPLITS:
        loaded = _load(part, results)
        data = loaded[0] if loaded else None
        work, par, p = train_prediction(part, cal, data)
        full = predict(WAN14, par, cal)
        phase = data["results"][0] if data else {}
        step = f"{phase['step_s']:.2f}" if phase.get("step_s") else "-"
        peak = f"{max(phase['peak_gib']):.1f}" if phase.get("peak_gib") else "-"
        lines.append(f"| {part} | {work.config.num_layers} | {par.sp} x {par.dp} | {p.step_s:.2f} | {step} | "
                     f"{p.memory_bytes / GIB:.1f} / {p.used_bytes / GIB:.1f} | {peak} | {full.step_s:.2f}, "
                     f"{full.memory_bytes / GIB:.1f} / {full.used_bytes / GIB:.1f} |")
    return lines + [""]
