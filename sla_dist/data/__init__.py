"""Data pipeline: raw videos and captions -> latent shards (``sla-dist preprocess``) -> bucketed training batches.

Only the training-side reader is imported here; the encoders (diffusers, transformers) and the video decoder
(PyAV) are imported by the preprocessing modules when they run.
"""

from sla_dist.data.dataset import BucketBatchSampler, LatentShardDataset, collate_latents
from sla_dist.data.shards import SampleRecord, build_index, load_index

__all__ = ["BucketBatchSampler", "LatentShardDataset", "SampleRecord", "build_index", "collate_latents",
           "load_index"]
