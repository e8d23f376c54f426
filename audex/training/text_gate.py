"""The text-regression gate: every stage measures what it did to text, and says so loudly.

The paper's central claim is that audio training must not hurt the LLM's text abilities (sections 4.4, C.1,
C.2). :class:`TextRegressionGate` is a Lightning callback that evaluates, at the start and at the end of a
stage, the teacher-forced loss and next-token accuracy of held-out data per task -- text chats first, then the
audio tasks (ASR, TTS, TTA, audio QA, ...) -- and reports the change. When the text loss rises by more than
``max_relative_increase`` the gate logs a banner warning, or (``on_regression: error``) fails the run after
the report is written, so that a chained run stops before the next stage builds on a damaged model.

The two numbers answer different questions, and the report gives both (the verdict line and ``text_gate.json``'s
``text_relative_change`` and ``text_token_accuracy_change``):

* **loss** (the gated one) -- mean negative log-probability of the reference token: how much probability the model
  gives the held-out answers. It rises when the model becomes less sure of right tokens *or* confidently wrong.
* **token accuracy** -- share of reference tokens that are the model's top choice (greedy decoding). It ignores
  how sure the model is, so it can rise while the loss rises too (more top-1 hits, bought with over-confident
  misses on the rest). The gate stays on the loss, the quantity training optimises and the one that sampling
  with a temperature sees.

Config (``model.text_gate`` in every stage)::

    text_gate:
      enabled: true
      text_task: text                 # the task whose loss is gated
      max_relative_increase: 0.05     # +5 % text loss is a regression
      on_regression: warn             # or: error
      max_batches_per_task: 50

Example::

    gate = TextRegressionGate({"text": text_val_loader, "asr": asr_val_loader}, max_relative_increase=0.05)
    trainer = Trainer(callbacks=[gate]); trainer.fit(model)
    print(gate.report.format())
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from lightning.pytorch import Callback

from audex.data.collate import batch_field
from audex.parts.losses import token_cross_entropy

log = logging.getLogger(__name__)


@dataclass
class TaskMetrics:
    """Teacher-forced metrics of one task's held-out data."""

    loss: float             # mean cross-entropy per trainable token (nats)
    token_accuracy: float   # share of trainable tokens predicted exactly (argmax)
    tokens: int             # trainable tokens evaluated


@torch.no_grad()
def evaluate_tasks(model, loaders: Mapping[str, Iterable], max_batches_per_task: int | None = None
                   ) -> dict[str, TaskMetrics]:
    """Per-task token-mean loss and accuracy of ``model`` on each loader (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task, loader in loaders.items():
            total, correct, count = 0.0, 0, 0
            for i, batch in enumerate(loader):
                if max_batches_per_task is not None and i >= max_batches_per_task:
                    break
                batch = _to_device(batch, model.device)
                logits = model.forward_batch(batch).logits
                labels = batch_field(batch, "labels")
                losses, trainable, _ = token_cross_entropy(logits, labels, batch_field(batch, "sample_ids"))
                total += float(losses.sum())
                count += int(trainable.sum())
                correct += int(((logits[:, :-1].argmax(-1) == labels[:, 1:]) & trainable).sum())
            if count == 0:
                log.warning("text gate: the %r loader gave no trainable tokens; it is left out of the report", task)
                continue
            results[task] = TaskMetrics(loss=total / count, token_accuracy=correct / count, tokens=count)
    finally:
        model.train(was_training)
    return results


def _to_device(batch, device):
    if device is None or device.type == "cpu":
        return batch
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


@dataclass
class GateReport:
    """Start/end metrics of a stage and the verdict on text."""

    stage: str
    text_task: str
    max_relative_increase: float
    start: dict[str, TaskMetrics] = field(default_factory=dict)
    end: dict[str, TaskMetrics] = field(default_factory=dict)

    @property
    def text_relative_change(self) -> float | None:
        if self.text_task not in self.start or self.text_task not in self.end:
            return None
        before, after = self.start[self.text_task].loss, self.end[self.text_task].loss
        return (after - before) / max(before, 1e-12)

    @property
    def text_accuracy_change(self) -> float | None:
        """End minus start token accuracy of the text task (absolute, 0.032 = +3.2 points)."""
        if self.text_task not in self.start or self.text_task not in self.end:
            return None
        return self.end[self.text_task].token_accuracy - self.start[self.text_task].token_accuracy

    def text_summary(self) -> str:
        """``loss +5.49 %, token accuracy 0.741 -> 0.773 (+3.2 points)`` for the text task."""
        s, e = self.start[self.text_task], self.end[self.text_task]
        return (f"loss {self.text_relative_change:+.2%}, token accuracy {s.token_accuracy:.3f} -> "
                f"{e.token_accuracy:.3f} ({100 * self.text_accuracy_change:+.1f} points)")

    @property
    def regressed(self) -> bool:
        change = self.text_relative_change
        return change is not None and change > self.max_relative_increase

    def format(self) -> str:
        lines = [f"text-regression report, {self.stage} (gate: {self.text_task} loss +{self.max_relative_increase:.1%} max)",
                 f"  {'task':<14}{'loss start':>12}{'loss end':>12}{'change':>10}{'acc start':>11}{'acc end':>10}"]
        for task in self.start:
            s, e = self.start[task], self.end.get(task)
            if e is None:
                continue
            change = (e.loss - s.loss) / max(s.loss, 1e-12)
            flag = "  <-- REGRESSION" if task == self.text_task and self.regressed else ""
            lines.append(f"  {task:<14}{s.loss:>12.4f}{e.loss:>12.4f}{change:>+10.2%}{s.token_accuracy:>11.3f}"
                         f"{e.token_accuracy:>10.3f}{flag}")
        verdict = self.text_relative_change
        if verdict is None:
            lines.append(f"  no {self.text_task!r} validation data: text regression not measured")
        else:
            lines.append(f"  text: {'REGRESSED' if self.regressed else 'ok'} ({self.text_summary()}; the gate is on "
                         "the loss)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "text_task": self.text_task, "max_relative_increase": self.max_relative_increase,
                "start": {k: asdict(v) for k, v in self.start.items()},
                "end": {k: asdict(v) for k, v in self.end.items()},
                "text_relative_change": self.text_relative_change,
                "text_token_accuracy_change": self.text_accuracy_change, "regressed": self.regressed}


class TextRegressionError(RuntimeError):
    """A stage raised the text validation loss beyond ``model.text_gate.max_relative_increase``."""


class TextRegressionGate(Callback):
    """Lightning callback: evaluate per-task held-out metrics at the start and end of a stage and gate text.

    Args:
        loaders: ``{task: dataloader}`` or a callable returning it (called once, when training starts, so that
            the loaders use the trained model's tokenizer).
        stage: stage name for the report.
        text_task: the gated task.
        max_relative_increase: allowed relative rise of the text loss (0.05 = 5 %).
        on_regression: ``warn`` (banner in the log) or ``error`` (:class:`TextRegressionError` after the report).
        report_path: where the JSON report is written (optional).
        max_batches_per_task: evaluation budget per task.

    The start metrics are part of the callback state, so a resumed run compares against the stage's true start.
    """

    def __init__(self, loaders: Mapping[str, Iterable] | Callable[[], Mapping[str, Iterable]], stage: str = "stage",
                 text_task: str = "text", max_relative_increase: float = 0.05, on_regression: str = "warn",
                 report_path: str | None = None, max_batches_per_task: int | None = 50):
        if on_regression not in ("warn", "error"):
            raise ValueError(f"model.text_gate.on_regression must be 'warn' or 'error', got {on_regression!r}")
        if max_relative_increase < 0:
            raise ValueError(f"model.text_gate.max_relative_increase must be >= 0, got {max_relative_increase}")
        self._loaders = loaders
        self.report = GateReport(stage, text_task, float(max_relative_increase))
        self.on_regression = on_regression
        self.report_path = report_path
        self.max_batches_per_task = max_batches_per_task

    def loaders(self) -> Mapping[str, Iterable]:
        if callable(self._loaders):
            self._loaders = self._loaders()
        return self._loaders

    def _evaluate(self, pl_module) -> dict[str, TaskMetrics]:
        return evaluate_tasks(pl_module, self.loaders(), self.max_batches_per_task)

    # ---- Lightning hooks ---------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        if self.report.start:  # resumed run: the start was measured before the interruption
            return
        self.report.start = self._evaluate(pl_module)
        for task, m in self.report.start.items():
            log.info("text gate, %s start: %s loss %.4f, token accuracy %.3f", self.report.stage, task, m.loss,
                     m.token_accuracy)

    def on_train_end(self, trainer, pl_module):
        self.report.end = self._evaluate(pl_module)
        text = self.report.format()
        print(text, flush=True)
        if self.report_path and trainer.is_global_zero:
            Path(self.report_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.report_path).write_text(json.dumps(self.report.to_dict(), indent=2))
        if self.report.regressed:
            message = (f"TEXT REGRESSION in {self.report.stage}: {self.report.text_task} {self.report.text_summary()} "
                       f"(loss allowed +{self.report.max_relative_increase:.1%}). "
                       "Raise the text share of the blend (appendix C.2) or lower the learning rate.")
            if self.on_regression == "error":
                raise TextRegressionError(message)
            banner = "!" * 100
            log.warning("\n%s\n%s\n%s", banner, message, banner)

    def state_dict(self) -> dict:
        return {"start": {k: asdict(v) for k, v in self.report.start.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.report.start = {k: TaskMetrics(**v) for k, v in state_dict.get("start", {}).items()}
