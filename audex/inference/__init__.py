"""Generation with an Audex model: one piece per file.

* :mod:`~audex.inference.decoding` - the KV-cached batched loop (:class:`AudexDecoder`)
* :mod:`~audex.inference.sampling` - greedy / temperature / top-k / top-p with a seed (:class:`SamplingParams`)
* :mod:`~audex.inference.cfg` - classifier-free guidance on paired rows (:func:`cfg_mix`, :class:`CfgPairBatch`)
* :mod:`~audex.inference.constraints` - the token grammar of speech and audio spans (:class:`CodecConstraint`)
* :mod:`~audex.inference.presets` - the paper's decoding presets from ``conf/infer/presets.yaml``
* :mod:`~audex.inference.pipelines` - ASR, AST, audio QA, chat, TTS, TTA, speech-to-speech (:class:`AudexPipeline`)
* :mod:`~audex.inference.waveform` - codec tokens -> 16 kHz waveforms -> WAV files
* :mod:`~audex.inference.runner` - batch inference with per-input error reports (``examples/audex_infer.py``)

Import the pipeline and the runner from their modules (``from audex.inference.pipelines import AudexPipeline``);
this package re-exports only the light pieces, so that ``from audex.inference import cfg_mix`` stays cheap.
"""

from audex.inference.cfg import CfgPairBatch, cfg_mix
from audex.inference.constraints import CodecConstraint
from audex.inference.decoding import AudexDecoder, GenerationOutput
from audex.inference.sampling import SamplingParams, TokenSampler

__all__ = ["AudexDecoder", "CfgPairBatch", "CodecConstraint", "GenerationOutput", "SamplingParams", "TokenSampler",
           "cfg_mix"]
