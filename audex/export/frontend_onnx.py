"""The audio front end (log-mel features + AF-Whisper encoder + adapter) as one ONNX graph: audio -> prompt table.

``frontend.onnx`` takes one 16 kHz mono clip ``audio [T]`` (float32, any length) and returns
``prompt_embeddings [N, d_llm]`` with ``N = frames_for_samples(T)`` (750 per 30 s window): exactly the rows
:meth:`AudexModel.encode_audio` gives, windowing and last-window zero padding done inside the graph.

Prompt-table convention (TensorRT-LLM prompt tuning): the prompt keeps ``<so_start>`` and ``<so_end>``, and the N
``<so_embedding>`` ids of the clips become *fake* ids ``vocab_size + k`` (k = 0, 1, ... counting the frames of all
clips of the prompt in order); the engine looks ids ``>= vocab_size`` up in the request's ``prompt_embedding_table``
(row ``id - vocab_size``) instead of the vocabulary, with ``prompt_vocab_size = N_total``. The engine therefore
needs ``--max_prompt_embedding_table_size`` >= the frames of a batch (``trtllm-build``). :func:`prompt_tuning_inputs`
builds both tensors.

Why the log-mel is written here: ``WhisperFeatureExtractor`` computes it in NumPy (not traceable) and its torch path
uses complex ``torch.stft``, which the ONNX exporter does not take; :class:`WhisperLogMel` is the same computation
(Hann window, n_fft 400, hop 160, centre reflect padding, power, the extractor's own mel filters, log10 floor 1e-10,
max - 8 clamp, (x + 4) / 4) with the DFT as a strided convolution, and the test checks it against the extractor.

Example::

    >>> export_frontend_onnx(model, "export/frontend.onnx")
    >>> sess = onnxruntime.InferenceSession("export/frontend.onnx")
    >>> table = sess.run(None, {"audio": wav.numpy()})[0]          # [N, d_llm]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn


class WhisperLogMel(nn.Module):
    """Whisper log-mel of padded windows ``[W, S]`` -> ``[W, n_mels, S / hop]`` (see the module docstring)."""

    def __init__(self, feature_extractor):
        super().__init__()
        n_fft, self.hop = int(feature_extractor.n_fft), int(feature_extractor.hop_length)
        self.n_fft = n_fft
        n = torch.arange(n_fft, dtype=torch.float64)
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)  # periodic Hann, as audio_utils.window_function
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64).unsqueeze(1)
        angle = 2 * math.pi * k * n / n_fft
        self.register_buffer("dft_real", (torch.cos(angle) * window).float().unsqueeze(1), persistent=False)
        self.register_buffer("dft_imag", (-torch.sin(angle) * window).float().unsqueeze(1), persistent=False)
        self.register_buffer("mel_filters", torch.as_tensor(np.asarray(feature_extractor.mel_filters), dtype=torch.float32),
                             persistent=False)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(windows.unsqueeze(1), (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        power = nn.functional.conv1d(x, self.dft_real, stride=self.hop) ** 2 + \
            nn.functional.conv1d(x, self.dft_imag, stride=self.hop) ** 2        # [W, n_fft/2+1, frames+1]
        mel = torch.matmul(self.mel_filters.t(), power[..., :-1])
        log_spec = torch.log10(torch.clamp(mel, min=1e-10))
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


class AudexFrontEnd(nn.Module):
    """``audio [T]`` -> ``prompt_embeddings [N, d_llm]`` with the model's encoder and adapter (frozen, eval)."""

    def __init__(self, model):
        super().__init__()
        enc = model.audio_encoder
        if enc is None:
            raise ValueError("this model has no audio encoder (model.audio_encoder is null): nothing to export")
        self.window = int(enc.window_samples)
        self.hop = int(enc.feature_extractor.hop_length)
        self.log_mel = WhisperLogMel(enc.feature_extractor)
        self.encoder = enc.encoder
        self.adapter = model.adapter
        self.hidden = int(enc.hidden_size)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        total = audio.shape[0]
        n_windows = (total + self.window - 1) // self.window
        padded = nn.functional.pad(audio, (0, n_windows * self.window - total))
        windows = padded.reshape(-1, self.window)
        starts = torch.arange(windows.shape[0], device=audio.device) * self.window
        valid = torch.clamp(total - starts, max=self.window)                     # real samples per window
        frame_starts = torch.arange(self.window // self.hop, device=audio.device) * self.hop
        mask = (frame_starts.unsqueeze(0) < valid.unsqueeze(1)).long()           # the extractor's attention_mask
        feats = self.encoder(input_features=self.log_mel(windows), input_features_mask=mask).last_hidden_state
        return self.adapter(feats.reshape(-1, self.hidden))


def export_frontend_onnx(model, path: str | Path, opset: int = 17) -> Path:
    """Export :class:`AudexFrontEnd` (eager attention, so that the graph has no SDPA op) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    front = AudexFrontEnd(model).eval()
    previous = front.encoder.config._attn_implementation
    front.encoder.config._attn_implementation = "eager"
    try:
        example = torch.zeros(int(front.window * 1.5))
        with torch.no_grad():
            torch.onnx.export(front, (example,), str(path), input_names=["audio"], output_names=["prompt_embeddings"],
                              dynamic_axes={"audio": {0: "samples"}, "prompt_embeddings": {0: "frames"}},
                              opset_version=opset, dynamo=False)
    finally:
        front.encoder.config._attn_implementation = previous
    return path


def prompt_tuning_inputs(prompt_ids: Sequence[int], so_embedding_id: int, vocab_size: int,
                         clip_embeddings: Sequence[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """``<so_embedding>`` runs -> fake ids ``vocab_size + k``, and the prompt table ``[N_total, d]`` (see the module
    docstring). The runs must match the clips' frame counts, in order."""
    ids = [int(t) for t in prompt_ids]
    positions = [i for i, t in enumerate(ids) if t == so_embedding_id]
    total = sum(int(e.shape[0]) for e in clip_embeddings)
    if len(positions) != total:
        raise ValueError(f"the prompt has {len(positions)} <so_embedding> ids but the clips give {total} frames: "
                         "expand each <sound> to frames_for_samples(len(audio)) placeholders")
    for k, pos in enumerate(positions):
        ids[pos] = vocab_size + k
    table = torch.cat(list(clip_embeddings), 0) if clip_embeddings else torch.zeros(0, 0)
    return ids, table
