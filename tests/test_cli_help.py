"""The command line explains itself: one line per subcommand, the recipe keys, plain-text help, and
``sla-dist recipe show`` printing a resolved, documented recipe that is still valid YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from sla_dist.cli import COMMANDS, SUMMARIES, main
from sla_dist.lightning.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_has_a_line_per_subcommand(capsys):
    text = " ".join(_help(capsys).split())
    assert set(SUMMARIES) == set(COMMANDS)
    for name, summary in SUMMARIES.items():
        assert f"{name} {summary}" in text


def test_train_help_documents_resume_the_dense_baseline_and_the_recipe_keys(capsys):
    text = _help(capsys, "train")
    assert "--no-resume" in text and "sparsity.enabled=false" in text
    assert "sla.{topk, negligible" in text and "trainer.{max_steps" in text and "recipe show" in text


@pytest.mark.parametrize("command", ["preprocess", "eval", "train", "export"])
def test_help_is_plain_text(capsys, command):
    assert "``" not in _help(capsys, command)


def test_recipe_show_prints_the_resolved_recipe_with_docs(capsys):
    assert main(["recipe", "show", str(RECIPE), "sla.topk=0.1", "trainer.max_steps=7"]) == 0
    text = capsys.readouterr().out
    expected = dataclasses.asdict(load_recipe(RECIPE, ["sla.topk=0.1", "trainer.max_steps=7"]))
    assert yaml.safe_load(text) == yaml.safe_load(yaml.safe_dump(expected))  # tuples as lists
    topk = next(line for line in text.splitlines() if line.strip().startswith("topk:"))
    assert "0.1" in topk and "# Fraction of key blocks per query block computed exactly" in topk
