"""Generation with an Audex model: one piece per file.

* :mod:`~audex.inference.decoding` - the KV-cached batched loop (:class:`AudexDecoder`)
* :mod:`~audex.inference.sampling` - greedy / temperature / top-k / top-p with a seed (:class:`SamplingParams`)
* :mod:`~audex.inference.cfg` - classifier-free guidance on paired rows (:func:`cfg_mix`, :class:`CfgPairBatch`)
* :mod:`~audex.inference.constraints` - the token grammar of speech and audio spans (:class:`CodecConstraint`)
* :mod:`~audex.inference.presets` - the paper's decoding presets from ``conf/infer/presets.yaml``
* :mod:`~audex.inference.pipelines` - ASR, AST, audio QA, chat, TTS, TTA, speech-to-speech (:class:`AudexPipeline`)
* :mod:`~audex.inference.waveform` - codec tokens -> 16 kHz waveforms -> WAV files
* :mod:`~audex.inference.runner` - batch inference with per-input error reports (``examples/audex_infer.py``)

The pipeline and runner pull in the data stack (NeMo prompt formats, Lhotse); they load on first access, so
that ``from audex.inference import cfg_mix`` stays light (the TensorRT-LLM logits post-processor uses it).
"""

from audex.inference.cfg import CfgPairBatch, cfg_mix
from audex.inference.constraints import CodecConstraint
from audex.inference.decoding import AudexDecoder, GenerationOutput
from audex.inference.sampling import SamplingParams, TokenSampler

_LAZY = {
    "AudexPipeline": "audex.inference.pipelines",
    "load_presets": "audex.inference.presets",
    "run_inference": "audex.inference.runner",
    "load_model": "audex.inference.runner",
}

__all__ = ["AudexDecoder", "CfgPairBatch", "CodecConstraint", "GenerationOutput", "SamplingParams", "TokenSampler",
           "cfg_mix", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'audex.inference' has no attribute {name!r}")
