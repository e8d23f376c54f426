"""The ONNX audio front end equals the PyTorch one (features, encoder, adapter) under onnxruntime, and its output used
through the prompt-table id convention gives the model's own input embeddings."""

import math

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from audex.export.frontend_onnx import WhisperLogMel, export_frontend_onnx, prompt_tuning_inputs  # noqa: E402


def clip(seconds, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    return (0.3 * torch.sin(2 * math.pi * 220 * t) + 0.05 * torch.randn(t.shape, generator=gen)).float()


def test_log_mel_equals_the_whisper_feature_extractor(tiny_model):
    enc = tiny_model.audio_encoder
    wav = clip(3.7)
    window = torch.nn.functional.pad(wav, (0, enc.window_samples - wav.numel())).unsqueeze(0)
    ours = WhisperLogMel(enc.feature_extractor)(window)
    ref, _ = enc._features([wav])
    assert ours.shape == ref.shape == (1, 128, 1000)            # 10 s tiny window at 100 mel frames / s
    torch.testing.assert_close(ours, ref.float(), atol=2e-4, rtol=0)


@pytest.fixture(scope="module")
def session(tiny_model, tmp_path_factory):
    path = export_frontend_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "frontend.onnx")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("seconds", [1.3, 10.0, 12.5])
def test_onnx_front_end_matches_pytorch(tiny_model, session, seconds):
    wav = clip(seconds, seed=int(seconds * 10))
    (onnx_out,) = session.run(None, {"audio": wav.numpy()})
    with torch.no_grad():
        [torch_out] = tiny_model.encode_audio([wav])
    assert onnx_out.shape == (tiny_model.frames_for_samples(wav.numel()), 128)   # 250 frames per 10 s window
    np.testing.assert_allclose(onnx_out, torch_out.numpy(), atol=1e-3, rtol=0)


def test_prompt_table_ids_reproduce_the_model_embeddings(tiny_model, session):
    tok, vocab = tiny_model.tokenizer, tiny_model.vocab
    clips = [clip(0.8, 1), clip(11.0, 2)]
    embeds = [torch.from_numpy(session.run(None, {"audio": c.numpy()})[0]) for c in clips]
    prompt = tok.encode("<|im_start|>user\n")
    for e in embeds:
        prompt += [tok.so_start] + [tok.so_embedding] * e.shape[0] + [tok.so_end]
    prompt += tok.encode("Describe<|im_end|>")
    ids, table = prompt_tuning_inputs(prompt, tok.so_embedding, vocab.size, embeds)
    assert table.shape == (250 + 500, 128) and max(ids) == vocab.size + 749 and tok.so_embedding not in ids
    # what the engine does: ids >= vocab_size read the prompt table, the others the embedding table
    ids_t = torch.tensor(ids)
    word = tiny_model.backbone.get_input_embeddings()(ids_t.clamp(max=vocab.size - 1))
    engine_embeds = torch.where((ids_t >= vocab.size).unsqueeze(1), table[(ids_t - vocab.size).clamp(min=0)], word)
    with torch.no_grad():
        expected = tiny_model.embed_inputs(torch.tensor([prompt]), embeds)[0]
    torch.testing.assert_close(engine_embeds, expected)
    with pytest.raises(ValueError, match="frames_for_samples"):
        prompt_tuning_inputs(prompt[:-40], tok.so_embedding, vocab.size, embeds)
