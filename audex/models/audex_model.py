"""AudexModel: one decoder-only LLM that hears (AF-Whisper + MLP adapter) and speaks (codec tokens).

Assembled from YAML (``conf/model/*.yaml``): ``vocab``, ``tokenizer``, ``audio_encoder``, ``adapter``,
``backbone``, ``speech_codec``, ``audio_codec``; each part names its class with ``_target_`` and is built
from a local ``pretrained_path`` (real weights, Hugging Face layout) or an inline ``config`` (random init).

Example::

    from audex.models.audex_model import AudexModel
    model = AudexModel.from_config_file("conf/model/tiny.yaml")
    tok = model.tokenizer
    ids = torch.tensor([tok.encode("<|im_start|>user\\nHi<|im_end|>")])
    logits = model(input_ids=ids).logits          # [1, L, vocab.size]
    model.save_to("tiny.nemo")
    same = ModelPT.restore_from("tiny.nemo")        # works without importing audex first
    same = load_model("tiny.nemo")                  # audex.models.checkpoint: the archive checked first

Packed rows (``sample_ids``) run through :mod:`audex.modules.packed`; the training hooks (loss of eq. 2 and MoE
balancing from :mod:`audex.parts`) are methods of the model, so that Lightning, the training run and the tests
all go through :meth:`forward`.

Audio in the prompt: a prompt holds ``<so_start>`` + N x ``<so_embedding>`` + ``<so_end>`` per clip
(N = :meth:`frames_for_samples`); :meth:`embed_inputs` writes the adapter outputs of clip i over the i-th
run of ``<so_embedding>`` rows (runs counted row-major over the batch).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from lightning.pytorch import Trainer
from nemo.core.classes import ModelPT
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from transformers.modeling_outputs import CausalLMOutputWithPast

from audex import register_nemo_targets
from audex.data.collate import batch_field
from audex.data.loader import build_dataloader
from audex.models.artifacts import (
    COMPONENTS,
    build_tokenizer,
    node_for_build,
    read_pretrained_folder,
    record_resolved_configs,
    register_codec_config_artifacts,
    write_pretrained_folder,
)
from audex.modules.packed import (
    MambaSpanReset,
    enable_varlen_attention,
    packed_attention_mask,
    packed_segments,
    uses_varlen_attention,
)
from audex.parallel.megatron_moe import configure_balancing
from audex.parallel.sharding import (
    attach_row_masks,
    average_replicated_gradients,
    clip_grad_norm_global,
    cp_loss,
    mask_row_gradients,
    parallelize_model,
    rank0_state,
)
from audex.parts.losses import language_model_loss
from audex.parts.moe import MoeBalancer
from audex.parts.optim import build_optimizer_and_scheduler
from audex.vocab import AudexVocab

register_nemo_targets()


def _instantiate(node: DictConfig | None, **kwargs):
    if node is None:
        return None
    return hydra.utils.instantiate(node, _convert_="all", **kwargs)


class AudexModel(ModelPT):
    """Audio-text LLM of the Audex paper, as a NeMo ``ModelPT``.

    The config's ``backbone``/``audio_encoder``/codec ``pretrained_path`` are read once, at build time. When a
    ``.nemo`` is restored, the architectures are rebuilt from the Hugging Face configs recorded at build time
    (``<part>.resolved_config``) and the weights come from the archive, so the original folders are not needed.
    """

    def __init__(self, cfg: DictConfig, trainer: Trainer | None = None):
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        restoring = self._is_model_being_restored() or bool(cfg.get("_restored_from_resolved", False))
        super().__init__(cfg=cfg, trainer=trainer)
        cfg = self._cfg

        self.vocab = AudexVocab(**OmegaConf.to_container(cfg.vocab, resolve=True))
        self.tokenizer = build_tokenizer(self, cfg)

        parts = {}
        for name in COMPONENTS:
            node = cfg.get(name)
            if node is None:
                parts[name] = None
                continue
            node = node_for_build(node, restoring)
            if name == "backbone":
                parts[name] = _instantiate(node, vocab_size=self.vocab.size, text_vocab_size=self.vocab.text_vocab_size)
            elif name == "adapter":
                parts[name] = _instantiate(node, input_size=parts["audio_encoder"].hidden_size,
                                           output_size=parts["backbone"].hidden_size)
            else:
                parts[name] = _instantiate(node)
        self.audio_encoder = parts["audio_encoder"]
        self.adapter = parts["adapter"]
        self.llm = parts["backbone"]
        self.speech_codec = parts["speech_codec"]
        self.audio_codec = parts["audio_codec"]
        self._check_consistency()
        record_resolved_configs(self)
        register_codec_config_artifacts(self, cfg)
        self.mamba_reset = MambaSpanReset(self.backbone) if self.has_recurrent_layers else None
        self.moe_balancer: MoeBalancer | None = None  # set by enable_moe_balancing (stages that train the LLM)
        self.audex_parallelism = None  # a ParallelismConfig, set by AudexParallelStrategy with the device mesh
        self._audex_sharded = False
        if self.audio_encoder is not None:
            self.audio_encoder.requires_grad_(False)  # frozen in every stage (Table 3)
        for codec in (self.speech_codec, self.audio_codec):
            if codec is not None:
                codec.requires_grad_(False)

    # ---- construction helpers -----------------------------------------------------------------
    @classmethod
    def from_config_file(cls, path: str, **overrides) -> "AudexModel":
        """Build from a model YAML (``conf/model/tiny.yaml``); ``overrides`` are dotted keys."""
        cfg = OmegaConf.load(path)
        if "model" in cfg and "backbone" not in cfg:
            cfg = cfg.model
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, merge=True)
        return cls(cfg)

    def _check_consistency(self) -> None:
        if self.llm is None:
            raise ValueError("model.backbone is required")
        if self.llm.text_vocab_size != self.vocab.text_vocab_size:
            raise ValueError(
                f"the backbone has {self.llm.text_vocab_size} text embedding rows but model.vocab.text_vocab_size is "
                f"{self.vocab.text_vocab_size}: set them equal (the codec tokens are appended after the text rows)"
            )
        if self.speech_codec is not None and self.speech_codec.codebook_size != self.vocab.speech_codebook_size:
            raise ValueError(f"speech codec has {self.speech_codec.codebook_size} codes but model.vocab.speech_codebook_size "
                             f"is {self.vocab.speech_codebook_size}")
        if self.audio_codec is not None:
            if self.audio_codec.codebook_size != self.vocab.audio_codebook_size:
                raise ValueError(f"audio codec has {self.audio_codec.codebook_size} codes per layer but "
                                 f"model.vocab.audio_codebook_size is {self.vocab.audio_codebook_size}")
            if self.audio_codec.n_q != self.vocab.audio_rvq_used:
                raise ValueError(f"audio codec generates {self.audio_codec.n_q} RVQ layers but model.vocab.audio_rvq_used "
                                 f"is {self.vocab.audio_rvq_used}")

    # ---- parts ---------------------------------------------------------------------------------
    @property
    def backbone(self):
        """The transformers causal LM (embeddings sized to ``vocab.size``)."""
        return self.llm.lm

    @property
    def has_recurrent_layers(self) -> bool:
        """True for hybrid backbones (Mamba layers carry state along the sequence)."""
        types = getattr(self.backbone.config, "layer_types", None) or []
        return any(str(t) in ("mamba", "linear_attention") for t in types)  # NemotronH names Mamba2 "linear_attention"

    def frames_for_samples(self, num_samples: int) -> int:
        if self.audio_encoder is None:
            raise RuntimeError("this model has no audio encoder (model.audio_encoder is null)")
        return self.audio_encoder.frames_for_samples(num_samples)

    def encode_audio(self, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
        """16 kHz mono waveforms -> adapter outputs ``[frames_for_samples(T_i), d_llm]`` (encoder frozen)."""
        if self.audio_encoder is None:
            raise RuntimeError("this model has no audio encoder (model.audio_encoder is null)")
        with torch.no_grad():
            feats = self.audio_encoder(list(waveforms))
        dtype = self.adapter.linear_1.weight.dtype
        if not feats:
            return []
        lens = [f.shape[0] for f in feats]
        out = self.adapter(torch.cat(feats, 0).to(dtype))
        return list(torch.split(out, lens, dim=0))

    def embed_inputs(self, input_ids: torch.Tensor, audio_embeds: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with the ``<so_embedding>`` runs replaced by audio frames (in order)."""
        emb = self.backbone.get_input_embeddings()(input_ids)
        so = self.tokenizer.so_embedding
        is_so = input_ids == so
        n_slots = int(is_so.sum())
        audio_embeds = list(audio_embeds or [])
        n_frames = sum(int(a.shape[0]) for a in audio_embeds)
        if n_slots != n_frames:
            raise ValueError(
                f"the batch has {n_slots} <so_embedding> positions but the audio gives {n_frames} frames "
                f"({[int(a.shape[0]) for a in audio_embeds]}): expand each <sound> to frames_for_samples(len(audio)) "
                "placeholders, one run per clip, in the order of the clips"
            )
        if n_slots == 0:
            return emb
        # check the runs line up with the clips, so that a clip never spills into its neighbour's run
        flat = is_so.reshape(-1).to(torch.int8)
        starts = ((flat[1:] == 1) & (flat[:-1] == 0)).nonzero().reshape(-1) + 1
        if flat[0]:
            starts = torch.cat([torch.zeros(1, dtype=starts.dtype), starts])
        ends = ((flat[:-1] == 1) & (flat[1:] == 0)).nonzero().reshape(-1) + 1
        if flat[-1]:
            ends = torch.cat([ends, torch.tensor([flat.numel()], dtype=ends.dtype)])
        run_lens = (ends - starts).tolist()
        clip_lens = [int(a.shape[0]) for a in audio_embeds]
        if run_lens != clip_lens:
            raise ValueError(f"<so_embedding> runs of lengths {run_lens} do not match the clips' frame counts {clip_lens}")
        frames = torch.cat([a.to(emb.dtype) for a in audio_embeds], 0)
        emb = emb.clone()
        emb[is_so] = frames
        return emb

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, audios: list[torch.Tensor] | None = None,
                audio_embeds: list[torch.Tensor] | None = None, sample_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("AudexModel.forward needs input_ids or inputs_embeds")
            if audio_embeds is None and audios:
                audio_embeds = self.encode_audio(audios)
            inputs_embeds = self.embed_inputs(input_ids, audio_embeds)
        if sample_ids is None:
            return self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        # packed rows (audex.modules.packed): each sample attends to itself only, Mamba state restarts per sample
        packed = self.mamba_reset is not None and bool((sample_ids.amax(dim=1) > 0).any())
        if packed and past_key_values is not None:
            raise ValueError("packed rows (several samples per row) cannot continue from a cache")
        varlen = uses_varlen_attention(self.backbone)
        spans = packed_segments(sample_ids) if packed or varlen else None
        if varlen:
            attention_mask, kwargs["audex_segments"] = None, spans
        else:
            attention_mask = packed_attention_mask(sample_ids, inputs_embeds.dtype)
        with self.mamba_reset.spans(spans if packed else None) if self.mamba_reset is not None else nullcontext():
            return self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, use_cache=use_cache, **kwargs)

    # ---- training ------------------------------------------------------------------------------
    def use_packed_attention(self, kind: str = "varlen") -> bool:
        """How packed rows attend: ``varlen`` (per-sample SDPA, cost sum n_j^2; SDPA backbones only) or ``dense``
        (an ``[L, L]`` block-diagonal mask). Returns whether varlen attention is on."""
        if kind not in ("varlen", "dense"):
            raise ValueError(f"model.packed_attention must be 'varlen' or 'dense', got {kind!r}")
        return enable_varlen_attention(self.backbone) if kind == "varlen" else uses_varlen_attention(self.backbone)

    def enable_moe_balancing(self, bias_update_rate: float = 1e-3, aux_loss_coeff: float = 1e-6,
                             routing_scale: float = 2.5, train_routers: bool = True) -> MoeBalancer | None:
        """Balance the routed experts of a MoE backbone while training (section 4.3, :mod:`audex.parts.moe`).

        The routers' ``routed_scaling_factor`` is checked against ``routing_scale``. With ``train_routers`` (the
        stage trains the LLM) the load-balancing loss joins the training loss and the routing bias moves after
        every optimizer step; otherwise (stage1 keeps the LLM bit-identical) nothing is attached. Returns
        :attr:`moe_balancer` (None for dense backbones and engine megatron, whose routers balance themselves)."""
        if self.llm.engine == "megatron":   # model.moe into megatron-core's config (audex.parallel.megatron_moe)
            configure_balancing(self.llm.lm.mcore, bias_update_rate, aux_loss_coeff, routing_scale, train_routers)
            return None
        balancer = MoeBalancer(self.backbone, bias_update_rate=bias_update_rate, aux_loss_coeff=aux_loss_coeff)
        if balancer.active:
            balancer.check_routing_scale(float(routing_scale))
        self.moe_balancer = balancer if balancer.active and train_routers else balancer.remove()   # remove: None
        return self.moe_balancer

    @property
    def loss_reduction(self) -> str:
        """``model.loss.reduction``: ``square_averaged`` (eq. 2 of the paper, the default) or ``token_mean`` (eq. 1)."""
        loss_cfg = self.cfg.get("loss") if self.cfg is not None else None
        return str(loss_cfg.get("reduction", "square_averaged")) if loss_cfg is not None else "square_averaged"

    @property
    def loss_unit(self) -> str:
        """``model.loss.square_average_unit``: eq. (2)'s j per ``sample`` (the paper's text, the default) or per
        ``turn`` (each assistant turn, as Megatron's ``scaled_loss_func`` computes it)."""
        loss_cfg = self.cfg.get("loss") if self.cfg is not None else None
        return str(loss_cfg.get("square_average_unit", "sample")) if loss_cfg is not None else "sample"

    def forward_batch(self, batch) -> CausalLMOutputWithPast:
        """:meth:`forward` on a data-pipeline batch (:class:`~audex.data.collate.PackedBatch` or a dict)."""
        return self(input_ids=batch_field(batch, "input_ids"), position_ids=batch_field(batch, "position_ids"),
                    sample_ids=batch_field(batch, "sample_ids"), audios=batch_field(batch, "audios") or None)

    def compute_loss(self, batch, reduction: str | None = None, with_moe: bool = True):
        """Loss on a packed batch and detached statistics (``token_mean_loss``, ``token_accuracy``,
        ``trainable_tokens``, ``real_tokens``, and ``moe_aux_loss`` for balanced MoE backbones).

        The loss is :attr:`loss_reduction` plus, while :attr:`moe_balancer` is set, the load-balancing loss
        (coefficient 1e-6)."""
        sample_ids, input_ids = batch_field(batch, "sample_ids"), batch_field(batch, "input_ids")
        balancer = self.moe_balancer if with_moe else None
        if self._audex_sharded and self.audex_parallelism.context > 1:   # rows split over CP ranks
            with balancer.recording(None) if balancer is not None else nullcontext():
                loss, stats = cp_loss(self, batch, self.device_mesh, self.audex_parallelism)
            return self._with_moe_loss(loss, stats, balancer)
        valid = sample_ids >= 0 if sample_ids is not None else torch.ones_like(input_ids, dtype=torch.bool)
        with balancer.recording(valid) if balancer is not None else nullcontext():
            out = self.forward_batch(batch)
        loss, stats = language_model_loss(out.logits, batch_field(batch, "labels"), sample_ids,
                                          reduction=reduction or self.loss_reduction, unit=self.loss_unit)
        stats["real_tokens"] = valid.sum()
        return self._with_moe_loss(loss, stats, balancer)

    @staticmethod
    def _with_moe_loss(loss, stats, balancer):
        if balancer is not None:
            aux = balancer.load_balancing_loss()
            if aux is not None:
                loss = loss + aux
                stats["moe_aux_loss"] = aux.detach()
        return loss, stats

    def training_step(self, batch, batch_idx):
        loss, stats = self.compute_loss(batch)
        batch_size = int(batch_field(batch, "input_ids").shape[0])
        # under CP, ``loss`` is this rank's share of the row; stats["loss"] the whole row's eq. (2) value
        self.log("train_loss", stats.get("loss", loss).detach(), prog_bar=True, batch_size=batch_size)
        self.log("train_token_accuracy", stats["token_accuracy"], batch_size=batch_size)
        self.log("train_real_tokens", stats["real_tokens"].float(), batch_size=batch_size, reduce_fx="sum")
        if "moe_aux_loss" in stats:
            self.log("train_moe_aux_loss", stats["moe_aux_loss"], batch_size=batch_size)
            for key, value in self.moe_balancer.last_update_stats.items():
                self.log(f"train_{key}", value, batch_size=batch_size)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        with torch.no_grad():
            _, stats = self.compute_loss(batch, with_moe=False)
        n = max(int(stats["trainable_tokens"]), 1)
        # token-weighted means over the whole validation set (Lightning weights by batch_size)
        self.log("val_loss", stats["token_mean_loss"], prog_bar=True, batch_size=n, add_dataloader_idx=False)
        self.log("val_token_accuracy", stats["token_accuracy"], batch_size=n, add_dataloader_idx=False)
        return stats["token_mean_loss"]

    # ---- scale-out (engine hf, AudexParallelStrategy: audex.parallel.sharding) ------------------------------
    def configure_model(self) -> None:
        """Shard the model on the strategy's mesh (no-op without AudexParallelStrategy); with ``parallelism.meta_init``
        the shards of ranks > 0 (backbone built on meta, :func:`audex.training.run.build_model`) get rank 0's weights."""
        if self.audex_parallelism is None or self._audex_sharded:
            return
        full = rank0_state(self) if self.audex_parallelism.meta_init else None
        parallelize_model(self, self.device_mesh, self.audex_parallelism, full, self.trainer.strategy.root_device)
        self._audex_sharded = True

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._audex_sharded:   # stage-1 text rows: each rank masks its own rows (hooks do it in one process)
            average_replicated_gradients(self, self.device_mesh)
            mask_row_gradients(self)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if not self._audex_sharded or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}: sharded training clips "
                             "by the global norm only; set it to norm")
        clip_grad_norm_global(self.parameters(), float(gradient_clip_val))

    def configure_optimizers(self):
        """AdamW + cosine schedule of ``model.optim`` (:mod:`audex.parts.optim`), with row-masked weight decay and
        the MoE bias update."""
        if self.cfg.get("optim") is None:
            raise ValueError("model.optim is missing: a stage config (conf/stage*.yaml) sets it")
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if (max_steps is None or max_steps < 0) and self.cfg.optim.get("sched") is not None:
            max_steps = self.cfg.optim.sched.get("max_steps", -1)
        if self._audex_sharded:
            attach_row_masks(self)       # the optimizer groups row-masked tables by their masks
        optimizer, scheduler = build_optimizer_and_scheduler(self, self.cfg.optim, max_steps, self.moe_balancer)
        return optimizer if scheduler is None else ([optimizer], [scheduler])

    def attach_dataloaders(self, train=None, validation=None) -> None:
        """Use these loaders for ``trainer.fit`` (the training run builds them: resumable, rank-aware)."""
        self._train_dl = train
        self._validation_dl = validation

    def setup_training_data(self, train_data_config):
        self._train_dl = build_dataloader(train_data_config, self.tokenizer, self.frames_for_samples, "train")

    def setup_validation_data(self, val_data_config):
        self._validation_dl = build_dataloader(val_data_config, self.tokenizer, self.frames_for_samples, "val")

    @classmethod
    def list_available_models(cls):
        return []  # no hub: real weights come from local folders named in the config

    # ---- parameter accounting ------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        def n(m):
            return sum(p.numel() for p in m.parameters()) if m is not None else 0

        return {"audio_encoder": n(self.audio_encoder), "adapter": n(self.adapter), "backbone": n(self.llm),
                "speech_codec": n(self.speech_codec), "audio_codec": n(self.audio_codec)}

    # ---- Hugging Face folder ---------------------------------------------------------------------
    def save_pretrained(self, folder: str) -> Path:
        """Write a Hugging Face-style folder (:func:`audex.models.artifacts.write_pretrained_folder`)."""
        return write_pretrained_folder(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str) -> "AudexModel":
        """Load a folder written by :meth:`save_pretrained` (local only)."""
        cfg, adapter_file = read_pretrained_folder(folder)
        model = cls(cfg)
        if adapter_file is not None:
            model.adapter.load_state_dict(load_file(str(adapter_file)))
        return model
