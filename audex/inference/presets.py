"""Task presets (prompt format, output grammar, mode, sampling) loaded from ``conf/infer/presets.yaml``.

The YAML holds the paper's numbers (ASR/AST greedy; audio QA top-p 0.9, T 0.7; TTS top-k 80, T 0.1,
lambda 1.5; TTA top-k 80, T 1.0, lambda 3, 10 s); this module only reads and validates them.

Example::

    >>> presets = load_presets()
    >>> presets["tts"].sampling
    SamplingParams(do_sample=True, temperature=0.1, top_k=80, top_p=None, guidance_scale=1.5, ...)
    >>> presets = load_presets(overrides=["tta.sampling.guidance_scale=5.0"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from audex import config_path
from audex.inference.sampling import SamplingParams

DEFAULT_PRESETS_PATH = config_path("infer", "presets.yaml")
OUTPUTS = ("text", "speech", "audio")
_TASK_KEYS = {"output", "thinking", "sampling", "max_speech_seconds", "long_form_max_chars", "audio_seconds"}


@dataclass(frozen=True)
class TaskPreset:
    """How one task is decoded; its prompt is the task's own (:mod:`audex.prompts`, see the pipelines)."""

    name: str
    output: str = "text"
    thinking: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_speech_seconds: float | None = None
    long_form_max_chars: int | None = None
    audio_seconds: float | None = None

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"preset {self.name!r}: output must be one of {OUTPUTS}, got {self.output!r}")
        if self.output == "audio" and not self.audio_seconds:
            raise ValueError(f"preset {self.name!r}: an audio-generating preset needs audio_seconds (10 in the paper)")


@dataclass(frozen=True)
class SpeechToSpeechPreset:
    """The A.8 cascade: the task preset that runs each step (transcribe, reason, speak)."""

    transcribe: str = "asr"
    reason: str = "chat"
    speak: str = "tts"


class Presets(dict):
    """``name -> TaskPreset``, plus the speech-to-speech cascade in :attr:`s2s`."""

    s2s: SpeechToSpeechPreset | None = None

    def __getitem__(self, name: str) -> TaskPreset:
        try:
            return super().__getitem__(name)
        except KeyError:
            raise KeyError(f"no inference preset {name!r}; known: {sorted(self)} (see conf/infer/presets.yaml)") from None


def _task_preset(name: str, node: dict[str, Any]) -> TaskPreset:
    unknown = set(node) - _TASK_KEYS
    if unknown:
        raise ValueError(f"preset {name!r} has unknown keys {sorted(unknown)}; allowed: {sorted(_TASK_KEYS)}")
    sampling = dict(node.get("sampling") or {})
    try:
        params = SamplingParams(**sampling)
    except TypeError as e:
        raise ValueError(f"preset {name!r}: bad sampling keys ({e})") from None
    return TaskPreset(name=name, sampling=params, **{k: v for k, v in node.items() if k != "sampling"})


def presets_from_config(cfg: DictConfig | dict) -> Presets:
    """Build :class:`Presets` from the ``presets`` node of a config (e.g. ``conf/infer.yaml``)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    presets = Presets()
    s2s = data.pop("s2s", None)
    for name, node in data.items():
        presets[name] = _task_preset(name, dict(node))
    if s2s is not None:
        steps = dict(s2s.get("steps") or {})
        extra = set(steps) - {"transcribe", "reason", "speak"}
        if extra:
            raise ValueError(f"s2s.steps has unknown steps {sorted(extra)}; the cascade is transcribe, reason, speak")
        for step, preset_name in steps.items():
            if preset_name not in presets:
                raise ValueError(f"s2s.steps.{step}={preset_name!r} is not a preset; known: {sorted(presets)}")
        unknown = set(s2s) - {"steps"}
        if unknown:
            raise ValueError(f"s2s has unknown keys {sorted(unknown)}; it takes only 'steps'")
        presets.s2s = SpeechToSpeechPreset(**steps)
    return presets


def load_presets(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Presets:
    """Read the presets YAML (default ``conf/infer/presets.yaml``); ``overrides`` are dotlist strings."""
    path = Path(path) if path is not None else DEFAULT_PRESETS_PATH
    if not path.exists():
        raise FileNotFoundError(f"presets file {str(path)!r} does not exist: pass the path of a presets YAML "
                                "(the repository's is conf/infer/presets.yaml)")
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return presets_from_config(cfg)
