"""Context parallelism's attention (models/context_parallel.py) on CPU (gloo) ranks, in float64.

The Ulysses all-to-all moves values, and the attention of each head then runs on the same
numbers as in one process: outputs and input gradients agree to float64 rounding (1e-12 is some
thousand times above it). The gradient of the replicated text is the sum of the ranks' shares;
broken on purpose (the text's all-gather over heads with a split instead of a reduce-scatter
backward, or a share not divided by CP) it is off by 10% and more.
"""
import pytest
import torch

from _ranks import run_ranks

WORKER = "tests/_cp_attention_worker.py"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nproc", [2, 4])
def test_ulysses_joint_attention_matches_one_process(tmp_path, nproc):
    run_ranks(WORKER, nproc, ["--out", str(tmp_path)], timeout=100)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(nproc)]
    ref = ranks[0]
    s_img = 12
    text_grads = [torch.zeros_like(g[s_img:]) for g in ref["ref_grads"]]
    for res in ranks:
        r, n = res["rank"], res["n"]
        own = list(range(r * n, (r + 1) * n)) + list(range(s_img, ref["ref_out"].shape[0]))
        torch.testing.assert_close(res["out"], ref["ref_out"][own], rtol=0, atol=1e-12)
        for i, g in enumerate(res["grads"]):
            torch.testing.assert_close(g[:n], ref["ref_grads"][i][r * n:(r + 1) * n], rtol=0, atol=1e-12)
            text_grads[i] += g[n:]
    for got, want in zip(text_grads, ref["ref_grads"]):
        torch.testing.assert_close(got, want[s_img:], rtol=0, atol=1e-12)
