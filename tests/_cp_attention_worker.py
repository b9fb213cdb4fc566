"""Worker for tests/multiprocess/test_context_parallel.py: the Ulysses joint attention of
``models/context_parallel.py``, through the calls the joint block makes (``qkv_heads_to_sequence``:
q, k and v packed into one all-to-all; ``sequence_to_heads``), against one process's attention,
values and input gradients.

Every rank builds the same full q, k, v ``[S_img + S_txt, b, h, d]`` and the same upstream
gradient ``G`` of the attention output; rank ``r`` holds image chunk ``r`` and the whole text.
Its loss is its image chunk's output against ``G``'s chunk plus its share (``1/CP``) of the
text's, as the model's replicated text stream hands gradients back. Writes ``OUT/rank{R}.pt``
with the local output, the gradients of the local inputs and the one-process references.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-img", type=int, default=12)
    ap.add_argument("--n-txt", type=int, default=7)
    ap.add_argument("--heads", type=int, default=4)
    a = ap.parse_args()

    import torch.nn.functional as F
    from megatron.core import parallel_state as ps

    from megatron_sd3.distributed import initialize_distributed
    from megatron_sd3.models import context_parallel as cp

    info = initialize_distributed(1, 1, seed=1234, cp=int(os.environ["WORLD_SIZE"]))
    n_cp, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    b, h, d, s_img, s_txt = 2, a.heads, 8, a.n_img, a.n_txt
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(s_img + s_txt, b, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(s_img + s_txt, b, h * d, generator=g, dtype=torch.float64)

    def attention(q_, k_, v_):
        o = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q_, k_, v_)))
        return o.permute(2, 0, 1, 3).reshape(q_.shape[0], q_.shape[1], -1)

    # one process
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = attention(*ref_in)
    (ref_out * grad_out).sum().backward()

    # this CP rank: image chunk r and the whole text
    n = s_img // n_cp
    local = [torch.cat([t[r * n:(r + 1) * n], t[s_img:]]).requires_grad_() for t in (q, k, v)]
    joint = cp.qkv_heads_to_sequence(*local, n, n_cp)  # as the model calls it: q, k, v in one all-to-all
    out = cp.sequence_to_heads(attention(*joint), s_img, n_cp, d)
    g_local = torch.cat([grad_out[r * n:(r + 1) * n], grad_out[s_img:] / n_cp])
    (out * g_local).sum().backward()
    torch.save({"out": out.detach(), "grads": [t.grad for t in local], "n": n, "rank": r,
                "ref_out": ref_out.detach(), "ref_grads": [t.grad for t in ref_in]},
               os.path.join(a.out, f"rank{info.rank}.pt"))


if __name__ == "__main__":
    main()
