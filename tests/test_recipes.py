"""Every recipe in recipes/ loads against the schema; unknown keys, bad values and bad overrides are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from sla_dist.lightning.recipe import Recipe, load_recipe, recipe_to_yaml

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"tiny_cpu.yaml", "wan1.3b_sla_finetune.yaml", "wan14b_sla_sp8.yaml"} <= names, names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path, tmp_path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.output_dir and "output_dir" in path.read_text()
    recipe.dit  # the model shape builds
    # the resolved YAML written next to a run loads back to the same recipe
    saved = tmp_path / "recipe.yaml"
    saved.write_text(recipe_to_yaml(recipe))
    assert load_recipe(saved) == recipe


def test_real_recipes_drop_captions_for_guidance():
    for name in ("wan1.3b_sla_finetune.yaml", "wan14b_sla_sp8.yaml"):
        assert load_recipe(RECIPES[0].parent / name).optim.caption_dropout == 0.1


def test_overrides_apply():
    recipe = load_recipe(RECIPES[0].parent / "tiny_cpu.yaml", ["trainer.max_steps=50", "sla.topk=0.1"])
    assert recipe.trainer.max_steps == 50 and recipe.sla.topk == 0.1


@pytest.mark.parametrize("override, match", [
    ("trainer.max_step=5", "max_step"),                       # misspelt key
    ("nonsense=1", "nonsense"),                               # unknown top-level key
    ("sla.topk=1.5", "topk=1.5"),                             # out of range, SLAConfig's own check
    ("trainer.max_steps=abc", "max_steps"),                   # wrong type
    ("parallel.zero_stage=4", "zero_stage=4"),
    ("parallel.sp_size=3", "multiple of parallel.sp_size=3"),  # world 1 is not a multiple of 3
    ("data.kind=shards", "shards_dir"),
    ("trainer.precision=fp8", "fp8"),
    ("optim.caption_dropout=1.5", "caption_dropout=1.5"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("optim.grad_clip=nan", "optim.grad_clip=nan must be a finite number"),
    ("optim.grad_clip=inf", "optim.grad_clip=inf must be a finite number"),
    ("optim.teacher_weight=nan", "optim.teacher_weight=nan must be a finite number"),
    ("optim.teacher_weight=-inf", "optim.teacher_weight=-inf must be a finite number"),
    ("sample.every=-1", "every=-1 must be an integer >= 0"),
    ("parallel.timeout_s=0", "timeout_s=0 must be an integer > 0"),
    ("parallel.timeout_s=-60", "timeout_s=-60 must be an integer > 0"),
    ("parallel.timeout_s=ten", "timeout_s"),
    ("output_dir=${oc.env:HOME}", r"override: output_dir='\$\{oc.env:HOME\}' calls a resolver"),
    ("model.compile_mode=fast", r"model.compile_mode='fast' is not one of \('default', 'max-autotune-no-cudagraphs'\)"),
    ("model.compile_mode=reduce-overhead", "model.compile_mode='reduce-overhead' is not supported for training: its "
                                           "CUDA graphs reuse their gradient buffers"),
    ("model.compile_mode=max-autotune", "model.compile_mode='max-autotune' is not supported for training"),
    ("model.compile=maybe", "compile"),
])
def test_bad_values_are_rejected(override, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(RECIPES[0].parent / "tiny_cpu.yaml", [override])


def test_compile_options():
    tiny = RECIPES[0].parent / "tiny_cpu.yaml"
    assert not load_recipe(tiny).model.compile
    recipe = load_recipe(tiny, ["model.compile=true", "model.compile_mode=max-autotune-no-cudagraphs"])
    assert recipe.model.compile and recipe.model.compile_mode == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="model.compile=true with parallel.zero_stage=3 is not supported"):
        load_recipe(tiny, ["model.compile=true", "parallel.zero_stage=3"])
    load_recipe(tiny, ["model.compile=true", "parallel.zero_stage=3", "parallel.strategy=auto"])
    assert load_recipe(tiny, ["model.compile=true", "parallel.sp_size=2", "trainer.devices=2"]).model.compile


def test_collective_timeout_is_for_the_sla_strategy():
    assert load_recipe(RECIPES[0].parent / "tiny_cpu.yaml", ["parallel.timeout_s=90"]).parallel.timeout_s == 90
    # Lightning's own strategies are built by name, without a timeout: a value other than theirs would be ignored
    with pytest.raises(ValueError, match=r"^parallel.timeout_s=90 needs strategy='sla_deepspeed' [^\n]*1800 s\)$"):
        load_recipe(RECIPES[0].parent / "tiny_cpu.yaml", ["parallel.strategy=auto", "parallel.timeout_s=90"])


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\ntrainer:\n  max_steps: 3\n  warp_speed: 9\n")
    with pytest.raises(ValueError, match="warp_speed"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="not key=value"):
        load_recipe(bad, ["trainer.max_steps"])


def test_one_file_serves_train_and_preprocess(tmp_path):
    from sla_dist.data.command import recipe_section

    both = tmp_path / "both.yaml"
    both.write_text("output_dir: runs/x\ndata:\n  kind: shards\n  shards_dir: data/latents\n"
                    "preprocess:\n  videos: data/videos\n  captions: data/captions.json\n  out: data/latents\n"
                    "  clip_shapes: [17x64x64, 17x64x96]\n  fps: 8\n")
    recipe = load_recipe(both)
    assert recipe.data.shards_dir == "data/latents" and recipe.preprocess.fps == 8.0
    assert recipe.preprocess.clip_shapes == ["17x64x64", "17x64x96"] and recipe.preprocess.vae is None
    assert recipe_section(str(both)) == {"videos": "data/videos", "captions": "data/captions.json",
                                         "out": "data/latents", "clip_shapes": ["17x64x64", "17x64x96"], "fps": 8.0}
    assert load_recipe(None).preprocess is None
    both.write_text("output_dir: x\npreprocess:\n  fsp: 8\n")
    with pytest.raises(ValueError, match="fsp"):
        load_recipe(both)
    both.write_text("output_dir: x\npreprocess:\n  shard_size: many\n")
    with pytest.raises(ValueError, match="shard_size"):
        load_recipe(both)


def test_yaml_syntax_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\ntrainer:\n  max_steps: [3\n  devices: 1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml' is not valid YAML at line \d+, column \d+: ") as info:
        load_recipe(bad)
    assert "\n" not in str(info.value)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="holds a ListConfig, not a mapping"):
        load_recipe(bad)


def test_only_the_recipes_own_interpolations(tmp_path, monkeypatch):
    monkeypatch.setenv("SLA_DIST_SECRET", "hunter2")
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: x\ndata:\n  batch_size: 3\nsample:\n  num_videos: ${data.batch_size}\n")
    assert load_recipe(path).sample.num_videos == 3
    for value in ("${oc.env:SLA_DIST_SECRET}", "runs/${ oc.env : SLA_DIST_SECRET }", "${data.${oc.env:X}}",
                  "${oc.decode:'1'}"):
        path.write_text(f"output_dir: \"{value}\"\n")
        with pytest.raises(ValueError, match="output_dir=.*calls a resolver") as info:
            load_recipe(path)
        assert "hunter2" not in str(info.value)
    path.write_text("output_dir: x\ntrainer:\n  max_steps: ${oc.env:SLA_DIST_SECRET}\n")
    with pytest.raises(ValueError, match="trainer.max_steps=") as info:
        load_recipe(path)
    assert "hunter2" not in str(info.value)


def test_calibration_options():
    tiny = RECIPES[0].parent / "tiny_cpu.yaml"
    assert not load_recipe(tiny).sparsity.calibrate
    assert load_recipe(tiny, ["sparsity.calibrate=true"]).sparsity.calibrate
    with pytest.raises(ValueError, match=r"sparsity.calibrate=true with parallel.zero_stage=3 is not supported"):
        load_recipe(tiny, ["sparsity.calibrate=true", "parallel.zero_stage=3"])
    load_recipe(tiny, ["sparsity.calibrate=true", "parallel.zero_stage=3", "parallel.strategy=auto"])
    sp4 = ["sparsity.calibrate=true", "trainer.devices=4", "parallel.sp_size=4", "model.name=small"]
    with pytest.raises(ValueError, match=r"parallel.ulysses_degree=2 < sp_size=4 is not supported"):
        load_recipe(tiny, [*sp4, "parallel.ulysses_degree=2"])
    assert load_recipe(tiny, [*sp4, "parallel.ulysses_degree=4"]).sparsity.calibrate


def test_overlap_comm_reaches_deepspeed():
    from sla_dist.lightning.run import build_strategy

    tiny = RECIPES[0].parent / "tiny_cpu.yaml"
    assert build_strategy(load_recipe(tiny)).config["zero_optimization"]["overlap_comm"] is False
    on = build_strategy(load_recipe(tiny, ["parallel.overlap_comm=true"]))
    assert on.config["zero_optimization"]["overlap_comm"] is True
    with pytest.raises(ValueError, match="parallel.overlap_comm .* needs zero_stage 1, 2 or 3, not 0"):
        load_recipe(tiny, ["parallel.overlap_comm=true", "parallel.zero_stage=0"])


def test_reduce_bucket_size_reaches_deepspeed():
    from sla_dist.lightning.run import build_strategy

    tiny = RECIPES[0].parent / "tiny_cpu.yaml"
    assert "reduce_bucket_size" not in build_strategy(load_recipe(tiny)).config["zero_optimization"]
    small = build_strategy(load_recipe(tiny, ["parallel.reduce_bucket_size=50000000"]))
    assert small.config["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    with pytest.raises(ValueError, match="parallel.reduce_bucket_size=0 must be a positive number"):
        load_recipe(tiny, ["parallel.reduce_bucket_size=0"])
    with pytest.raises(ValueError, match="parallel.reduce_bucket_size .* needs zero_stage 1, 2 or 3, not 0"):
        load_recipe(tiny, ["parallel.reduce_bucket_size=1000", "parallel.zero_stage=0"])


def test_overlap_chunks_reach_the_strategy():
    from sla_dist.lightning.run import build_strategy

    tiny = RECIPES[0].parent / "tiny_cpu.yaml"
    sp2 = ["trainer.devices=2", "parallel.sp_size=2"]
    assert build_strategy(load_recipe(tiny, sp2)).sp_config.overlap_chunks == 1
    assert build_strategy(load_recipe(tiny, [*sp2, "parallel.overlap_chunks=2"])).sp_config.overlap_chunks == 2
    with pytest.raises(ValueError, match=r"overlap_chunks=0 must be an integer > 0"):
        load_recipe(tiny, [*sp2, "parallel.overlap_chunks=0"])
