"""The bounds of the layout-equivalence tests, from the arithmetic, not from one machine's result.

A layout changes the order of sums: TP splits GEMMs (and the CPU's BLAS picks its blocking, so its
summation order, from the shapes), sequence and context parallelism split the token sums of the
weight gradients, DP and the micro-batches change the order of gradient accumulation, and TP / DP
/ CP all-reduce partial sums. Two orders of a sum of K products differ by at most ``K * u`` of the
sum of magnitudes (recursive summation's worst case, u the unit roundoff, with no credit for the
statistical cancellation that keeps real errors far smaller). A gradient element of the tiny preset
depends in sequence on ``CHAIN`` such reductions (each block: 9 in the forward pass - adaLN
modulation, norm, QKV, QK^T, softmax, PV, projection, MLP in and out - and twice that in the
backward pass, plus the embeddings and the head), each of length at most ``K_MAX``; first-order
errors add along the chain: ``chain_bound(u) = CHAIN * K_MAX * u`` of each gradient tensor.

Adam runs with ``ADAM_EPS`` far above every gradient element (they are at most ~0.1), so its
update ``lr * m / (sqrt(v) + eps)`` is linear in the gradients to within ``|g| / eps``: a layout's
rounding in the gradients reaches each tensor's update at the same relative size. At the default
eps Adam's first step is ``sign(g)``, which turns the rounding of a near-zero gradient element
into a full step: no bound from the arithmetic holds for the parameters then.

The gradient norm: by the triangle inequality ``| ||g + dg|| - ||g|| | <= ||dg||``, so the
gradients' relative error reaches it unchanged; its own sum of squares over all ``N_PARAMS``
elements adds ``N_PARAMS * u`` (halved by the square root). A loss is a mean of squares of
``pred - target`` over at most ``N_LOSS`` elements: a relative error ``e`` in ``pred`` (and in a
target the model makes, text reconstruction's) moves the sum of squares by at most
``2 e (||pred|| + ||target||) / ||pred - target||`` of it, which is below ``2 e (1 + 2 R)`` while
``||pred||, ||target|| <= R ||pred - target||`` (R = 4 covers untrained models, whose predictions
are far from their targets); the sum itself adds ``N_LOSS * u``.

float64 (``BOUND64`` and the two beside it) is where layouts are compared: at 2^-53 the chain bound
is 3.4e-12, and a bug of relative size 1e-4 stands eight orders of magnitude above it. fp32
(``BOUND``, 1.8e-3) stays for the tests where fp32 itself is the point (the CPU kernels' own
vector widths, tests/multiprocess/test_cpu_mode.py; FP8 runs, whose non-GEMM arithmetic is fp32).

Measured in fp32 on an AMD EPYC (AVX-512) under ATEN_CPU_CAPABILITY=default and avx2: at most
6e-7, some 3000 times below BOUND; in float64, at most ~1e-15.
"""
import torch

U32, U64 = 2.0 ** -24, 2.0 ** -53  # fp32 / float64 unit roundoff
K_MAX = 256  # longest reduced dimension: the MLP's 4 x 64 (weight-gradient token sums: 4 x 56 = 224)
CHAIN = 4 * 9 * 3 + 12  # 4 blocks x 9 reductions x (forward + 2 backward), + embeddings and head
N_PARAMS = 701_696  # elements of the tiny preset's parameters (4 blocks): the gradient norm's sum
N_LOSS = 2 * 16 * 64  # the longest loss sum of a microbatch: text reconstruction, 2 x 16 tokens x 64
R = 4  # ||pred||, ||target|| <= R ||pred - target|| (see above)


def chain_bound(u: float) -> float:
    """Relative bound of a gradient tensor's (and so an update's) layout rounding at roundoff u."""
    return CHAIN * K_MAX * u


BOUND = chain_bound(U32)  # 1.8e-3: fp32
BOUND64 = chain_bound(U64)  # 3.4e-12: float64, updates
NORM_BOUND64 = BOUND64 + N_PARAMS * U64 / 2  # 4.2e-11: the gradient norm
LOSS_BOUND64 = 2 * (1 + 2 * R) * BOUND64 + N_LOSS * U64  # 6.1e-11: each loss

# Clipped gradients have elements well below 0.1: with eps = 10 the update is g / 10 to within 1%,
# and lr = 1 moves a parameter tensor by about 1% of its norm per step.
ADAM_EPS = 10.0
LR = 1.0


def rel(a, b) -> float:
    """Relative difference of two tensors (or lists of floats): ||a - b|| / ||b||, in float64."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
