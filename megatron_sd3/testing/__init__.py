"""What only CPU runs and tests use, kept apart from the production code paths.

* :mod:`.cpu_mode`: patches that let megatron-core's training and checkpointing paths run on a
  machine without CUDA (gloo). A GPU run never imports it (``enable_cpu_mode`` refuses when CUDA
  is available); it is in the package, not in ``tests/``, because CPU training runs need it too
  (``make demo`` on a CPU machine, ``megatron_sd3.distributed.initialize_distributed`` without
  CUDA).
* :mod:`.helpers`: numerics and fixtures shared by the tests and the GPU check tools (``rel``,
  the FP8 linear pair); the tools in ``tools/`` import them,
  so they cannot live in ``tests/``.
"""
