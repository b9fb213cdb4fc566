from megatron_sd3.compile_cache import use_a_cache_per_cpu_capability

use_a_cache_per_cpu_capability()  # before megatron-core's import fixes inductor's cache folder
