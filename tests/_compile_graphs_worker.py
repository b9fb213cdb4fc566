"""Worker for tests/multiprocess/test_fp8_training.py: how torch.compile traces joint block 2 of
the tiny preset at ``--tp N`` (``--fp8 hybrid|e4m3`` or bf16 GEMMs), on CPU with gloo.

Prints one line ``GRAPHS {"graphs": G, "breaks": B, "reasons": [...]}`` per rank. Traces only
(``torch._dynamo.explain``), nothing is compiled.
"""
import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--fp8", default=None)
    a = ap.parse_args()

    from megatron_sd3.config import make_config
    from megatron_sd3.distributed import initialize_distributed
    from megatron_sd3.models.sd3_model import SD3Model
    from megatron_sd3.testing.helpers import block_graphs, tiny_forward_inputs

    initialize_distributed(a.tp, 1, seed=1234)
    parallel = {"tensor_model_parallel_size": a.tp, **({"fp8": a.fp8} if a.fp8 else {})}
    model = SD3Model(make_config("tiny", zero_init_adaln=False, parallel=parallel))
    ex = block_graphs(model, tiny_forward_inputs(model.config))
    print("GRAPHS " + json.dumps({"graphs": ex.graph_count, "breaks": ex.graph_break_count,
                                  "reasons": [r.reason.splitlines()[0][:200] for r in ex.break_reasons]}),
          flush=True)


if __name__ == "__main__":
    main()
