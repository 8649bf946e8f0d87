"""configs.fixed_settings / parse_settings: one process times several launch settings (time_layer.py --setting)."""

import os

import pytest

from sla_dist.kernels import configs


def _launch(name):
    kernel = configs.get_kernel(name)
    return kernel.num_warps, kernel.num_stages


@pytest.mark.parametrize("autotune", [None, "0"])
def test_settings_hold_inside_the_block_and_the_table_comes_back(autotune, monkeypatch):
    """Afterwards the environment is as before (unset stays unset: the launches are tuned again on a GPU) and the
    table's own settings are back (compared untuned, the only way get_kernel shows them)."""
    if autotune is None:
        monkeypatch.delenv("SLA_DIST_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("SLA_DIST_AUTOTUNE", autotune)
    with configs.fixed_settings(configs.parse_settings("dq=4x5+fwd_split=8x1")):
        assert _launch("dq") == (4, 5) and _launch("fwd_split") == (8, 1)
        assert os.environ["SLA_DIST_AUTOTUNE"] == "0"  # untuned: an autotuner would pick its own setting
    assert os.environ.get("SLA_DIST_AUTOTUNE") == autotune
    monkeypatch.setenv("SLA_DIST_AUTOTUNE", "0")
    configs.get_kernel.cache_clear()
    assert _launch("dq") == configs._KERNELS["dq"].fixed != (4, 5)
    assert _launch("fwd_split") == configs._KERNELS["fwd_split"].fixed != (8, 1)
    configs.get_kernel.cache_clear()  # the untuned kernels made here would outlive this test's environment


def test_an_error_inside_the_block_restores_the_table():
    before = _launch("dkdv")
    with pytest.raises(RuntimeError, match="inside"):
        with configs.fixed_settings({"dkdv": (4, 1)}):
            assert _launch("dkdv") == (4, 1)
            raise RuntimeError("inside")
    assert _launch("dkdv") == before


@pytest.mark.parametrize("text, match", [("dqq=8x4", "'dqq' is not one of"), ("dq=8y4", "'dq=8y4'"),
                                         ("dq=3x2", "'dq=3x2'"), ("dq=8x0", "'dq=8x0'"), ("dq", "'dq'")])
def test_bad_settings_name_the_value(text, match):
    with pytest.raises(ValueError, match=match):
        configs.parse_settings(text)


def test_unknown_kernel_in_a_mapping_is_refused():
    with pytest.raises(ValueError, match="no kernels named \\['flash'\\]"):
        with configs.fixed_settings({"flash": (4, 2)}):
            pass


def test_constexprs_in_a_setting():
    """'KERNEL=WxS/NAME=INT': a tuned choice takes the option, a constexpr with a default is passed as a constant;
    the table comes back afterwards."""
    settings = configs.parse_settings("dkdv=4x3/Q_STEPS=2/Q_SPLIT=2+dq=8x4")
    assert settings == {"dkdv": (4, 3, {"Q_STEPS": 2, "Q_SPLIT": 2}), "dq": (8, 4)}
    before = configs._KERNELS["dkdv"]
    with configs.fixed_settings(settings):
        kernel = configs.get_kernel("dkdv")
        assert (kernel.num_warps, kernel.num_stages) == (4, 3)
        assert kernel.meta["Q_STEPS"] == 2 and kernel.meta["Q_SPLIT"] == 2
    assert configs._KERNELS["dkdv"] == before


@pytest.mark.parametrize("text, match", [("dkdv=4x3/Q_STEPS", "'Q_STEPS' is not CONSTEXPR=INT"),
                                         ("dkdv=4x3/Q_STEPS=3", "Q_STEPS=3 is not one of its options"),
                                         ("dkdv=4x3/NOPE=1", "'NOPE' is neither a tuned choice"),
                                         ("dkdv=4x3/D=64", "'D' is neither a tuned choice"),
                                         ("fwd_split=4x3/SPLIT_Q=1", "SPLIT_Q is fixed at 2")])
def test_bad_constexprs_name_the_value(text, match):
    with pytest.raises(ValueError, match=match):
        with configs.fixed_settings(configs.parse_settings(text)):
            pass
