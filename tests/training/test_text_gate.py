"""The text-regression gate measures per-task held-out loss at a stage's start and end and acts on text."""

import json
from types import SimpleNamespace

import pytest
import torch

from audex.data.collate import collate_padded
from audex.data.schema import make_text_cut, make_tts_cut
from audex.data.sequence import SequenceBuilder
from audex.training.text_gate import (
    GateReport,
    TaskMetrics,
    TextRegressionError,
    TextRegressionGate,
    evaluate_tasks,
)


@pytest.fixture(scope="module")
def loaders(tiny_model):
    builder = SequenceBuilder(tiny_model.tokenizer, tiny_model.frames_for_samples, max_length=None)
    chats = [make_text_cut(f"c{i}", [{"role": "user", "content": f"What is {i} plus {i}?"},
                                     {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]) for i in range(6)]
    tts = [make_tts_cut(f"say {i}", speech_codes=torch.arange(20 + i) % 256, cut_id=f"s{i}") for i in range(4)]
    pad = tiny_model.tokenizer.pad_id
    return {"text": [collate_padded([builder(c) for c in chats[:3]], pad), collate_padded([builder(c) for c in chats[3:]], pad)],
            "tts": [collate_padded([builder(c) for c in tts], pad)]}


def test_evaluate_tasks_matches_a_direct_token_mean(tiny_model, loaders):
    metrics = evaluate_tasks(tiny_model, loaders)
    assert set(metrics) == {"text", "tts"}
    total = count = 0
    for batch in loaders["text"]:
        with torch.no_grad():
            logits = tiny_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                sample_ids=batch.sample_ids).logits
        targets = batch.labels[:, 1:]
        keep = targets != -100
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep], reduction="sum")
        total, count = total + float(nll), count + int(keep.sum())
    assert metrics["text"].loss == pytest.approx(total / count, rel=1e-5)
    assert metrics["text"].tokens == count
    # a random tiny model is near uniform over the 1,536-row vocabulary
    assert metrics["text"].loss == pytest.approx(torch.log(torch.tensor(1536.0)).item(), rel=0.1)


def _run_gate(model, loaders, damage, on_regression, tmp_path):
    gate = TextRegressionGate(loaders, stage="stageX", max_relative_increase=0.05, on_regression=on_regression,
                              report_path=str(tmp_path / "gate.json"))
    trainer = SimpleNamespace(is_global_zero=True)
    gate.on_train_start(trainer, model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            damage(model)
        gate.on_train_end(trainer, model)
    finally:
        model.load_state_dict(saved)
    return gate


def _scramble_text_head(model):
    g = torch.Generator().manual_seed(0)
    head = model.backbone.get_output_embeddings().weight
    head[: model.vocab.text_vocab_size] += torch.randn(head[: model.vocab.text_vocab_size].shape, generator=g)


def test_gate_reports_a_text_regression_and_fails_when_configured(tiny_model, loaders, tmp_path):
    gate = _run_gate(tiny_model, loaders, _scramble_text_head, "warn", tmp_path)
    assert gate.report.regressed and gate.report.text_relative_change > 0.05
    saved = json.loads((tmp_path / "gate.json").read_text())
    assert saved["regressed"] and set(saved["start"]) == {"text", "tts"}
    assert saved["text_token_accuracy_change"] == pytest.approx(
        saved["end"]["text"]["token_accuracy"] - saved["start"]["text"]["token_accuracy"])
    with pytest.raises(TextRegressionError, match="TEXT REGRESSION in stageX"):
        _run_gate(tiny_model, loaders, _scramble_text_head, "error", tmp_path)


def test_gate_passes_when_only_audio_rows_change(tiny_model, loaders, tmp_path):
    def train_audio_rows(model):  # what stage1 may do: only rows above the text vocabulary move
        emb = model.backbone.get_input_embeddings().weight
        emb[model.vocab.text_vocab_size:] *= 1.5

    gate = _run_gate(tiny_model, loaders, train_audio_rows, "error", tmp_path)
    assert gate.report.text_relative_change == 0.0  # input rows of codec tokens never reach text chats
    assert gate.report.end["tts"].loss != gate.report.start["tts"].loss
    assert "text: ok" in gate.report.format()


def test_report_gives_loss_and_token_accuracy_when_they_disagree():
    """The demo's stage 2 case: text loss +5.49 % (a regression) while token accuracy rose 0.741 -> 0.773."""
    report = GateReport("stage2", "text", 0.05, start={"text": TaskMetrics(loss=2.0, token_accuracy=0.741, tokens=900)},
                        end={"text": TaskMetrics(loss=2.1098, token_accuracy=0.773, tokens=900)})
    assert report.regressed and report.text_relative_change == pytest.approx(0.0549)
    assert report.text_accuracy_change == pytest.approx(0.032)
    text = report.format()
    assert "text: REGRESSED (loss +5.49%, token accuracy 0.741 -> 0.773 (+3.2 points); the gate is on the loss)" in text
    assert report.to_dict()["text_token_accuracy_change"] == pytest.approx(0.032)


def test_gate_start_survives_a_resume():
    gate = TextRegressionGate({}, stage="s")
    gate.report.start = {"text": TaskMetrics(loss=2.0, token_accuracy=0.5, tokens=10)}
    fresh = TextRegressionGate({}, stage="s")
    fresh.load_state_dict(gate.state_dict())
    assert fresh.report.start == gate.report.start


def test_gate_rejects_bad_settings():
    with pytest.raises(ValueError, match="on_regression"):
        TextRegressionGate({}, on_regression="ignore")
    with pytest.raises(ValueError, match="max_relative_increase"):
        TextRegressionGate({}, max_relative_increase=-0.1)
