"""``python -m megatron_sd3.data DATASET [--fast]``: verify a cached dataset (sizes, headers, sha256)."""

from megatron_sd3.data.shards import main

raise SystemExit(main())
