"""SLA-aware context parallel (ring level of the SP layout)."""

from __future__ import annotations


def context_parallel_sla(attention, q, k, v, seq_len, group):
    raise NotImplementedError("context parallel (ring_degree > 1) is not built yet")
