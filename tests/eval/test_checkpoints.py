"""Loading a VideoDiT from a recipe and a checkpoint: exports, Lightning files, SLA layers, clear errors."""

import pytest
import torch

from sla_dist.eval.checkpoints import load_model, read_state_dict
from sla_dist.lightning.recipe import load_recipe
from sla_dist.models import PatchConfig, VideoDiT, apply_sla
from tests.eval.helpers import TINY_RECIPE, save_dit


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(TINY_RECIPE)


def _same_outputs(a, b, recipe):
    x = torch.randn(1, recipe.dit.in_channels, 4, 16, 16)
    t, text = torch.tensor([300.0]), torch.randn(1, 3, recipe.dit.text_dim)
    with torch.no_grad():
        return torch.allclose(a(x, t, text), b(x, t, text))


def test_export_with_sla_layers_round_trips(tmp_path, recipe):
    model = VideoDiT(recipe.dit)
    apply_sla(model, PatchConfig(sla=recipe.sla, layers=[1]))
    torch.nn.init.normal_(model.blocks[1].self_attn.core.proj_l.weight, std=0.1)
    loaded = load_model(save_dit(model, tmp_path / "m.safetensors"), recipe)
    assert type(loaded.blocks[0].self_attn.core).__name__ == "DenseAttention"
    assert loaded.blocks[1].self_attn.core.config.topk == recipe.sla.topk
    assert _same_outputs(model.eval(), loaded, recipe)


def test_lightning_file_with_module_prefix(tmp_path, recipe):
    model = VideoDiT(recipe.dit)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 3}, tmp_path / "last.ckpt")
    assert _same_outputs(model.eval(), load_model(tmp_path / "last.ckpt", recipe), recipe)


def test_errors(tmp_path, recipe):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_model(tmp_path / "nothing.safetensors", recipe)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        read_state_dict(tmp_path / "empty")
    other = load_recipe(TINY_RECIPE, ["model.num_layers=3"])
    path = save_dit(VideoDiT(other.dit), tmp_path / "three.safetensors")
    with pytest.raises(ValueError, match=r"does not fit model 'tiny'.*unexpected \['blocks.2"):
        load_model(path, recipe)


def test_ema_of_an_exported_file_says_why_it_cannot_be(tmp_path, recipe):
    path = save_dit(VideoDiT(recipe.dit), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"--ema needs a training checkpoint.*m.safetensors' is an exported weights"):
        load_model(path, recipe, ema=True)
    torch.save(VideoDiT(recipe.dit).state_dict(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="export --ema"):
        read_state_dict(tmp_path / "m.pt", ema=True)
