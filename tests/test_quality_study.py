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
    """The gpu preset's code (probe, budget plan, worker rendering, compact checkpoint) in three calls: pretrain,
    pretrain on from its shards, then fine-tune from the shards of the second, as three device calls would."""
    config = GPU_AT_TINY
    assert config.time_budget == 450 and config.render_workers > 0
    pre = qs.run(config, torch.device("cpu"), tmp_path / "pre", phase="pretrain", started=time.monotonic())
    assert pre["status"] == "pretrained" and pre["variants"] == {}
    assert set(pre["step_times"]) == {"dense"} and pre["schedule"]["predicted_s"]
    assert pre["schedule"]["pretrain_steps"] == config.pretrain_steps  # caps fit the budget
    shards = sorted((tmp_path / "pre").glob("pretrained-*-of-*.pt"))
    assert [p.name for p in shards] == ["pretrained-0-of-1.pt"]

    # a second pretrain call continues the first: planned from the budget too, the compact checkpoint's optimizer
    # state loaded
    more = qs.run(config, torch.device("cpu"), tmp_path / "more", phase="pretrain", resume_from=tmp_path / "pre",
                  started=time.monotonic())
    assert more["status"] == "pretrained" and more["schedule"]["predicted_s"]
    steps = config.pretrain_steps
    assert more["schedule"]["pretrain_steps"] == steps and more["pretrain"]["steps"] == 2 * steps
    assert [(c["start"], c["steps"]) for c in more["pretrain"]["calls"]] == [(0, steps), (steps, steps)]
    assert more["pretrain"]["val_curve"][:len(pre["pretrain"]["val_curve"])] == pre["pretrain"]["val_curve"]
    assert sc.load_pretrained(tmp_path / "more").meta["optimizer_step"] == 2 * steps

    fine = qs.run(config, torch.device("cpu"), tmp_path / "fine", phase="finetune", resume_from=tmp_path / "more",
                  started=time.monotonic())
    assert fine["status"] == "complete" and len(fine["variants"]) == 5
    assert set(fine["step_times"]) == set(qs.VARIANTS)
    assert fine["pretrain"] == more["pretrain"]
    assert fine["schedule"]["pretrain_steps"] == 2 * steps
    assert f"dense pretrain {2 * steps} AdamW steps" in (tmp_path / "fine" / "quality-study.md").read_text()
    assert all(len(fine["variants"][n]["attention_after"]) == 2 for n in ("sla", "sparse_only", "linear_only"))
    assert all((tmp_path / "fine" / name).is_file() for name in OUTPUTS)
    # the fine-tunes start from the saved bf16 weights: the dense start equals the pretrain's last evaluation of
    # those weights up to the rounding
    start = fine["variants"]["dense_seed0"]["val_curve"][0][1]
    assert start == pytest.approx(more["pretrain"]["val_curve"][-1][1], rel=1e-2)


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
    (["--resume-from", "x"], "--resume-from is for --phase pretrain or finetune, not --phase all"),
    (["--proj-lr-scale", "0"], "proj_lr_scale=0.0 must be a positive finite number"),
    (["--proj-lr-scale", "-2"], "proj_lr_scale=-2.0 must be a positive finite number"),
    (["--proj-lr-scale", "nan"], "proj_lr_scale=nan must be a positive finite number"),
    (["--proj-lr-scale", "inf"], "proj_lr_scale=inf must be a positive finite number"),
    (["--sparsity", "1.5"], "sparsity=1.5 must lie in"),
    (["--time-budget", "-3"], "time_budget=-3.0 must be positive"),
    (["--baselines", "sparse_only", "sparse_only"], "choose distinct entries"),
    (["--baselines", "dense"], "invalid choice: 'dense'"),
    (["--scene", "foggy"], "invalid choice: 'foggy'"),
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
    loaded = sc.load_pretrained(tmp_path)
    assert loaded.meta == {"pretrain": {"steps": 3}} and loaded.state.keys() == state.keys()
    assert loaded.optimizer == {}
    for name, tensor in state.items():
        assert loaded.state[name].dtype == torch.float32
        assert torch.equal(loaded.state[name], tensor.to(torch.bfloat16).float()), name
    # exact: float32 weights and both moments as they were
    moments = {name: (torch.randn_like(t), torch.rand_like(t)) for name, t in state.items()}
    sc.save_pretrained(tmp_path, state, {}, moments, encoding="exact")
    loaded = sc.load_pretrained(tmp_path)
    assert all(torch.equal(loaded.state[n], t) for n, t in state.items())
    assert loaded.optimizer.keys() == moments.keys()
    assert all(torch.equal(loaded.optimizer[n][i], moments[n][i]) for n in moments for i in (0, 1))
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


def _pretrain_cli(out: Path, steps: int, *resume: str) -> dict:
    assert qs.main(["--preset", "tiny", "--cpu", "--phase", "pretrain", "--pretrain-steps", str(steps),
                    "--out", str(out), *resume]) == 0
    return json.loads((out / "quality-study.json").read_text())


def test_resumed_pretrain_equals_one_run(tmp_path):
    """2 pretrain steps, then 2 more resumed from the shards, end where 4 steps in one go end: the tiny preset keeps
    float32 weights and both AdamW moments, and the data, noise and warm-up are keyed by the global step, so on
    one CPU process the two runs do the same arithmetic and agree bit for bit."""
    config = qs.PRESETS["tiny"]
    assert config.checkpoint == "exact"
    whole = _pretrain_cli(tmp_path / "whole", 4)
    _pretrain_cli(tmp_path / "first", 2)
    split = _pretrain_cli(tmp_path / "second", 2, "--resume-from", str(tmp_path / "first"))
    p = split["pretrain"]
    assert p["steps"] == 4 and [(c["start"], c["steps"]) for c in p["calls"]] == [(0, 2), (2, 2)]
    assert [s for s, _ in p["val_curve"]] == [0, 2, 2, 4]
    assert p["val_curve"][0] == whole["pretrain"]["val_curve"][0]
    assert p["val_curve"][-1] == whole["pretrain"]["val_curve"][-1]
    assert p["val_curve"][1][1] == p["val_curve"][2][1]  # exact weights: the resumed start is where call 1 ended
    one, two = sc.load_pretrained(tmp_path / "whole"), sc.load_pretrained(tmp_path / "second")
    assert one.meta["optimizer_step"] == two.meta["optimizer_step"] == 4
    for name, tensor in one.state.items():
        assert torch.equal(two.state[name], tensor), name
    assert one.optimizer.keys() == two.optimizer.keys() and one.optimizer
    for name, (avg, avg_sq) in one.optimizer.items():
        assert torch.equal(two.optimizer[name][0], avg) and torch.equal(two.optimizer[name][1], avg_sq), name
    report = (tmp_path / "second" / "quality-study.md").read_text()
    assert "Pretraining (4 steps in 2 calls: steps 0-2" in report and "| resumed 2:" in report


def test_resumed_pretrain_refuses_a_foreign_or_weights_only_checkpoint(tmp_path):
    _pretrain_cli(tmp_path / "first", 1)
    with pytest.raises(ValueError, match=r"pretrain_lr: checkpoint 0.0003, this run 0.001"):
        qs.run(dataclasses.replace(qs.PRESETS["tiny"], pretrain_lr=1e-3), torch.device("cpu"), tmp_path / "out",
               phase="pretrain", resume_from=tmp_path / "first")
    with pytest.raises(ValueError, match=r"model.num_layers: checkpoint 2, this run 3"):
        qs.run(dataclasses.replace(qs.PRESETS["tiny"], model_overrides={"num_layers": 3}), torch.device("cpu"),
               tmp_path / "out", phase="pretrain", resume_from=tmp_path / "first")
    # weights without optimizer state (a checkpoint written before resumable pretraining) still fine-tune, but
    # cannot continue pretraining
    state = VideoDiT(dit_config("tiny")).state_dict()
    meta = {"config": dataclasses.asdict(qs.PRESETS["tiny"]), "model": dataclasses.asdict(dit_config("tiny")),
            "pretrain": {"steps": 1}}
    sc.save_pretrained(tmp_path / "old", state, meta)
    with pytest.raises(ValueError, match=r"holds no optimizer state"):
        qs.run(qs.PRESETS["tiny"], torch.device("cpu"), tmp_path / "out", phase="pretrain",
               resume_from=tmp_path / "old")


def test_compact_optimizer_state():
    """The gpu preset's encoding: weights in bf16, sqrt of AdamW's second moment in float8 e4m3 with a float32
    scale per row (6.25 % relative rounding at most in the normal range, tiny values rounded up, never to 0), the
    first moment not stored (a resumed pretrain rebuilds it)."""
    torch.manual_seed(0)
    avg_sq = torch.rand(6, 40) ** 12 * 1e-4  # spans many decades
    avg_sq[0, 0] = 0.0
    avg_sq[1, :] = 0.0  # a row that never saw a gradient
    stored = sc.encode_optimizer({"w": (torch.randn(6, 40), avg_sq)}, "compact")
    assert all(t.dtype in (torch.float8_e4m3fn, torch.float32) for t in stored.values())
    (avg, back), = sc.decode_optimizer(stored).values()
    assert avg is None and back.shape == avg_sq.shape
    root, root_back = avg_sq.sqrt(), back.sqrt()
    step = root.amax(1, keepdim=True) / 448  # one unit of the row's float8 scale
    normal = root >= step * 2**-6
    assert normal.sum() > 100 and (root < step * 2**-9)[2:].sum() > 5  # both ranges are exercised
    assert torch.all((root_back[normal] - root[normal]).abs() <= root[normal] / 16)
    below = (root < step * 2**-9) & (step > 0)
    assert torch.allclose(root_back[below], step.expand_as(root)[below] * 2**-9)  # rounded up, not to 0
    assert torch.all(back[[0, 2, 3, 4, 5]] > 0) and torch.equal(back[1], torch.zeros(40))
    exact = sc.decode_optimizer(sc.encode_optimizer({"w": (torch.ones(3), avg_sq[2, :3])}, "exact"))["w"]
    assert torch.equal(exact[0], torch.ones(3)) and torch.equal(exact[1], avg_sq[2, :3])


def test_gpu_preset_checkpoint_fits_a_device_transfer():
    """A device call returns at most 8 files of 16 MiB, 64 MiB together (3 of them the report), and carries at
    most 64 MiB of working tree: the gpu preset's resumable checkpoint must fit in 5 shards and ~60 MiB."""
    config = qs.PRESETS["gpu"]
    assert config.checkpoint == "compact"
    model = VideoDiT(dit_config(config.model, **config.model_overrides))
    params = dict(model.named_parameters())
    tensors = sc.encoded(model.state_dict(), {n: (p, p.detach().abs() + 1e-3) for n, p in params.items()},
                         config.checkpoint)
    shards = sc.plan_shards(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(shards) <= 5 and total < 60 * 2**20, (len(shards), total / 2**20)


def test_projection_lr_scale_is_a_param_group():
    config = dataclasses.replace(qs.PRESETS["tiny"], proj_lr_scale=20.0)
    dit = dit_config("tiny")
    for variant, suffix in (("sla", ".proj_l."), ("linear_only", ".core.proj.")):
        module = qs.module_for(dit, variant, 0, None, config.finetune_lr, config, torch.device("cpu"))
        trainer = qs.Trainer(module, None, config.finetune_lr, 0, config, proj_lr_scale=config.proj_lr_scale)
        names = {p: n for n, p in module.model.named_parameters()}
        base, proj = trainer.opt.param_groups
        assert base["lr"] == config.finetune_lr and proj["lr"] == pytest.approx(20 * config.finetune_lr)
        assert proj["params"] and all(suffix in names[p] for p in proj["params"])
        assert not any(suffix in names[p] for p in base["params"])
        assert len(base["params"]) + len(proj["params"]) == sum(1 for _ in module.model.parameters())
    dense = qs.Trainer(qs.module_for(dit, "dense", 0, None, 1e-4, config, torch.device("cpu")), None, 1e-4, 0,
                       config, proj_lr_scale=20.0)
    assert len(dense.opt.param_groups) == 1  # nothing to scale


def test_projection_lr_scale_is_recorded(tmp_path):
    config = dataclasses.replace(qs.PRESETS["tiny"], proj_lr_scale=10.0, dense_seeds=[0], baselines=[])
    results = qs.run(config, torch.device("cpu"), tmp_path, phase="all")
    assert results["config"]["proj_lr_scale"] == 10.0
    assert json.loads((tmp_path / "quality-study.json").read_text())["config"]["proj_lr_scale"] == 10.0
    assert "proj_l / linear-only projection lr 0.001 (x10)" in (tmp_path / "quality-study.md").read_text()


def test_help_shows_the_multi_call_workflow(capsys):
    with pytest.raises(SystemExit) as exc:
        qs.main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the options' help to the terminal
    assert "--phase pretrain --resume-from .quality-ckpt" in out and "--phase finetune --resume-from" in out
    assert "this many MORE steps" in out


def test_calibrated_proj_l_is_fitted_before_the_sla_fine_tune(tmp_path):
    config = dataclasses.replace(qs.PRESETS["tiny"], calibrate_clips=3, dense_seeds=[0], baselines=[])
    results = qs.run(config, torch.device("cpu"), tmp_path, phase="all")
    calibration = results["variants"]["sla"]["calibration"]
    assert calibration["clips"] == 3 and len(calibration["layers"]) == qs.dit_config("tiny").num_layers
    assert calibration["calibrated_error"] < calibration["sparse_error"]
    assert "proj_l fitted to the dense model's attention on 3 training clips" in (tmp_path / "quality-study.md").read_text()
    with pytest.raises(ValueError, match=r"calibrate_clips=17 must lie in \[0, train_samples=16\]"):
        dataclasses.replace(qs.PRESETS["tiny"], calibrate_clips=17)
