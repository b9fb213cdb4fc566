"""sd3_light: the origin's names, kept so the seed's code runs unchanged.

``LightSD3Pipeline`` holds the run's ``config`` and the ``model_config`` (the TOML ``[model]``
section as a dict) and hands out the loss function. The seed's check::

    pipe = LightSD3Pipeline.__new__(LightSD3Pipeline)
    pipe.config = {}
    pipe.model_config = {"text_recon_gamma": 0.5, "text_recon_target_layer": 0}
    loss_fn = pipe.get_loss_fn()
    loss = loss_fn((pred, final_tokens, target_tokens), (target, mask))

The model itself is ``megatron_sd3.models.sd3_model.SD3Model``; the origin's ``InitialLayer`` /
``TransformerLayer`` / ``FinalLayer`` are its ``pre_process`` embeddings, its joint blocks
(``MMDiTLayer``, which know their global layer number) and its ``post_process`` head.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from megatron_sd3.config import check_model_fields
from megatron_sd3.loss import ConfigView, combine_local
from megatron_sd3.models.sd3_model import SD3Model


class LightSD3Pipeline:
    def __init__(self, config: Optional[dict[str, Any]] = None,
                 model_config: Optional[dict[str, Any]] = None):
        self.config = dict(config or {})
        self.model_config = dict(model_config or {})

    def _model_fields(self) -> dict[str, Any]:
        return check_model_fields(self.model_config, where="model_config")

    def get_loss_fn(self) -> Callable:
        """``loss_fn(output, (target, mask)) -> loss``: the registered loss terms
        (``megatron_sd3.loss``: denoise + gamma * text recon) with local means.

        ``output`` is the prediction, or ``(pred, final_text_tokens, target_tokens)`` with text
        reconstruction on. ``mask`` may be empty (no mask).
        """
        cfg = ConfigView(self._model_fields())  # the registry's terms read their weights here

        def loss_fn(output, label):
            target, mask = label
            return combine_local(output, target, mask, cfg=cfg).total

        return loss_fn


__all__ = ["LightSD3Pipeline", "SD3Model"]
