"""The Audex backbone as a plain Hugging Face folder: what TensorRT-LLM's LLM API / PyTorch backend loads.

``hf/`` holds ``config.json`` + ``model.safetensors`` (``save_pretrained`` of the transformers causal LM, vocabulary
already extended to 205,312 rows), the text tokenizer files, and ``audex_vocab.json`` (the id layout of
:class:`~audex.vocab.AudexVocab`). Prompts are given to TensorRT-LLM as token ids (``skip_tokenizer_init=True``):
codec ids live above the text tokenizer, so only Audex's own tokenizer can write a whole Audex prompt.

Example::

    >>> export_hf_folder(model, "export/hf")
    >>> lm = AutoModelForCausalLM.from_pretrained("export/hf")      # same logits as model(input_ids).logits
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch


def export_hf_folder(model, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Write ``out_dir`` (see the module docstring). ``dtype`` (e.g. ``"bfloat16"``) casts the saved weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = model.backbone
    if dtype is not None:
        lm = copy.deepcopy(lm).to(getattr(torch, dtype))
    lm.save_pretrained(out, safe_serialization=True)
    model.tokenizer.save(out)
    vocab = model.vocab
    (out / "audex_export.json").write_text(json.dumps({
        "vocab_size": vocab.size,
        "text_vocab_size": vocab.text_vocab_size,
        "so_embedding_id": model.tokenizer.so_embedding,
        "end_id": model.tokenizer.im_end,
        "pad_id": model.tokenizer.pad_id,
        "speechgen_start": vocab.speechgen_start,
        "audiogen_start": vocab.audiogen_start,
        "hidden_size": int(model.backbone.config.hidden_size),
        **({"frames_per_window": int(model.audio_encoder.frames_per_window),
            "window_seconds": float(model.audio_encoder.window_seconds)} if model.audio_encoder is not None else {}),
        "prompt_table_convention": "audio frames are fed as ids vocab_size + row of the prompt_embedding_table",
    }, indent=2))
    return out
