"""benchmarks/e2e_train.py: the end-to-end flow on CPU (gloo, tiny recipe), and the checks it makes on a run."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import e2e_train as e2e  # noqa: E402

CPU = e2e.PRESETS["cpu"]
ROOT = BENCHMARKS.parent


@pytest.mark.slow
def test_cpu_flow_trains_resumes_and_exports(tmp_path):
    """SP = 1 and SP = 2 through launch/torchrun.sh, the SP = 2 run resumed by its rerun, sla-dist export loaded.

    Six training processes and one export start here, each importing Lightning (~15 CPU-s): about 130 CPU-s in all,
    70 s on two idle cores."""
    rc = e2e.main(["--cpu", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "result")])
    result = json.loads((tmp_path / "result.json").read_text())
    phases = {p["name"]: p for p in result["results"]}
    assert rc == 0, [(p["name"], p["rc"], p["problems"]) for p in result["results"]]
    assert list(phases) == ["sp1", "sp2", "resume", "export"] and all(p["ok"] for p in phases.values())
    end = CPU.steps
    assert phases["sp1"]["steps"] == phases["sp2"]["steps"] == [0, end]
    assert phases["resume"]["steps"] == [end, end + CPU.resume_steps]
    for name in ("sp1", "sp2"):  # the steady steps were read back from the run's own log
        assert phases[name]["step_s"] > 0 and phases[name]["tokens_per_s"] > 0 and phases[name]["topk"] == 0.25
    assert phases["export"]["note"].startswith("loaded: ") and "SLA in 2 layers" in phases["export"]["note"]
    assert os.readlink(tmp_path / "work" / "sp2" / "checkpoints" / "last.ckpt") == f"step{end + CPU.resume_steps}.ckpt"
    assert "| resume | 2 | 0 |" in (tmp_path / "result.md").read_text()


def _fake_run(out: Path, steps: list[int], summary: tuple[int, int], last: int) -> Path:
    """A run directory as the trainer leaves it: a CSV log holding ``steps`` in order, ``last.ckpt`` -> step{last}."""
    version = out / "logs" / "csv" / "version_0"
    version.mkdir(parents=True)
    keys = ["step", "train/loss", "train/step_time", "train/tokens_per_sec", "sla/topk"]
    with (version / "metrics.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, keys)
        writer.writeheader()
        for s in steps:
            writer.writerow({"step": s, "train/loss": 1.0, "train/step_time": 0.5 + s, "train/tokens_per_sec": 100,
                             "sla/topk": 0.05})
    (out / "checkpoints").mkdir()
    os.symlink(f"step{last}.ckpt", out / "checkpoints" / "last.ckpt")
    log = out.with_suffix(".log")
    log.write_text(f"== sla-dist train\n  steps       {summary[1]} / {summary[1]} "
                   f"(this session: {summary[0]} -> {summary[1]})\n")
    return log


def test_read_session_accepts_a_continued_run(tmp_path):
    log = _fake_run(tmp_path / "run", list(range(6)), (4, 6), last=6)
    phase = e2e.Phase("resume", 2)
    e2e.read_session(phase, tmp_path / "run", log, 4, 6, warmup=1, every=2)
    assert phase.problems == [] and phase.steps == (4, 6)


def test_read_session_takes_medians_of_the_steady_steps(tmp_path):
    log = _fake_run(tmp_path / "run", list(range(6)), (0, 6), last=6)
    phase = e2e.Phase("sp2", 2)
    e2e.read_session(phase, tmp_path / "run", log, 0, 6, warmup=1, every=2)
    # steps 1, 3, 5 saved a checkpoint, step 0 is the warm-up: steps 2 and 4 (step_time 0.5 + s) remain
    assert phase.problems == [] and phase.step_s == 3.5 and phase.tokens_per_s == 100 and phase.topk == 0.05


def test_read_session_flags_a_restart_from_step_0(tmp_path):
    # a resume that started over: the summary says 0 -> 6 and steps 0..3 are logged again after the first session's
    log = _fake_run(tmp_path / "run", [0, 1, 2, 3, 0, 1, 2, 3, 4, 5], (0, 6), last=6)
    phase = e2e.Phase("resume", 2)
    e2e.read_session(phase, tmp_path / "run", log, 4, 6, warmup=1, every=2)
    assert not phase.ok and len(phase.problems) == 2
    assert "ran steps (0, 6), not (4, 6)" in phase.problems[0] and "once each" in phase.problems[1]


def test_read_session_flags_a_missing_final_checkpoint(tmp_path):
    log = _fake_run(tmp_path / "run", list(range(4)), (0, 4), last=2)
    phase = e2e.Phase("sp1", 1)
    e2e.read_session(phase, tmp_path / "run", log, 0, 4, warmup=1, every=2)
    assert phase.problems == [f"{tmp_path / 'run' / 'checkpoints' / 'last.ckpt'} does not link to step4.ckpt"]


def _tiny_export(path: Path, layers: list[int]) -> dict:
    import torch

    from sla_dist import PatchConfig, SLAConfig, apply_sla, dit_config
    from sla_dist.files import save_safetensors
    from sla_dist.models import VideoDiT

    torch.manual_seed(0)
    model = VideoDiT(dit_config("tiny"))
    apply_sla(model, PatchConfig(sla=SLAConfig(topk=0.25, negligible=0.25), layers=layers))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, path)
    return state


def test_check_export_accepts_an_export_of_the_recipe_model(tmp_path):
    _tiny_export(tmp_path / "model.safetensors", layers=[0, 1])
    phase = e2e.Phase("export", 1)
    e2e.check_export(phase, tmp_path / "model.safetensors", ROOT / CPU.recipe)
    assert phase.problems == [] and "SLA in 2 layers" in phase.note


def test_check_export_flags_nan_pickles_and_another_model(tmp_path):
    import torch

    from sla_dist.files import save_safetensors

    state = _tiny_export(tmp_path / "model.safetensors", layers=[0, 1])
    name = next(iter(state))
    state[name][0] = float("nan")
    save_safetensors(state, tmp_path / "nan.safetensors")
    torch.save(state, tmp_path / "pickled.pt")
    _tiny_export(tmp_path / "dense.safetensors", layers=[])
    found = {}
    for file in ("nan.safetensors", "pickled.pt", "dense.safetensors"):
        phase = e2e.Phase("export", 1)
        e2e.check_export(phase, tmp_path / file, ROOT / CPU.recipe)
        found[file] = phase.problems
    assert found["nan.safetensors"] == [f"non-finite values in [{name!r}]"]
    assert found["pickled.pt"] == [f"{tmp_path / 'pickled.pt'} is not a safetensors file"]
    assert found["dense.safetensors"] == ["the export has no SLA layer (no proj_l)"]


def test_steady_steps_leave_out_warmup_and_checkpoint_steps():
    gpu = e2e.PRESETS["gpu"]
    # rows 5 and 11 are the 6th and 12th steps, whose ends save step6.ckpt / step12.ckpt
    assert e2e.steady_steps(0, 12, gpu.warmup, gpu.every) == [3, 4, 6, 7, 8, 9, 10]
    assert e2e.steady_steps(12, 18, gpu.warmup, gpu.every) == [15, 16]
    rows = {s: {"train/step_time": str(s)} for s in range(12)}
    assert e2e._median(rows, e2e.steady_steps(0, 12, gpu.warmup, gpu.every), "train/step_time") == 7.0


def test_parse_smi_line():
    assert e2e.parse_smi_line("1, 81234\n") == (1, 81234.0)
    for line in ("No devices were found", "0, [N/A]", "", "index, memory.used"):
        assert e2e.parse_smi_line(line) is None, line


def test_run_limited_kills_the_whole_process_group_at_its_limit(tmp_path):
    pid_file = tmp_path / "child.pid"
    start = time.perf_counter()
    rc, _ = e2e.run_limited(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], tmp_path / "log", 2,
                            dict(os.environ))
    assert rc == e2e.TIMED_OUT and time.perf_counter() - start < 30
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the launcher's child outlived the time limit"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie has exited


def test_phase_limits_fit_the_suite_part():
    # gpu_suite.sh runs the part as e2e:500 inside a 600 s device call that first installs the wheels
    assert sum(e2e.PRESETS["gpu"].limits.values()) <= 470


def _args(*argv: str) -> e2e.Preset:
    return e2e.parse(list(argv))[1]


def test_default_presets_keep_their_runs(tmp_path):
    """The 2-GPU run and the CPU test run what they ran before the presets had sizes: SP 1 saving at its end, SP 2
    every ``every`` steps and resumed."""
    for preset in (e2e.PRESETS["gpu"], CPU):
        runs = e2e.plan(preset, tmp_path, ("x=1",))
        assert [(r.name, r.procs, r.first, r.end, r.every) for r in runs] == [
            ("sp1", 1, 0, preset.steps, preset.steps), ("sp2", 2, 0, preset.steps, preset.every),
            ("resume", 2, preset.steps, preset.steps + preset.resume_steps, preset.every)]
        assert runs[1].overrides == ("parallel.sp_size=2", *preset.overrides, "x=1")
        assert runs[2].output_dir == runs[1].output_dir == tmp_path / "sp2"
        assert preset.phases == ["sp1", "sp2", "resume", "export"]


def test_four_gpu_presets(tmp_path):
    sp4 = e2e.PRESETS["wan14b-sp4"]
    runs = e2e.plan(sp4, tmp_path)
    assert [(r.name, r.procs, r.first, r.end, r.every) for r in runs] == [("sp4", 4, 0, 6, 3), ("resume", 4, 6, 9, 3)]
    assert "model.num_layers=4" in runs[0].overrides and sp4.phases == ["sp4", "resume", "export"]
    # at least one timed step in each session: not the warm-up, not a checkpoint step
    assert e2e.steady_steps(0, 6, sp4.warmup, 3) == [1, 3, 4] and e2e.steady_steps(6, 9, sp4.warmup, 3) == [7]
    dp = e2e.PRESETS["wan14b-sp2dp2"]
    runs = e2e.plan(dp, tmp_path)
    assert [(r.name, r.procs, r.end) for r in runs] == [("sp2dp2", 4, 4)] and dp.phases == ["sp2dp2"]
    assert runs[0].overrides[0] == "parallel.sp_size=2" and e2e.steady_steps(0, 4, dp.warmup, dp.every) == [1, 2]
    # gpu_suite.sh gives the parts 520 and 280 s: the phases end before the part's limit kills the script
    assert sum(sp4.limits.values()) <= 460 and sum(dp.limits.values()) <= 240


def test_sizes_dp_and_limits_from_the_command_line():
    preset = _args("--cpu", "--sizes", "2", "--dp", "2", "--limit", "sp2dp2=90", "--limit", "resume=50")
    assert (preset.sizes, preset.dp, preset.recipe) == ((2,), 2, CPU.recipe)
    assert preset.phases == ["sp2dp2", "resume", "export"]
    assert preset.limits == {**CPU.limits, "sp2dp2": 90.0, "resume": 50.0}
    assert _args("--preset", "wan14b-sp4") == e2e.PRESETS["wan14b-sp4"]


@pytest.mark.parametrize("argv, message", [
    (["--cpu", "--sizes", "4"], r"no time limit for phase\(s\) \['sp4'\]"),
    (["--cpu", "--sizes", "2", "2"], r"sizes=\(2, 2\)"),
    (["--cpu", "--dp", "0"], r"dp=0"),
    (["--cpu", "--limit", "sp1"], r"--limit 'sp1' is not NAME=SECONDS"),
    (["--cpu", "--limit", "sp1=-3"], r"--limit 'sp1=-3' is not NAME=SECONDS"),
])
def test_bad_options_name_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        e2e.parse(argv)
    assert re.search(message, capsys.readouterr().err)


def test_table_compares_each_size_with_the_smallest():
    one, four = e2e.Phase("sp1", 1, rc=0, tokens_per_s=100.0), e2e.Phase("sp4", 4, rc=0, tokens_per_s=300.0)
    assert "SP = 4 tokens/s over 4 x SP = 1: 75%" in e2e.table([one, four, e2e.Phase("resume", 4)], (1, 4))
    assert "tokens/s over" not in e2e.table([four, e2e.Phase("resume", 4)], (4,))


def _fake_phases(monkeypatch, failing: set[str]) -> list[tuple]:
    """Replace the launched phases by records; the phases named in ``failing`` fail."""
    calls = []

    def train(run, recipe, preset, env, gpus, logs):
        calls.append(("train", run.name, run.procs, run.first, run.end))
        return e2e.Phase(run.name, run.procs, rc=1 if run.name in failing else 0, steps=(run.first, run.end))

    def export(run_dir, preset, env, logs):
        calls.append(("export", run_dir.name))
        return e2e.Phase("export", 1, rc=0)

    monkeypatch.setattr(e2e, "train_phase", train)
    monkeypatch.setattr(e2e, "export_phase", export)
    return calls


def test_runs_go_in_order_and_export_follows_the_resume(tmp_path, monkeypatch):
    calls = _fake_phases(monkeypatch, failing=set())
    assert e2e.main(["--preset", "wan14b-sp4", "--workdir", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    assert calls == [("train", "sp4", 4, 0, 6), ("train", "resume", 4, 6, 9), ("export", "sp4")]
    meta = json.loads((tmp_path / "r.json").read_text())["meta"]
    assert meta["gpus"] == 4 and meta["preset"]["sizes"] == [4]
    assert "SP = 4, 6 steps (SP = 4: checkpoint every 3), resumed for 3 more at SP = 4, then `sla-dist export`" in (
        tmp_path / "r.md").read_text()


def test_a_failed_resume_still_exports_the_first_runs_checkpoint(tmp_path, monkeypatch):
    """One device call tests as much as it can: the export of the step-6 checkpoint the resume started from."""
    calls = _fake_phases(monkeypatch, failing={"resume"})
    assert e2e.main(["--preset", "wan14b-sp4", "--workdir", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    assert calls[-1] == ("export", "sp4")
    export = json.loads((tmp_path / "r.json").read_text())["results"][-1]
    assert export["ok"] and "exported sp4's step6.ckpt: resume failed" in export["note"]


def test_a_failed_first_run_skips_the_rest(tmp_path, monkeypatch):
    calls = _fake_phases(monkeypatch, failing={"sp2dp2"})
    assert e2e.main(["--cpu", "--sizes", "2", "--dp", "2", "--limit", "sp2dp2=9", "--workdir", str(tmp_path),
                     "--out", str(tmp_path / "r")]) == 1
    assert calls == [("train", "sp2dp2", 4, 0, CPU.steps)]
    problems = [p["problems"] for p in json.loads((tmp_path / "r.json").read_text())["results"]]
    assert problems == [[], ["skipped: the sp2dp2 run failed"], ["skipped: the sp2dp2 run failed"]]


@pytest.mark.slow
def test_cpu_flow_zero3_resume(tmp_path):
    """wan14b-sp4's ZeRO-3 save, resume and export on one CPU process (the tiny recipe). Failed before SLAStrategy
    registered VideoDiT.parameters_read_outside_forward: DeepSpeed's 'tracing error at step 55: expected the next 1
    parameters in the parameter fetch queue to be (model.head_modulation) but got ()' in the second step after the
    restore (deepspeedai/DeepSpeed#3599)."""
    rc = e2e.main(["--cpu", "--sizes", "1", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "result"),
                   "parallel.zero_stage=3"])
    result = json.loads((tmp_path / "result.json").read_text())
    assert rc == 0, [(p["name"], p["rc"], p["problems"]) for p in result["results"]]
