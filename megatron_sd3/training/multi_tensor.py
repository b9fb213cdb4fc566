"""Torch-native stand-ins for the multi-tensor kernels megatron-core takes from apex or TE.

megatron-core's optimizer computes the gradient norm and copies/scales whole lists of tensors
with ``multi_tensor_applier(amp_C.multi_tensor_l2norm | multi_tensor_scale, ...)``. Without apex
and Transformer Engine it falls back to ``megatron.core.utils.local_multi_tensor_l2_norm`` and
``local_multi_tensor_scale``: a Python loop with one ``torch.norm`` per tensor followed by
``torch.tensor([...])`` of those device scalars (one host-device synchronisation per tensor,
about 600 per step for sd3_light), and one ``copy_(src * scale)`` per tensor.

The functions here have the same call contract and do the same arithmetic with torch's own
multi-tensor (``_foreach_*``) kernels: a handful of launches and no synchronisation.
``install()`` puts them where megatron looks them up, and only where megatron would otherwise
use its local fallbacks; with apex or TE installed it changes nothing.
"""
from __future__ import annotations

import torch


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm``: (l2 norm of all tensors ``[1]``, None), in fp32,
    or in float64 when a tensor is float64 (the float64 layout tests; no narrowing of the norm)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` over two lists."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install() -> bool:
    """Replace megatron-core's local fallbacks with the functions above (idempotent). Returns
    whether megatron uses them (False when apex or TE provide the fused kernels)."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads, optimizer

    swapped = False
    for mod, name, local, ours in (
        (clip_grads, "l2_norm_impl", mutils.local_multi_tensor_l2_norm, foreach_l2_norm),
        (clip_grads, "multi_tensor_scale_impl", mutils.local_multi_tensor_scale, foreach_scale),
        (optimizer, "multi_tensor_scale_impl", mutils.local_multi_tensor_scale, foreach_scale),
    ):
        current = getattr(mod, name, None)
        if current is local:
            setattr(mod, name, ours)
        swapped |= getattr(mod, name, None) is ours
    return swapped
