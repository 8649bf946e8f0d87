"""The preprocess subcommand's option handling: recipe sections, rank and world size, errors as exit code 2."""

import pytest

from sla_dist.cli import build_parser
from sla_dist.data.command import rank_and_world, recipe_section


def parse(argv):
    return build_parser(["preprocess"]).parse_args(["preprocess", *argv])


def test_recipe_section_and_unknown_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: x}\npreprocess:\n  fps: 12.5\n  clip_shapes: [17x64x64]\n")
    assert recipe_section(str(recipe)) == {"fps": 12.5, "clip_shapes": ["17x64x64"]}
    recipe.write_text("preprocess:\n  fsp: 12\n")
    with pytest.raises(ValueError, match=r"unknown keys \['fsp'\]"):
        recipe_section(str(recipe))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        recipe_section(str(tmp_path / "missing.yaml"))
    recipe.write_text("preprocess:\n  shard_size: many\n")
    with pytest.raises(ValueError, match="shard_size"):
        recipe_section(str(recipe))


def test_recipe_section_mirrors_preprocess_config():
    import dataclasses

    from sla_dist.data.preprocess import PreprocessConfig, PreprocessSection

    names = lambda cls: [f.name for f in dataclasses.fields(cls)]  # noqa: E731
    assert names(PreprocessSection) == names(PreprocessConfig)


def test_rank_from_options_then_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world(parse([])) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world(parse([])) == (3, 4)
    assert rank_and_world(parse(["--rank", "1", "--world-size", "2"])) == (1, 2)
    with pytest.raises(ValueError, match=r"rank=3 must lie in \[0, world_size=2\)"):
        rank_and_world(parse(["--world-size", "2"]))


def test_options_override_the_recipe(tmp_path, monkeypatch, capsys):
    from sla_dist.data import command
    from sla_dist.data.preprocess import Summary

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = {}

    def fake_run(config, rank, world):
        seen.update(config=config)
        return Summary(rank, world, shards_written=[rank])

    monkeypatch.setattr("sla_dist.data.preprocess.run", fake_run)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preprocess:\n  fps: 12.5\n  shard_size: 3\n  videos: v\n  captions: c.json\n  out: o\n")
    args = parse(["--recipe", str(recipe), "--shard-size", "5", "--clip-shape", "5x8x8", "--clip-shape", "9x8x16"])
    assert command.main(args) == 0
    config = seen["config"]
    assert (config.fps, config.shard_size, config.videos) == (12.5, 5, "v")
    assert config.clip_shapes == ["5x8x8", "9x8x16"]
    assert "rank 0/1: wrote shards [0]" in capsys.readouterr().out


def test_invalid_settings_exit_with_code_2(capsys):
    from sla_dist.cli import main

    rc = main(["preprocess", "--videos", "v", "--captions", "c", "--out", "o", "--fps", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "fps=0.0 must be positive" in err, err
