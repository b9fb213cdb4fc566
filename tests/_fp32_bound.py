"""The bound of the layout-equivalence tests (tests/multiprocess/test_parallel.py, test_cpu_mode.py),
from the arithmetic, not from one machine's result.

A layout changes the order of fp32 sums: TP splits GEMMs (and the CPU's BLAS picks its blocking,
so its summation order, from the shapes), sequence parallelism splits the token sums of the weight
gradients, DP and the micro-batches change the order of gradient accumulation, and TP / DP
all-reduce partial sums. Two orders of a sum of K fp32 products differ by at most ``K * u`` of the
sum of magnitudes (recursive summation's worst case, u = 2**-24, with no credit for the
statistical cancellation that keeps real errors far smaller). A gradient element of the tiny preset
depends in sequence on ``CHAIN`` such reductions (each block: 9 in the forward pass - adaLN
modulation, norm, QKV, QK^T, softmax, PV, projection, MLP in and out - and twice that in the
backward pass, plus the embeddings and the head), each of length at most ``K_MAX``; first-order
errors add along the chain.

Adam runs with ``ADAM_EPS`` far above every gradient element (they are at most ~0.1), so its
update ``lr * m / (sqrt(v) + eps)`` is linear in the gradients to within ``|g| / eps``: a layout's
rounding in the gradients reaches each tensor's update at the same relative size. At the default
eps Adam's first step is ``sign(g)``, which turns the rounding of a near-zero gradient element
into a full step: no bound from the arithmetic holds for the parameters then. The losses and the
gradient norm are sums of the same quantities.

Measured on an AMD EPYC (AVX-512) under ATEN_CPU_CAPABILITY=default and avx2: at most 6e-7, some
3000 times below the bound; broken on purpose (a sequence-parallel chunk dropped, one tensor's
gradient doubled under TP, the data-parallel reduction skipped) the tests see 1e-2 and more.
"""
import torch

U = 2.0 ** -24  # fp32 unit roundoff
K_MAX = 256  # longest reduced dimension: the MLP's 4 x 64 (weight-gradient token sums: 4 x 56 = 224)
CHAIN = 4 * 9 * 3 + 12  # 4 blocks x 9 reductions x (forward + 2 backward), + embeddings and head
BOUND = CHAIN * K_MAX * U  # 1.8e-3

# Clipped gradients have elements well below 0.1: with eps = 10 the update is g / 10 to within 1%,
# and lr = 1 moves a parameter tensor by about 1% of its norm per step.
ADAM_EPS = 10.0
LR = 1.0


def rel(a, b) -> float:
    """Relative difference of two tensors (or lists of floats): ||a - b|| / ||b||, in float64."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
