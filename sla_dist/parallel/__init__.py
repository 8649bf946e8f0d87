"""Sequence parallelism for SLA: process groups, sequence sharding, Ulysses and SLA-aware context parallel."""

from .groups import SequenceParallelConfig, SequenceParallelGroups
from .sharding import SequenceShard
from .ulysses import SequenceParallelSLA

__all__ = ["SequenceParallelConfig", "SequenceParallelGroups", "SequenceParallelSLA", "SequenceShard"]
