"""AudexModel assembly (tiny config): audio windows, embedding merge, vocabulary extension, .nemo round trip."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from audex.audio import AudioInputError, to_model_audio
from audex.modules.audio_encoder import AudexAudioEncoder
from audex.modules.backbone import AudexBackbone

TINY_ENC = dict(num_mel_bins=128, num_hidden_layers=1, num_attention_heads=2, hidden_size=32, intermediate_size=64)


@pytest.mark.parametrize("seconds,windows", [(0.5, 1), (30.0, 1), (30.01, 2), (61.0, 3)])
def test_750_frames_per_30s_window(seconds, windows):
    enc = AudexAudioEncoder(config=TINY_ENC, window_seconds=30.0)
    assert enc.frames_per_window == 750
    n = int(seconds * 16000)
    assert enc.frames_for_samples(n) == windows * 750
    out = enc([torch.randn(n) * 0.1])
    assert out[0].shape == (windows * 750, 32)


def test_prompt_embedding_merge_places_frames_at_placeholders(tiny_model):
    m, tok = tiny_model, tiny_model.tokenizer
    wavs = [torch.randn(16000 * 2) * 0.1, torch.randn(16000 * 11) * 0.1, torch.randn(8000) * 0.1]
    n = [m.frames_for_samples(w.numel()) for w in wavs]
    assert n == [250, 500, 250]  # tiny windows are 10 s at 25 Hz
    so = lambda k: "<so_start>" + "<so_embedding>" * k + "<so_end>"
    rows = [
        tok.encode(f"<|im_start|>user\nA {so(n[0])} and {so(n[1])}<|im_end|>"),
        tok.encode("<|im_start|>user\nno audio here<|im_end|>"),
        tok.encode(f"<|im_start|>user\n{so(n[2])}<|im_end|>"),
    ]
    L = max(map(len, rows))
    ids = torch.full((3, L), tok.pad_id)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    audio = m.encode_audio(wavs)
    emb = m.embed_inputs(ids, audio)
    text = m.backbone.get_input_embeddings()(ids)
    is_so = ids == tok.so_embedding
    assert torch.equal(emb[~is_so], text[~is_so])  # text rows untouched
    pos0 = is_so[0].nonzero().reshape(-1)
    assert torch.equal(emb[0, pos0[: n[0]]], audio[0])
    assert torch.equal(emb[0, pos0[n[0]:]], audio[1])
    assert torch.equal(emb[2, is_so[2]], audio[2])
    logits = m(input_ids=ids, audio_embeds=audio).logits
    assert logits.shape == (3, L, m.vocab.size) == (3, L, 1536)
    with pytest.raises(ValueError, match="so_embedding"):
        m.embed_inputs(ids, audio[:2])


def test_text_rows_kept_when_vocabulary_extended():
    cfg = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(1)
    plain = AudexBackbone(model_type="llama", config=cfg)
    torch.manual_seed(1)
    ext = AudexBackbone(model_type="llama", config=cfg, vocab_size=1024)
    w0, w1 = plain.lm.get_input_embeddings().weight, ext.lm.get_input_embeddings().weight
    assert w1.shape == (1024, 32)
    assert torch.equal(w1[:300], w0)
    new = w1[300:]
    assert abs(new.std().item() - 0.02) < 0.002 and abs(new.mean().item()) < 0.002
    h0, h1 = plain.lm.get_output_embeddings().weight, ext.lm.get_output_embeddings().weight
    assert torch.equal(h1[:300], h0) and h1.shape == (1024, 32)
    ids = torch.tensor([[1, 2, 299]])
    assert ext.lm(input_ids=ids).logits.shape[-1] == 1024


def test_packed_mask_blocks_cross_sample_attention(tiny_model):
    m = tiny_model
    a = torch.tensor(m.tokenizer.encode("<|im_start|>user\nHello there<|im_end|>"))
    b = torch.tensor(m.tokenizer.encode("<|im_start|>assistant\nGood day<|im_end|>"))
    packed = torch.cat([a, b]).unsqueeze(0)
    sample_ids = torch.tensor([[0] * len(a) + [1] * len(b)])
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))]).unsqueeze(0)
    with torch.no_grad():
        lp = m(input_ids=packed, sample_ids=sample_ids, position_ids=pos).logits
        la = m(input_ids=a.unsqueeze(0)).logits
        lb = m(input_ids=b.unsqueeze(0)).logits
    torch.testing.assert_close(lp[0, : len(a)], la[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp[0, len(a):], lb[0], atol=1e-5, rtol=1e-5)


def test_save_restore_bit_exact(tiny_model, tmp_path):
    path = tmp_path / "tiny.nemo"
    tiny_model.save_to(str(path))
    from nemo.core import ModelPT

    restored = ModelPT.restore_from(str(path))
    sd0, sd1 = tiny_model.state_dict(), restored.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    text = "<|im_start|>user\nHello, how are you today?<|im_end|>"
    assert restored.tokenizer.encode(text) == tiny_model.tokenizer.encode(text)
    assert restored.vocab == tiny_model.vocab
    ids = torch.tensor([tiny_model.tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.equal(restored.eval()(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


@pytest.mark.slow
def test_generic_restore_in_fresh_process(tiny_model, tmp_path):
    """A process that never imports audex restores the .nemo through NeMo's ModelPT alone."""
    path = tmp_path / "tiny.nemo"
    tiny_model.save_to(str(path))
    ids = tiny_model.tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    with torch.no_grad():
        ref = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1, :5].tolist()
    code = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)  # same reduction order as the parent (conftest), so logits match bit for bit
        from nemo.core import ModelPT
        assert "audex" not in sys.modules
        m = ModelPT.restore_from({str(path)!r}).eval()
        with torch.no_grad():
            out = m(input_ids=torch.tensor([{ids}])).logits[0, -1, :5].tolist()
        print(type(m).__name__, out == {ref})
    """)
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "AudexModel True"


def test_save_pretrained_folder_round_trip(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from audex.models.audex_model import AudexModel

    folder = tiny_model.save_pretrained(str(tmp_path / "hf"))
    assert (folder / "backbone" / "model.safetensors").exists() and (folder / "audex_config.yaml").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(folder / "backbone"), local_files_only=True).eval()
    ids = torch.tensor([tiny_model.tokenizer.encode("<|im_start|>user\nHi<|im_end|>")])
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, tiny_model(input_ids=ids).logits)
    again = AudexModel.from_pretrained(str(folder))
    sd0, sd1 = tiny_model.state_dict(), again.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def test_audio_input_handling():
    sr = 44100
    t = torch.arange(sr) / sr
    stereo = torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 440 * t)])
    mono16 = to_model_audio(stereo, sr, name="clip.wav")
    assert mono16.dim() == 1 and abs(mono16.numel() - 16000) <= 1
    assert to_model_audio((stereo.T.numpy() * 32767).astype("int16"), sr).dim() == 1  # [T, C] int16
    with pytest.raises(AudioInputError, match="clip.wav: the audio is empty"):
        to_model_audio(torch.zeros(0), 16000, name="clip.wav")
    with pytest.raises(AudioInputError, match="NaN or inf"):
        to_model_audio(torch.tensor([0.0, float("nan")]), 16000, name="x")
    with pytest.raises(AudioInputError, match="expected a waveform array"):
        to_model_audio("hello", 16000, name="req")
    with pytest.raises(AudioInputError, match="shape"):
        to_model_audio(torch.zeros(2, 3, 4), 16000)
    with pytest.raises(AudioInputError, match="sample_rate"):
        to_model_audio(torch.zeros(10), 0)


def test_load_audio_errors(tmp_path):
    from audex.audio import load_audio

    with pytest.raises(AudioInputError, match="file not found"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    with pytest.raises(AudioInputError, match="not a readable audio file"):
        load_audio(bad)


def test_model_config_errors(tiny_yaml):
    from audex.models.audex_model import AudexModel

    with pytest.raises(ValueError, match="text_vocab_size"):
        AudexModel.from_config_file(str(tiny_yaml), **{"backbone.config.vocab_size": 640})
    with pytest.raises(Exception, match="does not exist"):
        AudexModel.from_config_file(str(tiny_yaml), **{"backbone.pretrained_path": "/nonexistent/folder"})


def _two_samples_in_one_row(tok):
    """Two chat samples ``a``, ``b`` and the packed row holding both (+3 padding): ids, sample ids, positions."""
    a = torch.tensor(tok.encode("<|im_start|>user\nHello there, how are you?<|im_end|>"))
    b = torch.tensor(tok.encode("<|im_start|>assistant\nFine, thank you.<|im_end|>"))
    packed = torch.cat([a, b, torch.full((3,), tok.pad_id)]).unsqueeze(0)
    sample_ids = torch.tensor([[0] * len(a) + [1] * len(b) + [-1] * 3])
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b)), torch.zeros(3, dtype=torch.long)]).unsqueeze(0)
    return a, b, packed, sample_ids, pos


def test_tiny_hybrid_packed_rows_equal_separate_samples(tiny_yaml, monkeypatch):
    """Nemotron-H: attention and the Mamba state both restart at packed-sample boundaries."""
    from audex.models.audex_model import AudexModel

    m = AudexModel.from_config_file(str(tiny_yaml.parent / "tiny_hybrid.yaml")).eval()
    assert m.has_recurrent_layers and m.backbone.config.n_routed_experts == 8
    a, b, packed, sample_ids, pos = _two_samples_in_one_row(m.tokenizer)
    with torch.no_grad():
        lp = m(input_ids=packed, sample_ids=sample_ids, position_ids=pos).logits
        la = m(input_ids=a.unsqueeze(0)).logits
        lb = m(input_ids=b.unsqueeze(0)).logits
        # the same attention mask but no Mamba reset: b would see a through the recurrent state
        monkeypatch.setattr("audex.models.audex_model.packed_segments", lambda ids: None)
        leak = m(input_ids=packed, sample_ids=sample_ids, position_ids=pos).logits
    torch.testing.assert_close(lp[0, : len(a)], la[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp[0, len(a): len(a) + len(b)], lb[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leak[0, len(a): len(a) + len(b)], lb[0], atol=1e-3)


def test_one_loader_for_nemo_folder_and_yaml(tiny_model, tiny_yaml, tmp_path):
    """audex.models.checkpoint.load_model: a .nemo and a pretrained folder give the same weights; the dtype
    casts the LLM only; a folder or a file that is no checkpoint is named with what to give instead."""
    from audex.models.checkpoint import CorruptCheckpointError, load_model

    tiny_model.save_to(str(tmp_path / "tiny.nemo"))
    folder = tiny_model.save_pretrained(str(tmp_path / "hf"))
    ids = torch.tensor([tiny_model.tokenizer.encode("<|im_start|>user\nHi<|im_end|>")])
    with torch.no_grad():
        reference = tiny_model(input_ids=ids).logits
        for path in (tmp_path / "tiny.nemo", folder):
            model = load_model(path, device="cpu")
            assert not model.training and model.device.type == "cpu"
            assert torch.equal(model(input_ids=ids).logits, reference)
    half = load_model(folder, device="cpu", dtype="bfloat16")
    assert half.backbone.dtype == torch.bfloat16 and half.adapter.linear_1.weight.dtype == torch.float32
    assert load_model(tiny_yaml, device="cpu").vocab.size == tiny_model.vocab.size  # random weights, same layout
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CorruptCheckpointError, match="without audex_config.yaml"):
        load_model(tmp_path / "empty_dir")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a .nemo file, a pretrained folder or a model YAML"):
        load_model(tmp_path / "weights.bin")


def test_varlen_attention_and_mamba_reset_together(tiny_yaml):
    """Packed rows through AudexModel.forward: with varlen attention on (what training uses) a hybrid backbone
    still restarts its Mamba state per sample, so a packed row equals its samples run alone (before the model
    owned its training step, the varlen path bypassed forward and skipped the Mamba reset)."""
    from audex.models.audex_model import AudexModel

    m = AudexModel.from_config_file(str(tiny_yaml.parent / "tiny_hybrid.yaml")).eval()
    assert m.use_packed_attention("varlen")  # Nemotron-H's attention layers run SDPA: varlen is on
    a, b, packed, sample_ids, pos = _two_samples_in_one_row(m.tokenizer)
    with torch.no_grad():
        lp = m(input_ids=packed, sample_ids=sample_ids, position_ids=pos).logits
        la, lb = m(input_ids=a.unsqueeze(0)).logits, m(input_ids=b.unsqueeze(0)).logits
    torch.testing.assert_close(lp[0, : len(a)], la[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp[0, len(a): len(a) + len(b)], lb[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'varlen' or 'dense'"):
        m.use_packed_attention("flash")
