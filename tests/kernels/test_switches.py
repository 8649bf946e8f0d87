"""The environment switches the launches read (configs.Switches): a bad value raises a ValueError that names the
variable and the value, whichever switch it is (each reader is called as the launches call it, after the op has
read the switches)."""

import functools
import re

import pytest

from sla_dist.kernels import configs

READERS = {
    configs.DKDV_ORDER_ENV: (configs.dkdv_order, ["LPT", "", "split-long", "lpt+natural"]),
    configs.PREPASS_ENV: (configs.prepass_launch, ["", "Loop", "persistent", "loop+block"]),
    configs.DKDV_CHUNKS_ENV: (configs.dkdv_chunked, ["", "on", "3", "Auto"]),
    configs.CLASSIFY_ENV: (functools.partial(configs.classify_packed, 64), ["", "Packed", "radix", "packed+separate"]),
    configs.DKDV_SPLIT_ENV: (configs.dkdv_split, ["", "on", "Long", "long+lpt"]),
    configs.DQ_SPLIT_ENV: (functools.partial(configs.dq_launch, 128), ["", "on", "Halves", "2", "halves+off"]),
    configs.TMA_ENV: (configs.tma_kernels, ["on", "", "ALL", "fwd+fwd", "fwd,dq", "all+dq", "off+fwd", "bwd"]),
}


@pytest.mark.parametrize("env, value", [(env, value) for env, (_, values) in READERS.items() for value in values])
def test_bad_value_names_the_switch_and_the_value(env, value, monkeypatch):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=re.escape(f"{env}={value!r}")):
        READERS[env][0](switches=configs.read_switches())
