"""GPU checks of the LLM API path (TensorRT-LLM's PyTorch backend, issue 12), for a host with a CUDA GPU and
tensorrt_llm==1.2.0rc2: the Audex models registered with TensorRT-LLM, audio as multimodal embeddings, CFG twins
through per-request logits processors, on the dense and the Nemotron-H tiny backbones. Run with
``bash tests/gpu/run.sh``; every test here skips on a machine without a GPU. Written against the pinned sources and
run only on the CPU reference (audex.serving.reference_llm_api) so far: never on a GPU.

The tiny models decode in bfloat16 here (TensorRT-LLM's attention kernels take half precision); PyTorch eager runs
the same bfloat16 weights on the same GPU for the comparison."""

import threading

import pytest
import torch

from audex import config_path
from audex.export.frontend_onnx import prompt_tuning_inputs
from audex.export.hf_folder import export_hf_folder
from audex.inference.constraints import CodecConstraint
from audex.inference.decoding import AudexDecoder
from audex.inference.pipelines import AudexPipeline
from audex.inference.sampling import SamplingParams
from audex.prompts import tts_user_content
from audex.serving.llm_api_backend import LlmApiBackend, llm_api_module
from audex.serving.llm_job import LlmJob
from audex.serving.requests import ServeLimits

pytestmark = pytest.mark.gpu
LIMITS = ServeLimits(max_audio_seconds=10.0, max_new_tokens=16, max_speech_seconds=0.5, tta_seconds=0.2)
SIZES = dict(max_batch_size=8, max_input_len=1024, max_seq_len=1400, max_num_tokens=4096)


def on_gpu(model):
    return model.to("cuda", torch.bfloat16).eval()


@pytest.fixture(scope="module")
def trtllm():
    tensorrt_llm = pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM is not installed (CUDA hosts only)")
    assert tensorrt_llm.__version__ == "1.2.0rc2", f"the code is pinned to 1.2.0rc2, not {tensorrt_llm.__version__}"
    return llm_api_module("tensorrt_llm")


def backend_for(trtllm, model, folder):
    export_hf_folder(model, folder / "hf", dtype="bfloat16")
    enc = model.audio_encoder
    return LlmApiBackend.create(trtllm, folder, model.tokenizer, SIZES, LIMITS, enc.frames_per_window,
                                enc.window_seconds, max_speech_seconds=None, dtype="bfloat16",
                                free_gpu_memory_fraction=0.3)


def run(backend, *jobs, timeout=300):
    done, events = [threading.Event() for _ in jobs], [[] for _ in jobs]

    def collector(i):
        def on_event(event):
            events[i].append(event)
            if event.final:
                done[i].set()
        return on_event
    for i, job in enumerate(jobs):
        backend.submit(job, collector(i))
    for flag in done:
        assert flag.wait(timeout), "a job never finished"
    for e in events:
        assert e[-1].error is None, e[-1].error
    return [e[-1].tokens for e in events]


def asr_job(model, wav):
    pipe, tok = AudexPipeline(model), model.tokenizer
    prompt = pipe._with_audio(pipe.prompt_ids(pipe.formatter.audio_content("Transcribe the speech in the input audio")),
                              [wav], "clip")
    with torch.no_grad():
        embeds = model.encode_audio([wav])
    ids, table = prompt_tuning_inputs(prompt, tok.so_embedding, model.vocab.size, embeds)
    want = AudexDecoder.for_model(model).generate([prompt], SamplingParams(do_sample=False, max_new_tokens=8),
                                                  audio_embeds=[embeds]).token_ids[0]
    return LlmJob(ids, 8, tok.im_end, tok.pad_id, SamplingParams(do_sample=False), prompt_table=table.float().cpu()), want


def pair_jobs(model, texts, lam=3.0, max_new=10):
    pipe, tok = AudexPipeline(model), model.tokenizer
    cond, uncond = pipe._generation_prompts(tts_user_content, texts, model.vocab.speechgen_start, False)
    jobs = [LlmJob(c, max_new, tok.im_end, tok.pad_id, SamplingParams(do_sample=False, guidance_scale=lam),
                   uncond_input_ids=u, output="speech") for c, u in zip(cond, uncond)]
    want = AudexDecoder.for_model(model).generate(
        cond, SamplingParams(do_sample=False, guidance_scale=lam, max_new_tokens=max_new), uncond_prompts=uncond,
        constraint=CodecConstraint.for_task(tok, "speech", max_speech_seconds=None)).token_ids
    return jobs, want


@pytest.mark.parametrize("yaml", ["tiny.yaml", "tiny_hybrid.yaml"], ids=["dense", "nemotron_h"])
def test_llm_api_path_equals_pytorch_eager(trtllm, yaml, tone, tmp_path):
    from audex.models.audex_model import AudexModel

    torch.manual_seed(0)
    model = on_gpu(AudexModel.from_config_file(str(config_path("model", yaml))))
    backend = backend_for(trtllm, model, tmp_path)
    try:
        answers = []
        for freq, amp in ((440.0, 0.3), (1900.0, 0.9), (440.0, 0.3)):          # two different clips in a row
            job, want = asr_job(model, tone(1.0, freq, amp=amp))
            assert run(backend, job) == [want]
            answers.append(want)
        assert answers[0] != answers[1]
        jobs, want = pair_jobs(model, ["Hello there.", "A longer sentence to speak aloud."])
        assert run(backend, *jobs) == want                               # a CFG pair on a cold cache
        assert backend.stats["unguided"] == 0 and backend.stats["split"] == 0 and backend.stats["guided"] > 0
        tok = model.tokenizer
        ids = tok.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
        sampled = LlmJob(ids, 16, tok.im_end, tok.pad_id, SamplingParams(do_sample=True, top_k=50, seed=11))
        first, second = run(backend, sampled, sampled)
        assert first and first == second                                 # seeded sampling repeats
    finally:
        backend.shutdown()
