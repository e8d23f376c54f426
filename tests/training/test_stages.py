"""Stage freezing (Table 3, appendix C.1), the optimizer groups and init_from between stages."""

import pytest
import torch
from omegaconf import open_dict

from audex.parts.losses import IGNORE_INDEX
from audex.parts.optim import build_optimizer_and_scheduler
from audex.training.stages import apply_stage, load_init_weights


@pytest.fixture
def model(tiny_yaml):
    from audex.models.audex_model import AudexModel

    torch.manual_seed(0)
    m = AudexModel.from_config_file(str(tiny_yaml))
    with open_dict(m._cfg):
        m._cfg.loss = {"reduction": "square_averaged"}
    return m.train()


def _batch(model, tone):
    """Two packed rows: an audio QA-like sample (audio in, text out), a TTS-like sample (codec tokens out)
    and a text sample; labels on the answers only."""
    tok, vocab = model.tokenizer, model.vocab
    wav = tone(1.0, 440.0)
    n = model.frames_for_samples(wav.numel())
    q = tok.encode("<|im_start|>user\nWhat is it?")
    qa = q + [tok.so_start] + [tok.so_embedding] * n + [tok.so_end] + tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    qa_ans = tok.encode("A tone.<|im_end|>")
    tts_prompt = tok.encode("<|im_start|>user\nGenerate speech for this transcription. Hi<|im_end|>\n<|im_start|>assistant\n")
    tts_ans = [vocab.speechgen_start] + vocab.speech_codes_to_ids(torch.arange(20) * 7 % 256).tolist() + [vocab.speechgen_end]
    text_prompt = tok.encode("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n")
    text_ans = tok.encode("Four.<|im_end|>")
    rows = [[(qa, qa_ans)], [(tts_prompt, tts_ans), (text_prompt, text_ans)]]
    L = max(sum(len(p) + len(a) for p, a in r) for r in rows)
    ids = torch.full((2, L), tok.pad_id)
    labels = torch.full((2, L), IGNORE_INDEX)
    sids = torch.full((2, L), -1)
    pos = torch.zeros(2, L, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for j, (p, a) in enumerate(row):
            seq = p + a
            ids[b, at:at + len(seq)] = torch.tensor(seq)
            labels[b, at + len(p):at + len(seq)] = torch.tensor(a)
            sids[b, at:at + len(seq)] = j
            pos[b, at:at + len(seq)] = torch.arange(len(seq))
            at += len(seq)
    return {"input_ids": ids, "labels": labels, "sample_ids": sids, "position_ids": pos, "audios": [wav]}


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stage1_keeps_text_rows_and_backbone_bit_identical(model, tone):
    report = apply_stage(model, {"name": "stage1", "trainable": ["adapter", "audio_token_rows"]})
    vocab = model.vocab
    assert report.row_masked == {"llm.lm.model.embed_tokens.weight": vocab.size - vocab.text_vocab_size,
                                 "llm.lm.lm_head.weight": vocab.size - vocab.text_vocab_size}
    # weight decay > 0 on purpose: AdamW must still leave frozen rows untouched
    optim_cfg = {"name": "adamw", "lr": 2e-3, "betas": [0.9, 0.999], "weight_decay": 0.1,
                 "sched": {"name": "CosineAnnealing", "warmup_ratio": 0.05, "min_lr": 1e-5}}
    optimizer, sched = build_optimizer_and_scheduler(model, optim_cfg, max_steps=10)
    before = _snapshot(model)
    batch = _batch(model, tone)
    for _ in range(3):
        loss, _ = model.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        sched["scheduler"].step()
    after = _snapshot(model)
    T = vocab.text_vocab_size
    for name in ("llm.lm.model.embed_tokens.weight", "llm.lm.lm_head.weight"):
        assert torch.equal(after[name][:T], before[name][:T]), f"text rows of {name} moved"
        assert not torch.equal(after[name][T:], before[name][T:]), f"audio rows of {name} did not learn"
    used_speech = vocab.speech_codes_to_ids(torch.arange(20) * 7 % 256)
    assert not torch.equal(after["llm.lm.model.embed_tokens.weight"][used_speech],
                           before["llm.lm.model.embed_tokens.weight"][used_speech])
    for name, value in after.items():
        if name.startswith(("llm.",)) and name not in ("llm.lm.model.embed_tokens.weight", "llm.lm.lm_head.weight"):
            assert torch.equal(value, before[name]), f"backbone weight {name} changed in stage1"
        if name.startswith(("audio_encoder.", "speech_codec.", "audio_codec.")):
            assert torch.equal(value, before[name]), f"frozen {name} changed in stage1"
    assert all(not torch.equal(after[k], before[k]) for k in after if k.startswith("adapter."))


def test_stage_trainable_sets_follow_table3(model):
    def trainable(prefix):
        return {p.requires_grad for n, p in model.named_parameters() if n.startswith(prefix)}

    apply_stage(model, {"name": "stage2", "trainable": ["llm"]})
    assert trainable("llm.") == {True} and trainable("adapter.") == {False} and trainable("audio_encoder.") == {False}
    assert not hasattr(model.backbone.get_input_embeddings().weight, "audex_row_mask")
    apply_stage(model, {"name": "stage3", "trainable": ["adapter", "llm"]})
    assert trainable("llm.") == {True} and trainable("adapter.") == {True} and trainable("audio_encoder.") == {False}
    assert trainable("speech_codec.") == {False} and trainable("audio_codec.") == {False}
    # idempotent: applying stage1 twice registers the mask once (a doubled hook would square the mask: still
    # zero, but the handle count tells)
    apply_stage(model, {"name": "stage1", "trainable": ["adapter", "audio_token_rows"]})
    apply_stage(model, {"name": "stage1", "trainable": ["adapter", "audio_token_rows"]})
    assert len(model._audex_grad_mask_handles) == 2


def test_bad_stage_configs_are_named(model):
    with pytest.raises(ValueError, match="stay frozen"):
        apply_stage(model, {"name": "x", "trainable": ["audio_encoder"]})
    with pytest.raises(ValueError, match="unknown entries"):
        apply_stage(model, {"name": "x", "trainable": ["decoder"]})
    with pytest.raises(ValueError, match="trains nothing"):
        apply_stage(model, {"name": "x", "trainable": []})


def test_optimizer_groups_and_warmup_cosine(model):
    apply_stage(model, {"name": "stage3", "trainable": ["adapter", "llm"]})
    optim_cfg = {"name": "adamw", "lr": 2e-5, "betas": [0.9, 0.999], "weight_decay": 0.05,
                 "sched": {"name": "CosineAnnealing", "warmup_ratio": 0.05, "min_lr": 1e-6}}
    optimizer, sched = build_optimizer_and_scheduler(model, optim_cfg, max_steps=200)
    groups = {g["group_name"]: g for g in optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["betas"] == (0.9, 0.999)
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"])
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == n_trainable
    lrs = []
    for _ in range(200):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched["scheduler"].step()
    assert sched["scheduler"].warmup_steps == 10  # 5 % of 200
    assert max(lrs) == pytest.approx(2e-5) and lrs.index(max(lrs)) in (10, 11)
    assert lrs[0] < 3e-6 and lrs[-1] == pytest.approx(1e-6, abs=2e-8)
    assert all(a >= b for a, b in zip(lrs[11:], lrs[12:]))  # cosine decay is monotone


def test_nemo_of_one_stage_initialises_the_next(model, tiny_yaml, tmp_path):
    from audex.models.audex_model import AudexModel

    with torch.no_grad():
        model.adapter.linear_1.weight.add_(1.0)
        model.backbone.get_input_embeddings().weight[-3:].mul_(-2.0)
    path = tmp_path / "stage1.nemo"
    model.save_to(str(path))
    torch.manual_seed(123)  # a differently initialised next-stage model
    nxt = AudexModel.from_config_file(str(tiny_yaml))
    assert not torch.equal(nxt.adapter.linear_1.weight, model.adapter.linear_1.weight)
    load_init_weights(nxt, path)
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(nxt.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="init_from"):
        load_init_weights(nxt, tmp_path / "missing.nemo")


def test_init_from_rejects_another_architecture(model, tiny_yaml, tmp_path):
    from audex.models.audex_model import AudexModel

    path = tmp_path / "a.nemo"
    model.save_to(str(path))
    bigger = AudexModel.from_config_file(str(tiny_yaml), **{"backbone.config.num_hidden_layers": 5})
    with pytest.raises(ValueError, match="does not match this model's architecture"):
        load_init_weights(bigger, path)
