"""Talk to an Audex Triton endpoint with tritonclient (HTTP or gRPC): ASR of a WAV, TTS, TTA and chat.

Start a server first (``python scripts/serve_triton.py --model tiny.nemo``), then::

    python examples/triton_client.py --url 127.0.0.1:8000 asr --wav speech.wav
    python examples/triton_client.py --url 127.0.0.1:8001 --protocol grpc tts "Hello there." --out hello.wav
    python examples/triton_client.py --url 127.0.0.1:8000 tta "A dog barks in the distance." --out dog.wav
    python examples/triton_client.py --url 127.0.0.1:8000 chat "What is the capital of France?"

Against the GPU ensemble (``scripts/make_triton_repo.py layout=gpu``), add ``--model ensemble``; ``--stream`` plays
TTS from ``ensemble_stream`` chunk by chunk over gRPC::

    python examples/triton_client.py --url 127.0.0.1:8001 --protocol grpc --model ensemble --stream tts "Hello."
"""

from __future__ import annotations

import argparse

from audex.audio import load_audio
from audex.export.client import AudexTritonClient
from audex.inference.waveform import write_wav


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port (HTTP port for http, gRPC port for grpc)")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--model", default="audex", help="audex (CPU repository) or ensemble (GPU repository)")
    parser.add_argument("--stream", action="store_true", help="stream from <model>_stream (gRPC, GPU ensemble)")
    sub = parser.add_subparsers(dest="task", required=True)
    asr = sub.add_parser("asr", help="transcribe a WAV file")
    asr.add_argument("--wav", required=True)
    for name, what in (("tts", "text to speak"), ("tta", "caption of the sound")):
        p = sub.add_parser(name, help=f"{name.upper()}: {what} -> WAV")
        p.add_argument("text")
        p.add_argument("--out", default=f"{name}.wav")
    chat = sub.add_parser("chat", help="text chat")
    chat.add_argument("text")
    args = parser.parse_args(argv)

    client = AudexTritonClient(args.url, protocol=args.protocol, model_name=args.model)
    common = {"seed": args.seed, "max_new_tokens": args.max_new_tokens}
    if args.stream:
        import numpy as np

        audio = load_audio(args.wav).numpy() if args.task == "asr" else None
        chunks = list(client.stream(args.task, model_name=f"{args.model}_stream", text=getattr(args, "text", None),
                                    audio=audio, **common))
        if args.task in ("tts", "tta"):
            wav = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros(0, np.float32)
            path = write_wav(args.out, wav)
            print(f"wrote {path} ({wav.size / 16000:.2f} s in {len(chunks)} chunks)")
        else:
            print("".join(c.text for c in chunks))
        return
    if args.task == "asr":
        reply = client.asr(load_audio(args.wav).numpy(), **common)
        print(reply.text)
    elif args.task in ("tts", "tta"):
        reply = getattr(client, args.task)(args.text, **common)
        path = write_wav(args.out, reply.audio)
        print(f"wrote {path} ({reply.audio.size / 16000:.2f} s, finish_reason={reply.finish_reason})")
    else:
        print(client.chat(args.text, **common).text)


if __name__ == "__main__":
    main()
