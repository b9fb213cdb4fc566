"""The training loss: a registry of terms, each a weighted per-element mean.

The loss is ``sum_k weight_k * sum_k / W_k`` over the registered terms that are enabled; the
default registry holds

* ``denoise_loss``: denoise MSE or pseudo-Huber (optional mask, optional per-sample weights of
  the flow-matching scheme: ``--weighting-scheme``), weight 1;
* ``text_recon_loss``: text reconstruction MSE, weight ``text_recon_gamma`` (on when > 0).

A term (``LossTerm``) is a name (the key of the report, the metrics record and the log line),
the config field that holds its weight (None: weight 1), an ``enabled(cfg)`` rule (default:
weight > 0), a function ``terms(LossInputs) -> (sum, weight)`` over one microbatch's model output
and targets, and ``batch_weight(cfg, microbatch)``: the weight the function will return for a
microbatch, known before the forward pass (default: the latents' element count), which
``TrainStep`` sums over the global batch up front. Adding a term is one function and one config
field: ``register_loss_term("my_loss", fn, weight_field="my_weight")``. Every rank must register
the same terms in the same order (register at import time): the report is reduced term by term.

Each term is computed as a (sum, weight) pair so that the same code serves two normalisations:

* local means (``combine_local``): what the seed's ``LightSD3Pipeline.get_loss_fn`` returns;
* global means over the whole global batch (``TrainStep._loss_func`` in ``training/step.py``),
  exact across data-parallel ranks whose masks differ.

Denoise loss elementwise: ``d = pred - target``; MSE ``d**2``, pseudo-Huber ``sqrt(d**2 + c**2) - c``.
A mask (empty tensor = none) of shape ``[B, H, W]`` / ``[B, 1, H, W]`` (broadcast over
channels) or the prediction's own shape weights elements; the masked mean divides by the mask's
weight (summed over the broadcast shape). Text reconstruction: per-token MSE over the samples
whose text was kept: a sample whose text was dropped for classifier-free guidance has no text to
reconstruct, so it is left out of both the sum and the weight (``keep_text``: ``TrainStep`` gives
each microbatch's keep flags to the term and, up front, to its ``batch_weight`` as
``microbatch["keep_text"]``; without them every sample counts, as in the seed's loss). A term
declared ``may_be_empty`` (text reconstruction) whose weight over the global batch is 0 (every
sample's text dropped) adds nothing to the loss and reports 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or in its own dtype if wider: the losses are computed in fp32 from bf16
    outputs, and in float64 from float64 ones (the float64 layout tests, docs/design.md section 6)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def elementwise_denoise(pred: torch.Tensor, target: torch.Tensor,
                        pseudo_huber_c: Optional[float] = None) -> torch.Tensor:
    d = at_least_fp32(pred) - at_least_fp32(target)
    if pseudo_huber_c is None:
        return d * d
    c = float(pseudo_huber_c)
    return torch.sqrt(d * d + c * c) - c


def expand_mask(mask: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """Mask broadcast to ``like``'s shape; None for an absent or empty mask."""
    if mask is None or mask.numel() == 0:
        return None
    m = mask.float()
    if m.dim() == like.dim() - 1 and like.dim() >= 3:  # [B, H, W] -> [B, 1, H, W]
        m = m.unsqueeze(1)
    try:
        return m.expand_as(like)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the prediction "
                         f"{tuple(like.shape)}; give [B, H, W], [B, 1, H, W] or the full shape") from None


def denoise_terms(pred, target, mask=None, pseudo_huber_c=None, sample_weight=None):
    """(sum of weighted elementwise loss, total weight). ``sample_weight`` ([B], the flow
    matching scheme's per-sample weights, ``flow_matching.loss_weighting``) multiplies each
    sample's elements, as diffusers' ``weighting * (pred - target) ** 2``; it leaves the total
    weight (the element count, or the mask's weight) as it is."""
    err = elementwise_denoise(pred, target, pseudo_huber_c)
    if sample_weight is not None:
        err = err * sample_weight.to(device=err.device, dtype=err.dtype).view(-1, *([1] * (err.dim() - 1)))
    m = expand_mask(mask, err)
    if m is None:
        return err.sum(), torch.tensor(float(err.numel()), device=err.device)
    return (err * m).sum(), m.sum()


def text_recon_terms(final_tokens, target_tokens, keep_text=None):
    """(sum of squared error, element count) of the text reconstruction over the samples with
    ``keep_text`` ([B] bool; None: all); the target is detached."""
    d = at_least_fp32(final_tokens) - at_least_fp32(target_tokens.detach())
    err = d * d
    if keep_text is None:
        return err.sum(), torch.tensor(float(d.numel()), device=d.device)
    k = keep_text.to(device=d.device, dtype=err.dtype).view(-1, *([1] * (err.dim() - 1)))
    return (err * k).sum(), k.sum() * float(d[0].numel())


def _denoise(inp: "LossInputs"):
    return denoise_terms(inp.pred, inp.target.to(inp.pred.device), inp.mask, inp.cfg.pseudo_huber_c,
                         inp.sample_weight)


def _denoise_batch_weight(cfg, mb) -> float:
    latents = mb["latents"]
    m = expand_mask(mb.get("mask"), latents)
    return float(latents.numel()) if m is None else float(m.sum())


def _text_recon(inp: "LossInputs"):
    if inp.final_tokens is None or inp.target_tokens is None or inp.target_tokens.numel() == 0:
        zero = torch.zeros((), device=inp.pred.device)
        return zero, zero  # no text tokens in this output: weight 0, no contribution
    return text_recon_terms(inp.final_tokens, inp.target_tokens, inp.keep_text)


def _text_recon_batch_weight(cfg, mb):
    """Text elements of the samples whose text is kept: a float, or with ``keep_text`` flags a
    0-d tensor on their device (counted there, no host read)."""
    per_sample = (mb["prompt_embeds"].shape[1] if "prompt_embeds" in mb else cfg.text_seq_len) * cfg.hidden_size
    keep = mb.get("keep_text")
    if keep is None:
        return float(mb["latents"].shape[0] * per_sample)
    return keep.sum().to(torch.float64) * per_sample


@dataclass
class LossInputs:
    """One microbatch's model output and targets, as a term function sees them."""

    pred: torch.Tensor
    target: torch.Tensor
    mask: Optional[torch.Tensor] = None
    final_tokens: Optional[torch.Tensor] = None
    target_tokens: Optional[torch.Tensor] = None
    cfg: Any = None
    keep_text: Optional[torch.Tensor] = None
    """[B] bool: False where the sample's text was dropped (classifier-free guidance); None: all kept."""
    sample_weight: Optional[torch.Tensor] = None
    """[B] per-sample weights of the denoise term (``--weighting-scheme``); None: all 1."""


def _latent_elements(cfg, mb) -> float:
    return float(mb["latents"].numel())


@dataclass(frozen=True)
class LossTerm:
    name: str
    terms: Callable[[LossInputs], tuple[torch.Tensor, torch.Tensor]]
    weight_field: Optional[str] = None
    enabled_rule: Optional[Callable[[Any], bool]] = None
    batch_weight: Callable[[Any, dict], float] = _latent_elements
    may_be_empty: bool = False
    """A global weight of 0 is legitimate (the term then adds 0); otherwise it reports NaN."""

    def weight(self, cfg) -> float:
        return 1.0 if self.weight_field is None else float(getattr(cfg, self.weight_field))

    def enabled(self, cfg) -> bool:
        return self.enabled_rule(cfg) if self.enabled_rule is not None else self.weight(cfg) > 0


LOSS_TERMS: dict[str, LossTerm] = {}


def register_loss_term(name: str, terms: Callable, *, weight_field: Optional[str] = None,
                       enabled: Optional[Callable[[Any], bool]] = None,
                       batch_weight: Optional[Callable[[Any, dict], float]] = None,
                       may_be_empty: bool = False) -> LossTerm:
    """Add a term (see the module docstring); the name must be new."""
    if name in LOSS_TERMS or name == "loss":
        raise ValueError(f"loss term {name!r} is already registered; unregister_loss_term it first "
                         f"or pick another name")
    term = LossTerm(name, terms, weight_field, enabled, batch_weight or _latent_elements, may_be_empty)
    LOSS_TERMS[name] = term
    return term


def unregister_loss_term(name: str) -> None:
    if name not in LOSS_TERMS:
        raise KeyError(f"no loss term {name!r}; registered: {', '.join(LOSS_TERMS)}")
    del LOSS_TERMS[name]


def loss_terms() -> list[LossTerm]:
    """Every registered term, in registration order (the order of the sum and the report)."""
    return list(LOSS_TERMS.values())


def enabled_loss_terms(cfg) -> list[LossTerm]:
    return [t for t in LOSS_TERMS.values() if t.enabled(cfg)]


register_loss_term("denoise_loss", _denoise, enabled=lambda cfg: True, batch_weight=_denoise_batch_weight)
register_loss_term("text_recon_loss", _text_recon, weight_field="text_recon_gamma",
                   enabled=lambda cfg: cfg.text_recon, batch_weight=_text_recon_batch_weight,
                   may_be_empty=True)


def keep_text_flags(positions, seed: int, flow, device="cpu") -> torch.Tensor:
    """[B] bool on ``device``: the samples at ``positions`` whose text is kept, exactly as
    ``flow_matching.make_flow_inputs`` draws them on that device (it is called on one-element
    latents; the flag is drawn before the noise, so the latents' size does not matter)."""
    from megatron_sd3.flow_matching import make_flow_inputs

    positions = list(positions)
    return make_flow_inputs(torch.zeros(len(positions), 1, device=device), positions, seed, flow).keep_text


def loss_inputs(output, target, mask, cfg, keep_text=None, flow=None) -> LossInputs:
    """The term functions' inputs; with ``flow`` (the microbatch's ``flow_matching.FlowSample``)
    the prediction is what the flow compares with its target (the implied x0 under
    ``precondition_outputs``) and the denoise term gets its per-sample weights."""
    pred, final_tokens, target_tokens = split_output(output)
    if flow is not None:
        pred = flow.prediction(pred)
    return LossInputs(pred=pred, target=target, mask=mask, final_tokens=final_tokens,
                      target_tokens=target_tokens, cfg=cfg, keep_text=keep_text,
                      sample_weight=None if flow is None else flow.loss_weight)


def total_of(means: dict[str, float], cfg) -> float:
    """``sum_k weight_k * mean_k`` over the enabled terms (the logged ``loss``)."""
    total = None
    for t in enabled_loss_terms(cfg):
        v = t.weight(cfg) * means[t.name]
        total = v if total is None else total + v
    return float("nan") if total is None else total


class ConfigView:
    """A dict of model fields read like an ``SD3Config``: missing fields are the dataclass
    defaults, properties (``text_recon``) are computed from the fields. What the seed's pipeline
    hands the registry instead of a full config."""

    def __init__(self, fields: dict, cls=None):
        if cls is None:
            from megatron_sd3.config import SD3Config as cls
        self._fields, self._cls = dict(fields), cls

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._fields:
            return self._fields[name]
        attr = getattr(self._cls, name, None)
        if isinstance(attr, property):
            return attr.fget(self)
        for f in dataclasses.fields(self._cls):
            if f.name == name and f.default is not dataclasses.MISSING:
                return f.default
        raise AttributeError(f"model config has no field {name!r}")


@dataclass
class LossBreakdown:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.terms[name]

    def as_dict(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), **{k: float(v.detach()) for k, v in self.terms.items()}}


def split_output(output):
    """Model output -> (pred, final_tokens or None, target_tokens or None)."""
    if isinstance(output, (tuple, list)):
        if len(output) != 3:
            raise ValueError("with text reconstruction the model output is (pred, final_tokens, target_tokens)")
        return output
    return output, None, None


def combine_local(output, target, mask=None, cfg=None, keep_text=None, **fields) -> LossBreakdown:
    """``sum_k weight_k * term_k`` with local means (the seed's loss) over the registered terms.

    ``cfg``: an ``SD3Config`` (or anything with its fields); without one, ``fields``
    (e.g. ``text_recon_gamma=0.5``, ``pseudo_huber_c=1.0``) over the ``SD3Config`` defaults.
    Every registered term is in ``terms`` (0 when disabled)."""
    cfg = ConfigView(fields) if cfg is None else cfg
    inp = loss_inputs(output, target, mask, cfg, keep_text)
    total, terms = None, {}
    for t in loss_terms():
        if not t.enabled(cfg):
            terms[t.name] = torch.zeros((), device=inp.pred.device)
            continue
        s, w = t.terms(inp)
        mean = s / w.clamp(min=1e-12)  # s is 0 where w is (an empty term means 0)
        terms[t.name] = mean
        v = t.weight(cfg) * mean
        total = v if total is None else total + v
    if total is None:
        total = torch.zeros((), device=inp.pred.device)
    return LossBreakdown(total=total, terms=terms)
