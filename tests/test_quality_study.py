"""benchmarks/quality: the SLA quality study's smoke runs on CPU (the tiny preset through the CLI; the gpu preset's
code path, budget plan and split phases at tiny sizes), its step planner, checkpoint shards, attention-error hooks
and verdict."""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
import time
from pathlib import Path

import pytest
import torch

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import quality_study as qs  # noqa: E402
import study_budget as sb  # noqa: E402
import study_checkpoint as sc  # noqa: E402
from study_attention import candidate_errors, own_errors, relative_l2  # noqa: E402
from study_report import verdict  # noqa: E402

from sla_dist import SparseLinearAttention  # noqa: E402
from sla_dist.models import VideoDiT, dit_config  # noqa: E402

# The gpu preset with the tiny preset's sizes and step caps: everything else (budget plan, render workers, warm-up,
# evaluation counts) as the device run has it.
SIZES = ("model", "model_overrides", "frames", "size", "train_samples", "val_samples", "fvd_videos",
         "reference_videos", "batch_size", "pretrain_steps", "finetune_steps", "eval_every", "draws", "sample_steps",
         "attention_samples")
GPU_AT_TINY = dataclasses.replace(qs.PRESETS["gpu"], **{k: getattr(qs.PRESETS["tiny"], k) for k in SIZES},
                                  warmup_steps=1, render_workers=2)
OUTPUTS = ("quality-study.md", "quality-study.json", "quality-study.png")


@pytest.fixture(autouse=True)
def _fixed_kernel_settings(monkeypatch):
    # main() sets SLA_DIST_AUTOTUNE=0 unless --autotune; keep that out of the other tests' environment
    monkeypatch.setenv("SLA_DIST_AUTOTUNE", "0")


def test_tiny_preset_cli(tmp_path, capsys):
    assert qs.main(["--preset", "tiny", "--cpu", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "quality-study.json").read_text())
    assert results["status"] == "complete"
    assert list(results["variants"]) == ["dense_seed0", "sla", "dense_seed1", "sparse_only", "linear_only"]
    for r in results["variants"].values():
        assert [step for step, _ in r["val_curve"]] == [0, 1, 2] and r["fvd_random"] >= 0
    before = results["attention_before"]
    # proj_l starts at zero: a fresh SLA layer is its sparse branch alone
    assert before["sla"]["error"] == pytest.approx(before["sparse_only"]["error"])
    assert all(len(r["error"]) == 2 for r in before.values())
    assert set(results["verdict"]) >= {"loss_within_1pct", "fvd_within_dense_spread", "goal_met"}
    assert all((tmp_path / name).is_file() for name in OUTPUTS)
    assert "## Verdict" in (tmp_path / "quality-study.md").read_text()
    log = capsys.readouterr().out
    assert "] sla: step 2/2" in log and "+" in log.split("]")[0]  # timestamped progress


def test_gpu_preset_path_split_phases_at_tiny_size(tmp_path):
    """The gpu preset's code (probe, budget plan, worker rendering) in two calls: pretrain, then fine-tune from the
    shards it wrote, as two device calls would."""
    config = GPU_AT_TINY
    assert config.time_budget == 450 and config.render_workers > 0
    pre = qs.run(config, torch.device("cpu"), tmp_path / "pre", phase="pretrain", started=time.monotonic())
    assert pre["status"] == "pretrained" and pre["variants"] == {}
    assert set(pre["step_times"]) == {"dense"} and pre["schedule"]["predicted_s"]
    assert pre["schedule"]["pretrain_steps"] == config.pretrain_steps  # caps fit the budget
    shards = sorted((tmp_path / "pre").glob("pretrained-*-of-*.pt"))
    assert [p.name for p in shards] == ["pretrained-0-of-1.pt"]

    fine = qs.run(config, torch.device("cpu"), tmp_path / "fine", phase="finetune", resume_from=tmp_path / "pre",
                  started=time.monotonic())
    assert fine["status"] == "complete" and len(fine["variants"]) == 5
    assert set(fine["step_times"]) == set(qs.VARIANTS)
    assert fine["pretrain"]["val_curve"] == pre["pretrain"]["val_curve"]
    assert fine["schedule"]["pretrain_steps"] == config.pretrain_steps
    assert all(len(fine["variants"][n]["attention_after"]) == 2 for n in ("sla", "sparse_only", "linear_only"))
    assert all((tmp_path / "fine" / name).is_file() for name in OUTPUTS)
    # the fine-tunes start from the saved bf16 weights: the dense start equals the pretrain's last evaluation of
    # those weights up to the rounding
    start = fine["variants"]["dense_seed0"]["val_curve"][0][1]
    assert start == pytest.approx(pre["pretrain"]["val_curve"][-1][1], rel=1e-2)


def test_resume_refuses_another_study(tmp_path):
    state = VideoDiT(dit_config("tiny")).state_dict()
    config = qs.PRESETS["tiny"]
    sc.save_pretrained(tmp_path, state, {"config": dataclasses.asdict(config),
                                         "model": dataclasses.asdict(dit_config("tiny")), "pretrain": {"steps": 1}})
    other = dataclasses.replace(config, frames=8)
    with pytest.raises(ValueError, match=r"frames: checkpoint 4, this run 8"):
        qs.run(other, torch.device("cpu"), tmp_path / "out", phase="finetune", resume_from=tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--phase", "finetune"], "--phase finetune needs --resume-from"),
    (["--resume-from", "x"], "--resume-from is for --phase finetune"),
    (["--sparsity", "1.5"], "sparsity=1.5 must lie in"),
    (["--time-budget", "-3"], "time_budget=-3.0 must be positive"),
    (["--baselines", "sparse_only", "sparse_only"], "choose distinct entries"),
    (["--baselines", "dense"], "invalid choice: 'dense'"),
])
def test_cli_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        qs.main(["--preset", "tiny", "--cpu", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_follow_up_run_picks_its_fine_tunes():
    config = dataclasses.replace(qs.PRESETS["tiny"], dense_seeds=[3], baselines=["sparse_only"])
    assert qs.fine_tune_runs(config) == [("dense_seed3", "dense", 3), ("sla", "sla", 0),
                                         ("sparse_only", "sparse_only", 0)]
    assert [n for n, _, _ in qs.fine_tune_runs(qs.PRESETS["tiny"])] == ["dense_seed0", "sla", "dense_seed1",
                                                                        "sparse_only", "linear_only"]


WORK = sb.Workload(pretrain_steps=1600, finetune_steps=400, pretrain_evals=4, eval_every=100, fvd_videos=64,
                   sample_steps=12, batch_size=8)
TIMES = {"dense": sb.StepTimes(0.15, 0.05, 1.2), "sla": sb.StepTimes(0.11, 0.04, 1.1),
         "sparse_only": sb.StepTimes(0.10, 0.035, 1.0), "linear_only": sb.StepTimes(0.085, 0.03, 1.0)}
RUNS = ["dense", "sla", "dense", "sparse_only", "linear_only"]


def predicted_total(s: sb.Schedule) -> float:
    return sum(s.predicted_s.values())


def test_plan_keeps_the_caps_when_they_fit():
    s = sb.plan_steps(WORK, TIMES, RUNS, 10_000, pretrain=True, finetune=True)
    assert (s.pretrain_steps, s.finetune_steps, s.finetune_eval_every, s.scaled) == (1600, 400, 100, False)


def test_plan_shrinks_both_phases_in_ratio_to_fit():
    s = sb.plan_steps(WORK, TIMES, RUNS, 400, pretrain=True, finetune=True)
    assert s.scaled and 0 < s.finetune_steps < 400
    assert s.pretrain_steps == round(4 * s.finetune_steps)
    assert predicted_total(s) <= 400 * (1 - sb.MARGIN)
    # one more fine-tune step (and its pretrain share) would not fit
    per_step = 4 * TIMES["dense"].train + sum(TIMES[v].train for v in RUNS)
    assert predicted_total(s) + per_step > 400 * (1 - sb.MARGIN)
    # as many evaluation points as the preset: 400 / 100 -> 4 intervals
    assert s.finetune_eval_every == -(-s.finetune_steps // 4)


def test_plan_keeps_fixed_steps_and_shrinks_the_other():
    s = sb.plan_steps(WORK, TIMES, RUNS, 400, pretrain=True, finetune=True, fixed=frozenset({"finetune_steps"}))
    assert s.finetune_steps == 400 and s.pretrain_steps < 1600
    assert predicted_total(s) <= 400 * (1 - sb.MARGIN)


def test_plan_single_phases():
    pre = sb.plan_steps(WORK, {"dense": TIMES["dense"]}, RUNS, 120, pretrain=True, finetune=False)
    assert 0 < pre.pretrain_steps < 1600 and "finetune" not in pre.predicted_s
    fine = sb.plan_steps(WORK, {k: v for k, v in TIMES.items()}, RUNS, 200, pretrain=False, finetune=True)
    assert 0 < fine.finetune_steps < 400 and "pretrain" not in fine.predicted_s


def test_plan_refuses_a_budget_without_room_for_one_step():
    with pytest.raises(ValueError, match=r"leaves 20 s, but one step of each phase with its evaluations needs about "
                                         r"\d+ s"):
        sb.plan_steps(WORK, TIMES, RUNS, 20, pretrain=True, finetune=True)
    with pytest.raises(ValueError, match=r"no measured step times for \['linear_only'\]"):
        sb.plan_steps(WORK, {k: v for k, v in TIMES.items() if k != "linear_only"}, RUNS, 400, pretrain=True,
                      finetune=True)


def test_checkpoint_shards_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(sc, "SHARD_BYTES", 60_000)  # above the largest tensor of the tiny DiT (49 kB in bf16)
    state = VideoDiT(dit_config("tiny")).state_dict()
    paths = sc.save_pretrained(tmp_path, state, {"pretrain": {"steps": 3}})
    assert len(paths) > 2 and all(p.stat().st_size < 60_000 + 20_000 for p in paths)  # + pickle framing
    loaded, meta = sc.load_pretrained(tmp_path)
    assert meta == {"pretrain": {"steps": 3}} and loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16).float()), name
    # a second save replaces the first set
    sc.save_pretrained(tmp_path, {"w": torch.ones(3)}, {})
    assert [p.name for p in tmp_path.glob("pretrained-*")] == ["pretrained-0-of-1.pt"]


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_load_refuses_missing_foreign_and_code(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        sc.load_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="found sets of n = none"):
        sc.load_pretrained(tmp_path)
    sc.save_pretrained(tmp_path, {"w": torch.ones(3)}, {})
    (tmp_path / "pretrained-0-of-1.pt").rename(tmp_path / "pretrained-1-of-2.pt")
    with pytest.raises(ValueError, match=r"lacks shards \[0\] of pretrained-\*-of-2.pt"):
        sc.load_pretrained(tmp_path)
    torch.save({"state": {}}, tmp_path / "pretrained-0-of-2.pt")
    with pytest.raises(ValueError, match="is not shard 0 of a quality-study checkpoint"):
        sc.load_pretrained(tmp_path)
    torch.save({"format": sc.FORMAT, "shard": 0, "shards": 2, "meta": _Payload(), "state": {}},
               tmp_path / "pretrained-0-of-2.pt")
    with pytest.raises(pickle.UnpicklingError):
        sc.load_pretrained(tmp_path)


def test_attention_errors_come_from_the_sites_inputs():
    torch.manual_seed(0)
    config = dataclasses.replace(qs.PRESETS["tiny"], sparsity=0.75)
    dit = dit_config("tiny")
    model = VideoDiT(dit)
    latents, text = torch.randn(2, 4, 4, 16, 16), torch.randn(2, 16, dit.text_dim)
    found = candidate_errors(model, latents, text, {
        "full": lambda device: SparseLinearAttention(dit.head_dim, topk=1.0, negligible=0.0),
        "sparse_only": lambda device: qs.fresh_core("sparse_only", dit.head_dim, config, device)})
    # SLA with every block critical is full attention; one of four blocks is not
    assert max(found["full"]["error"]) < 1e-5 and found["full"]["sparsity"] == [0.0, 0.0]
    assert min(found["sparse_only"]["error"]) > 1e-3 and found["sparse_only"]["sparsity"] == [0.75, 0.75]
    assert max(own_errors(model, latents, text)) < 1e-5  # the dense model's own sites are full attention
    # layer 0 sees the same q, k, v in the dense and the converted model: the two measurements agree there
    converted = VideoDiT(dit)
    converted.load_state_dict(model.state_dict())
    qs.convert(converted, "sparse_only", config)
    assert own_errors(converted, latents, text)[0] == pytest.approx(found["sparse_only"]["error"][0], rel=1e-5)
    assert relative_l2(torch.ones(4), torch.ones(4)) == 0.0


def _run(variant, seed, end, fvd):
    return {"variant": variant, "seed": seed, "val_curve": [[0, 1.0], [10, end]], "fvd_random": fvd}


def test_verdict_against_the_goal():
    runs = {"dense_seed0": _run("dense", 0, 0.100, 1.0), "sla": _run("sla", 0, 0.1009, 1.05),
            "dense_seed1": _run("dense", 1, 0.101, 1.1), "sparse_only": _run("sparse_only", 0, 0.110, 2.0),
            "linear_only": _run("linear_only", 0, 0.120, 3.0)}
    v = verdict({"variants": runs})
    assert v["loss_within_1pct"] and v["fvd_within_dense_spread"] and v["sparse_only_worse"]
    assert v["linear_only_worse"] and v["goal_met"]
    assert v["sla_loss_gap"] == pytest.approx(0.1009 / 0.1005 - 1)
    runs["sla"] = _run("sla", 0, 0.1095, 1.2)
    v = verdict({"variants": runs})
    assert not v["loss_within_1pct"] and not v["fvd_within_dense_spread"] and v["goal_met"] is False
    assert v["sparse_only_worse"] is False  # 0.0005 above SLA, inside the dense seeds' 0.001 spread
    partial = verdict({"variants": {"dense_seed0": runs["dense_seed0"], "sla": runs["sla"]}})
    assert partial["goal_met"] is None and partial["fvd_within_dense_spread"] is None
