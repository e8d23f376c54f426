"""The Audex backbone as a TensorRT-LLM PyTorch-backend model that takes audio frames as multimodal embeddings.

TensorRT-LLM's multimodal route (``tensorrt_llm/inputs/registry.py``, ``tensorrt_llm/llmapi/llm.py`` of the pinned
release) is: a prompt ``{"prompt": ..., "multi_modal_embeddings": {...}}`` goes to the model's registered input
processor, whose ``attach_multimodal_embeddings(inputs, multimodal_embedding, sampling_params)`` returns the token
ids and ``{"multimodal_data": {"multimodal_embedding": rows}}``; the engine hands that to the model's ``forward`` as
``multimodal_params`` on the context step, and the model fuses it with ``fuse_input_embeds``
(``tensorrt_llm/_torch/models/modeling_multimodal_utils.py``), which writes the rows at the ids ``>= vocab_size``,
in order: exactly Audex's prompt-table convention (audio frame ``k`` is id ``vocab_size + k``,
:func:`~audex.export.frontend_onnx.prompt_tuning_inputs`).

So Audex registers two model classes, the stock ``LlamaForCausalLM`` (dense) and ``NemotronHForCausalLM`` (the
30B-A3B) of ``tensorrt_llm/_torch/models/`` with that fusion in front (:func:`register_trtllm_models`), under the
architecture names of :data:`AUDEX_ARCHITECTURES`; :func:`prepare_model_dir` writes the export's ``hf/`` folder
under that name (weights linked, not copied). The prompt's token ids travel in ``mm_processor_kwargs``, because the
pinned ``generate_async`` sends a multimodal prompt given as token ids back through the tokenizer
(``prompt_token_ids`` + ``multi_modal_embeddings`` -> ``tokenizer.decode``), and Audex prompts hold codec ids no
text tokenizer knows.

Example::

    >>> folder = prepare_model_dir("export/hf", "export/llm_api")
    >>> register_trtllm_models()                                   # before LLM(model=folder)
    >>> llm.generate_async(audio_prompt(ids, table), sampling_params)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

#: the export's transformers architecture -> the Audex model registered with TensorRT-LLM's PyTorch backend
AUDEX_ARCHITECTURES = {"LlamaForCausalLM": "AudexLlamaForCausalLM",
                       "NemotronHForCausalLM": "AudexNemotronHForCausalLM"}
MODALITY = "audio"
PROMPT_TEXT = "<audex prompt: token ids in mm_processor_kwargs>"   # the API needs a text; Audex's never is one
IDS_KEY = "audex_prompt_token_ids"


def prepare_model_dir(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """``out_dir``: the files of ``hf_dir`` (symlinked), with ``config.json``'s architecture renamed to its Audex
    model (:data:`AUDEX_ARCHITECTURES`)."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    config_file = hf_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{hf_dir} has no config.json: give the export's hf/ folder (audex-export writes it)")
    config = json.loads(config_file.read_text())
    arch = (config.get("architectures") or [None])[0]
    if arch not in AUDEX_ARCHITECTURES:
        raise ValueError(f"{hf_dir}: architecture {arch!r} has no Audex model for TensorRT-LLM's PyTorch backend; "
                         f"known: {sorted(AUDEX_ARCHITECTURES)}")
    out.mkdir(parents=True, exist_ok=True)
    for item in hf_dir.iterdir():
        link = out / item.name
        if item.name != "config.json" and not link.exists():
            os.symlink(item.resolve(), link)
    (out / "config.json").write_text(json.dumps({**config, "architectures": [AUDEX_ARCHITECTURES[arch]]}, indent=2))
    return out


def audio_prompt(ids: Sequence[int], table: torch.Tensor | None) -> dict:
    """The ``generate_async`` input of one Audex prompt: its ids, and its prompt-table rows when it has audio."""
    prompt = {"prompt": PROMPT_TEXT, "mm_processor_kwargs": {IDS_KEY: [int(t) for t in ids]}}
    if table is not None and table.numel() > 0:
        prompt["multi_modal_embeddings"] = {MODALITY: [table]}
    return prompt


class AudexInputProcessor:
    """TensorRT-LLM input processor of the Audex models (``InputProcessor`` protocol of
    ``tensorrt_llm/inputs/registry.py``; built by ``create_input_processor`` as ``cls(model_path, model_config,
    tokenizer, trust_remote_code=True)``): checks that the rows fit the prompt, and hands them on."""

    multimodal_hashing_supported = False

    def __init__(self, model_path, model_config, tokenizer, trust_remote_code: bool = True):
        self.model_path, self.model_config, self.tokenizer = model_path, model_config, tokenizer
        self.vocab_size = int(model_config.vocab_size)
        self.hidden_size = int(model_config.hidden_size)

    def _ids(self, inputs) -> list[int]:
        ids = (inputs.get("mm_processor_kwargs") or {}).get(IDS_KEY)
        if not ids:
            raise ValueError(f"an Audex prompt carries its token ids in mm_processor_kwargs[{IDS_KEY!r}] (see "
                             "audex.serving.llm_api_model.audio_prompt); text prompts are not tokenized here")
        return [int(t) for t in ids]

    def __call__(self, inputs, sampling_params):
        """A prompt without audio: its ids, nothing else (fake ids without rows are refused)."""
        ids = self._ids(inputs)
        self._check_rows(ids, 0)
        return ids, None

    def attach_multimodal_embeddings(self, inputs, multimodal_embedding, sampling_params):
        ids = self._ids(inputs)
        if set(multimodal_embedding) != {MODALITY}:
            raise ValueError(f"Audex takes multimodal embeddings of modality {MODALITY!r} only, got "
                             f"{sorted(multimodal_embedding)}")
        rows = torch.cat([torch.as_tensor(t) for t in multimodal_embedding[MODALITY]], 0)
        if rows.dim() != 2 or rows.shape[1] != self.hidden_size:
            raise ValueError(f"audio rows must be [frames, {self.hidden_size}] (the backbone's hidden size), got "
                             f"{list(rows.shape)}")
        self._check_rows(ids, int(rows.shape[0]))
        return ids, {"multimodal_data": {"multimodal_embedding": rows}}

    def _check_rows(self, ids: list[int], rows: int) -> None:
        fake = [t - self.vocab_size for t in ids if t >= self.vocab_size]
        if fake != list(range(rows)):
            raise ValueError(f"the prompt's audio ids must be vocab_size + 0..{rows - 1} in order, one per row of its "
                             f"{rows} audio rows; got {len(fake)} ids from vocab_size on")


def register_trtllm_models() -> None:
    """Register the Audex models and their input processor with TensorRT-LLM (idempotent); needs ``tensorrt_llm``."""
    from tensorrt_llm._torch.models.modeling_llama import LlamaForCausalLM
    from tensorrt_llm._torch.models.modeling_multimodal_utils import fuse_input_embeds
    from tensorrt_llm._torch.models.modeling_nemotron_h import NemotronHForCausalLM
    from tensorrt_llm._torch.models.modeling_utils import (
        MODEL_CLASS_MAPPER_MAPPING,
        MODEL_CLASS_MAPPING,
        register_auto_model,
    )
    from tensorrt_llm.inputs.registry import MultimodalPlaceholderMetadata, register_input_processor

    placeholder = MultimodalPlaceholderMetadata(placeholder_map={MODALITY: "<sound>"})
    for base in (LlamaForCausalLM, NemotronHForCausalLM):
        name = AUDEX_ARCHITECTURES[base.__name__]
        if name in MODEL_CLASS_MAPPING:
            continue

        def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None, _base=base,
                    **kwargs):
            params = kwargs.get("multimodal_params") or []
            rows = [p.multimodal_data["multimodal_embedding"] for p in params
                    if p.multimodal_data and "multimodal_embedding" in p.multimodal_data]
            if rows:
                input_ids, inputs_embeds = fuse_input_embeds(self.model.embed_tokens, input_ids, rows, **kwargs)
            return _base.forward(self, attn_metadata, input_ids=input_ids, position_ids=position_ids,
                                 inputs_embeds=inputs_embeds, **kwargs)

        cls = type(name, (base,), {"forward": forward, "multimodal_data_device_paths": ["multimodal_embedding"]})
        register_input_processor(AudexInputProcessor, model_type="audex", placeholder_metadata=placeholder)(cls)
        register_auto_model(name)(cls)
        mapper = MODEL_CLASS_MAPPER_MAPPING.get(f"{base.__name__}_HF")     # Nemotron-H renames its HF weights
        if mapper is not None:
            MODEL_CLASS_MAPPER_MAPPING[f"{name}_HF"] = mapper
