"""Talk to an Audex Triton endpoint with tritonclient (HTTP or gRPC): ASR of a WAV, TTS, TTA and chat.

Start a server first (``audex-serve model_path=tiny.nemo``), then::

    audex-client task=asr wav=speech.wav
    audex-client url=127.0.0.1:8001 protocol=grpc task=tts text="Hello there." out=hello.wav
    audex-client task=tta text="A dog barks in the distance." out=dog.wav
    audex-client task=chat text="What is the capital of France?"
    audex-client task=tts text="Good evening." voice=ref.wav voice_text="He hoped there would be stew."
    audex-client task=chat text="Weather in Paris?" tools=tools.json     # prints the parsed tool calls as JSON

Against the GPU ensemble (``audex-triton-repo layout=gpu``) add ``model=ensemble``; ``stream=true`` plays TTS from
``ensemble_stream`` chunk by chunk over gRPC. Config: ``client.yaml``.
"""

import json

import numpy as np
from omegaconf import DictConfig

from audex import CONF_DIR
from audex.audio import load_audio
from audex.cli.light_runner import hydra_runner
from audex.inference.waveform import write_wav
from audex.serving.client import AudexTritonClient
from audex.tasks import SERVED_TASKS, TASKS
from audex.tool_calls import load_tools


def _inputs(cfg: DictConfig) -> tuple[str | None, np.ndarray | None]:
    if cfg.task not in SERVED_TASKS:
        raise SystemExit(f"task={cfg.task!r} is not served; use one of {list(SERVED_TASKS)}")
    spec = TASKS[cfg.task]
    if spec.audio_in and not cfg.wav:
        raise SystemExit(f"task={cfg.task} needs wav=<a WAV file>")
    if spec.field and not cfg.text:
        raise SystemExit(f"task={cfg.task} needs text=<the {spec.field}>")
    return (cfg.text or None), (load_audio(cfg.wav).numpy() if spec.audio_in else None)


def _options(cfg: DictConfig) -> dict:
    """The voice prompt of ``tts`` and the tool definitions of ``chat``, checked here with the CLI's names."""
    out: dict = {}
    if cfg.voice or cfg.voice_text:
        if cfg.task != "tts" or not (cfg.voice and cfg.voice_text):
            raise SystemExit("voice= (a reference WAV) and voice_text= (its transcript) go together, with task=tts")
        out.update(voice=load_audio(cfg.voice).numpy(), voice_text=str(cfg.voice_text))
    if cfg.tools:
        if cfg.task != "chat":
            raise SystemExit("tools= (a JSON file of tool definitions) goes with task=chat")
        try:
            out["tools"] = load_tools(str(cfg.tools))
        except ValueError as e:
            raise SystemExit(str(e)) from None
    return out


def _write(cfg: DictConfig, audio: np.ndarray, what: str) -> None:
    path = write_wav(cfg.out or f"{cfg.task}.wav", audio)
    print(f"wrote {path} ({audio.size / 16000:.2f} s, {what})")


@hydra_runner(config_path=str(CONF_DIR), config_name="client")
def main(cfg: DictConfig) -> None:
    text, audio = _inputs(cfg)
    generates_audio = TASKS[cfg.task].output in ("speech", "audio")
    common = {"seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, **_options(cfg)}
    with AudexTritonClient(cfg.url, protocol=cfg.protocol, model_name=cfg.model) as client:
        client.wait_until_ready(float(cfg.wait_s))
        if cfg.stream:
            chunks = list(client.stream(cfg.task, model_name=f"{cfg.model}_stream", text=text, audio=audio, **common))
            if generates_audio:
                wav = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros(0, np.float32)
                _write(cfg, wav, f"{len(chunks)} chunks")
            else:
                print("".join(c.text for c in chunks))
            return
        reply = client.infer(cfg.task, text=text, audio=audio, **common)
    if generates_audio:
        _write(cfg, reply.audio, f"finish_reason={reply.finish_reason}")
    elif reply.tool_calls is not None:
        print(json.dumps({"text": reply.text, "tool_calls": reply.tool_calls,
                          **({"tool_call_error": reply.tool_call_error} if reply.tool_call_error else {})}))
    else:
        print(reply.text)
