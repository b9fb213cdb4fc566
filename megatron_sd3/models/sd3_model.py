"""The SD3 MMDiT as a megatron-core module, one pipeline stage of it per rank.

* ``pre_process`` (first stage): patch/timestep/pooled/text embeddings.
* the joint blocks of this stage, each knowing its global 1-based ``layer_number``
  (megatron-core's ``get_transformer_layer_offset`` / ``get_num_layers_to_build``, so uneven
  splits come from ``num_layers_in_first/last_pipeline_stage`` or ``pipeline_model_parallel_layout``).
* ``post_process`` (last stage): adaLN-continuous norm, projection, unpatchify.

Text length: a single-stage model (``pre_process`` and ``post_process``) takes any number of
text tokens, as diffusers' transformer does (its layout is derived from the input); between
pipeline stages the activations travel packed (``packing.ActivationLayout``) in a tensor whose
shape every stage declares up front, so a pipeline-parallel model takes exactly
``config.text_seq_len`` tokens and says so in one line otherwise. The
text-reconstruction target (``docs/design.md``, section "Text reconstruction") is captured on
whichever stage holds it: the embedded text for target layer 0, the text output of block k
otherwise, detached.

Initialisation is layout-independent: every block is built under an RNG keyed by
(``init_seed``, layer number), the embeddings by (``init_seed``, 0) and the head by
(``init_seed``, num_layers + 1) (``data/_seeding.init_rng``); with ``use_cpu_initialization``
megatron builds each full master weight and splits it over TP. So every TP/PP/DP layout starts
from the same weights.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.enums import ModelType
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, sharded_state_dict_default

from megatron_sd3.backends import backend_for
from megatron_sd3.compat import set_te_attention_backend
from megatron_sd3.config import SD3Config
from megatron_sd3.data._seeding import init_rng
from megatron_sd3.models.embeddings import SD3Embeddings, SD3OutputHead
from megatron_sd3.models import context_parallel as cp
from megatron_sd3.models import sequence_parallel as sp
from megatron_sd3.models.mmdit_layer_specs import get_mmdit_layer_spec
from megatron_sd3.models.packing import ActivationLayout


class SD3Model(MegatronModule):
    """One pipeline stage of the SD3 MMDiT (all of it when pre_process and post_process)."""

    def __init__(self, config: SD3Config, layer_spec: Optional[ModuleSpec] = None,
                 pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None, transformer_impl: str = "local"):
        super().__init__(config=config)
        self.config: SD3Config = config
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.share_embeddings_and_output_weights = False  # nothing tied between first and last stage
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.transformer_impl = transformer_impl
        # The backend: spec filling, availability, and the FP8 context policy of forward.
        self.backend = backend_for(transformer_impl, fp8=bool(config.fp8))
        if layer_spec is None:
            layer_spec = get_mmdit_layer_spec(transformer_impl, qk_norm=config.qk_norm,
                                              fp8=bool(config.fp8))
        if transformer_impl == "transformer_engine":
            # TE picks its attention kernel from NVTE_* variables: megatron's own mapping of
            # config.attention_backend onto them (the local filling reads the config directly).
            set_te_attention_backend(config)
        self.layer_offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        num_local = get_num_layers_to_build(config, vp_stage=vp_stage)
        blocks = []
        for i in range(num_local):
            n = self.layer_offset + i + 1
            with init_rng(config.init_seed, n):
                blocks.append(build_module(layer_spec, config=config, layer_number=n,
                                           text_output=self.block_text_needed(n)))
        self.blocks = torch.nn.ModuleList(blocks)
        if pre_process:
            with init_rng(config.init_seed, 0):
                self.embeddings = SD3Embeddings(config)
        if post_process:
            with init_rng(config.init_seed, config.num_layers + 1):
                self.head = SD3OutputHead(config)
        self.input_tensor = None

    # -- layout --------------------------------------------------------------------------------
    def block_text_needed(self, layer_number: int) -> bool:
        """Does anything read the text output of block ``layer_number``?"""
        if layer_number < self.config.num_layers:
            return True
        return self.config.text_recon  # the last block's text feeds only the recon loss

    def layout(self, latent_hw, text_len: Optional[int] = None) -> ActivationLayout:
        """The packed activation for latents of ``latent_hw`` and ``text_len`` text tokens
        (default: the declared ``text_seq_len``, what pipeline stages agree on)."""
        return ActivationLayout.of(self.config, latent_hw, text_len)

    def check_text_len(self, text_len: int) -> None:
        """A single-stage model takes any text length; pipeline stages need the declared one."""
        if text_len < 1:
            raise ValueError("the text has no tokens; give at least one (a dropped prompt is zeros, not empty)")
        if not (self.pre_process and self.post_process) and text_len != self.config.text_seq_len:
            raise ValueError(f"text has {text_len} tokens but pipeline stages exchange activations of the "
                             f"declared text_seq_len={self.config.text_seq_len}; set [model] text_seq_len = "
                             f"{text_len} (or preprocess the text to {self.config.text_seq_len} tokens)")

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's schedules hand the previous stage's output here (a list of one tensor)."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "SD3Model takes one packed input tensor"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # -- forward -------------------------------------------------------------------------------
    def forward(self, hidden_states: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                pooled_projections: Optional[torch.Tensor] = None,
                timestep: Optional[torch.Tensor] = None,
                latent_hw: Optional[tuple[int, int]] = None):
        """diffusers' argument names: noisy latents ``[B,C,H,W]``, text tokens ``[B,T,4096]``,
        pooled ``[B,2048]``, timesteps ``[B]`` (0..1000). Later stages take their input from
        ``set_input_tensor`` and need only ``latent_hw`` (the last stage, to unpatchify).

        Returns, on the last stage: the velocity ``[B,C,H,W]`` when gamma = 0, else
        ``(velocity, final_text_tokens [B,T,h], target_tokens [B,T,h])`` (unpadded, the target
        detached); on other stages the packed activation ``[seq, B, h]``.
        """
        cfg = self.config
        if latent_hw is None:
            if hidden_states is None:
                raise ValueError("stages after the first need latent_hw=(H, W)")
            latent_hw = tuple(hidden_states.shape[-2:])
        n_text = cfg.text_seq_len
        if self.pre_process:
            n_text = encoder_hidden_states.shape[1]
            self.check_text_len(n_text)
        layout = self.layout(latent_hw, n_text)
        target = None
        if self.pre_process:
            x, c, y = self.embeddings(hidden_states, encoder_hidden_states, pooled_projections, timestep)
            if layout.n_txt > n_text:
                c = torch.cat([c, c.new_zeros(layout.n_txt - n_text, *c.shape[1:])], dim=0)
            x = cp.chunk(cfg, x)  # this rank's image chunk (context parallel)
            x, c = sp.scatter(cfg, x), sp.scatter(cfg, c)  # this rank's slices (sequence parallel)
            if cfg.text_recon and cfg.text_recon_target_layer == 0:
                target = c.detach()
        else:
            x, c, target, y = layout.unpack(self.input_tensor)

        # Padded text (FP8): the blocks keep the pads out of attention (no mask needed).
        text_len = n_text if layout.n_txt > n_text else None
        # FP8 GEMMs inside the blocks only (embedders, adaLN and head stay high precision), with
        # megatron's TransformerBlock policy: one context for the pass (delayed recipe) or one
        # per block (otherwise), as the backend says.
        y_blocks = sp.enter_blocks(cfg, y)
        with self.backend.pass_fp8_context(cfg):
            x, c, block_target = self._blocks_forward(x, c, y_blocks, text_len)
        target = block_target if block_target is not None else target

        if not self.post_process:
            return layout.pack(x, c, target, y)
        # the head on this rank's image tokens; the loss sees the whole image on every CP rank
        velocity = self.head.unpatchify(cp.gather_image(cfg, self.head(sp.gather(cfg, x), y)), latent_hw)
        if not cfg.text_recon:
            return velocity
        c, target = cp.text_loss_share(cfg, sp.gather(cfg, c)), sp.gather(cfg, target)
        return velocity, c[:n_text].transpose(0, 1), target[:n_text].transpose(0, 1)

    def _run_blocks(self, start: int, end: int, text_len):
        """Blocks ``start..end-1`` of this stage as one function of (x, c, y) -> (x, c, target)."""
        cfg = self.config

        def forward(x, c, y):
            target = None
            for block in self.blocks[start:end]:
                with self.backend.layer_fp8_context(cfg, block.layer_number - 1):
                    x, c = block(x, c, y, text_len=text_len)
                if cfg.text_recon and block.layer_number == cfg.text_recon_target_layer:
                    target = c.detach()
            return x, c, target

        return forward

    def _blocks_forward(self, x, c, y, text_len):
        """This stage's blocks, under ``--recompute-granularity full`` through megatron-core's
        checkpointing with the loop of megatron's ``TransformerBlock._checkpointed_forward``:
        ``uniform`` checkpoints units of ``recompute_num_layers`` blocks, ``block`` the first
        ``recompute_num_layers`` blocks of the stage (recompute.py)."""
        cfg, n = self.config, len(self.blocks)
        if cfg.recompute_granularity != "full" or not torch.is_grad_enabled() or n == 0:
            return self._run_blocks(0, n, text_len)(x, c, y)
        from megatron_sd3.recompute import checkpoint_handler

        target, k = None, cfg.recompute_num_layers
        if cfg.recompute_method == "uniform":
            units = [(i, min(i + k, n), True) for i in range(0, n, k)]
        else:  # "block"
            units = [(i, i + 1, i < k) for i in range(n)]
        for start, end, recompute in units:
            fn = self._run_blocks(start, end, text_len)
            if recompute:
                x, c, t = checkpoint_handler(cfg, self.transformer_impl, fn, x, c, y)
                t = None if t is None else t.detach()
            else:
                x, c, t = fn(x, c, y)
            target = t if t is not None else target
        return x, c, target

    # -- checkpointing -------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Checkpoint keys of blocks use their *global* index, so a checkpoint reloads under any
        PP split; the dict keys stay local, as ``load_state_dict`` wants them (what megatron's
        TransformerBlock does)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        # embeddings and head are plain torch modules, replicated over TP: megatron needs the TP
        # group to give each TP rank its own replica id (else all ranks claim the main replica)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        out = {}
        for name, module in self.named_children():
            if name != "blocks":
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=tp_group))
        for i, block in enumerate(self.blocks):
            local = f"{prefix}blocks.{i}."
            block_sd = sharded_state_dict_default(block, local, sharded_offsets, metadata)
            replace_prefix_for_sharding(block_sd, local, f"{prefix}blocks.{block.layer_number - 1}.")
            out.update(block_sd)
        return out
