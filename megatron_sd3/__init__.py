from megatron_sd3.compile_cache import use_a_cache_per_cpu_capability
from megatron_sd3.lazy_compile import install as compile_fused_kernels_on_first_call

use_a_cache_per_cpu_capability()  # before anything touches inductor's cache folder
compile_fused_kernels_on_first_call()  # before megatron-core's import decorates them
