"""Data for sd3_light: cached latents/text embeddings in shards, the mock source, and the sampler.

- :mod:`.shards`     shard + manifest format, ``verify`` (``python -m megatron_sd3.data DIR``)
- :mod:`.dataset`    ``ShardedDataset`` lazy memory-mapped reader
- :mod:`.mock`       ``MockDataset`` deterministic synthetic source
- :mod:`.sampler`    ``build_data_iterator`` / ``GlobalBatchPlan``: global shuffle, buckets, DP split, resume
- :mod:`.preprocess` images + captions -> shards (``tools/preprocess_data.py``)

Importing this package does not import transformers/diffusers.
"""

from megatron_sd3.data.dataset import ShardedDataset
from megatron_sd3.data.mock import MockDataset
from megatron_sd3.data.sampler import DataIterator, GlobalBatchPlan, build_data_iterator, collate
from megatron_sd3.data.shards import ShardError, load_manifest, verify

__all__ = ["ShardedDataset", "MockDataset", "DataIterator", "GlobalBatchPlan", "build_data_iterator", "collate",
           "ShardError", "load_manifest", "verify"]
