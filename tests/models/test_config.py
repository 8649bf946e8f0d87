"""DiTConfig validation and the named shapes."""

import pytest

from sla_dist.kernels.op import KERNEL_HEAD_DIMS
from sla_dist.models.config import DIT_CONFIGS, DiTConfig, dit_config


def test_named_shapes_match_wan():
    assert (dit_config("wan2.1-1.3b").num_layers, dit_config("wan2.1-1.3b").dim) == (30, 1536)
    big = dit_config("wan2.1-14b")
    assert (big.num_layers, big.dim, big.num_heads, big.ffn_dim, big.text_dim) == (40, 5120, 40, 13824, 4096)
    for name, config in DIT_CONFIGS.items():
        assert config.head_dim in KERNEL_HEAD_DIMS, name


def test_overrides_are_validated():
    config = dit_config("tiny", mlp="swiglu", tile_size=[2, 2, 2])
    assert config.mlp == "swiglu" and config.tile_size == (2, 2, 2)
    with pytest.raises(ValueError, match="mlp='relu'"):
        dit_config("tiny", mlp="relu")
    with pytest.raises(ValueError, match="no fields.*'width'"):
        dit_config("tiny", width=3)
    with pytest.raises(ValueError, match="'huge'"):
        dit_config("huge")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(dim=100, num_heads=3), "dim=100 is not divisible by num_heads=3"),
        (dict(dim=8, num_heads=2), "head dim 4"),
        (dict(num_layers=0), "num_layers=0"),
        (dict(patch_size=(1, 2)), r"patch_size=\(1, 2\)"),
        (dict(tile_size=(4, 0, 4)), r"tile_size=\(4, 0, 4\)"),
        (dict(freq_dim=33), "freq_dim=33"),
        (dict(eps=0.0), "eps=0.0"),
    ],
)
def test_bad_values_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        DiTConfig(**fields)
