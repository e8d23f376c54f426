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

Audio in the prompt: a prompt holds ``<so_start>`` + N x ``<so_embedding>`` + ``<so_end>`` per clip
(N = :meth:`frames_for_samples`); :meth:`embed_inputs` writes the adapter outputs of clip i over the i-th
run of ``<so_embedding>`` rows (runs counted row-major over the batch).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from lightning.pytorch import Trainer
from nemo.core.classes import ModelPT
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from transformers.modeling_outputs import CausalLMOutputWithPast

from audex import register_nemo_targets
from audex.data.packing import packed_segments
from audex.models.artifacts import (
    COMPONENTS,
    build_tokenizer,
    node_for_build,
    read_pretrained_folder,
    record_resolved_configs,
    register_codec_config_artifacts,
    write_pretrained_folder,
)
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
        self._mamba_segments = None
        if self.has_recurrent_layers:
            self._install_mamba_sample_resets()
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

    @staticmethod
    def packed_attention_mask(sample_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, L] sample ids (-1 = padding) -> additive [B, 1, L, L] mask: causal within each sample only."""
        L = sample_ids.shape[1]
        same = sample_ids.unsqueeze(2) == sample_ids.unsqueeze(1)
        causal = torch.ones(L, L, dtype=torch.bool, device=sample_ids.device).tril()
        valid = (sample_ids >= 0).unsqueeze(2) & (sample_ids >= 0).unsqueeze(1)
        allowed = same & causal & valid
        allowed |= torch.eye(L, dtype=torch.bool, device=sample_ids.device)  # padding rows attend to themselves
        mask = torch.zeros(allowed.shape, dtype=dtype, device=sample_ids.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask.unsqueeze(1)

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
        attention_mask = self.packed_attention_mask(sample_ids, inputs_embeds.dtype)
        packed = self.has_recurrent_layers and bool((sample_ids.amax(dim=1) > 0).any())
        if packed and past_key_values is not None:
            raise ValueError("packed rows (several samples per row) cannot continue from a cache")
        self._mamba_segments = packed_segments(sample_ids) if packed else None
        try:
            return self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        finally:
            self._mamba_segments = None

    def _install_mamba_sample_resets(self) -> None:
        """Make every Mamba mixer restart its recurrent (conv and SSM) state at packed-sample boundaries.

        transformers' Nemotron-H mixer takes no per-token sequence ids (mamba-ssm's ``seq_idx``), so a packed row
        would carry one sample's state into the next. While :meth:`forward` runs on a packed batch, each mixer
        instead runs once per sample span of the row and the outputs are stitched back: exact, and the token
        layout seen by attention, MoE routers and the loss is unchanged.
        """
        owner = self
        for module in self.backbone.modules():
            if type(module).__name__.endswith("Mamba2Mixer"):
                original = module.forward

                def forward(hidden_states, cache_params=None, attention_mask=None, _orig=original, **kw):
                    spans = owner._mamba_segments
                    if spans is None or cache_params is not None:
                        return _orig(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kw)
                    out = torch.zeros_like(hidden_states)  # padding positions stay zero (masked everywhere)
                    for b, row_spans in enumerate(spans):
                        for s, e in row_spans:
                            out[b:b + 1, s:e] = _orig(hidden_states[b:b + 1, s:e], **kw)
                    return out

                module.forward = forward

    # ---- training hooks (the logic lives in audex.training / audex.losses) ----------------------
    def training_step(self, batch, batch_idx):
        from audex.training.steps import training_step

        return training_step(self, batch, batch_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        from audex.training.steps import validation_step

        return validation_step(self, batch, batch_idx, dataloader_idx)

    def configure_optimizers(self):
        """AdamW + cosine schedule of the stage config, with row-masked weight decay and the MoE bias update."""
        from audex.training.optim import configure_optimizers

        return configure_optimizers(self)

    def setup_training_data(self, train_data_config):
        from audex.data.datamodule import build_dataloader

        self._train_dl = build_dataloader(train_data_config, self.tokenizer, self.frames_for_samples, "train")

    def setup_validation_data(self, val_data_config):
        from audex.data.datamodule import build_dataloader

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
