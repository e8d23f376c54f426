"""The paper's published numbers (Tables 1 and 6-13) as data, so that every summary prints our result beside
the paper's and the baselines' on the same benchmark.

The tables live in ``audex/eval/reference_tables/*.json``, one file per paper table, transcribed from the
paper's text. Each file names its benchmarks (``openasr/librispeech_clean``, ``noisy_librispeech/snr_-5``,
``fleurs_ast/de``, ``mmau/average``, ``seed_tts_eval/en``, ...) with their metrics, and gives
``results[model][benchmark][metric]``. Values are kept as the paper prints them: a number, ``null`` for "–"
(not reported), ``"N/S"`` (not supported), or a number with the paper's mark ``‡`` (evaluated by the Audex
authors). A benchmark that appears in Table 1 and in a detailed table carries the same key in both, and the
tests check that they agree.

Example::

    >>> refs = ReferenceTables.load()
    >>> refs.value("openasr/librispeech_clean", "wer", "Audex 30B-A3B")
    1.34
    >>> [r.model for r in refs.results("noisy_librispeech/average", "wer")][:2]
    ['Whisper-large-v3', 'Canary-1B-v2']
    >>> rows = refs.compare("noisy_librispeech/average", "wer", ours=3.10)   # sorted best first, ours included
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TABLES_DIR = Path(__file__).parent / "reference_tables"
AUDEX_MODELS = ("Audex 30B-A3B", "Audex 2B")


@dataclass(frozen=True)
class MetricInfo:
    label: str
    unit: str
    lower_is_better: bool


METRICS: dict[str, MetricInfo] = {
    "wer": MetricInfo("WER", "%", True),
    "wer_fixed_voice": MetricInfo("WER (fixed voice)", "%", True),
    "wer_prompting": MetricInfo("WER (prompting)", "%", True),
    "speaker_similarity": MetricInfo("SIM", "x100", False),
    "fd_openl3": MetricInfo("FD_openl3", "", True),
    "accuracy": MetricInfo("accuracy", "%", False),
    "bleu": MetricInfo("BLEU", "", False),
    "comet": MetricInfo("COMET", "x100", False),
    # measured by the harness but not published in the paper
    "fd_logmel": MetricInfo("FD_logmel (fallback embedding)", "", True),
    "loss": MetricInfo("loss (nats/token)", "", True),
}

MARK_NOTES = {"‡": "evaluated by the Audex authors", "N/S": "not supported"}


@dataclass(frozen=True)
class ReferenceResult:
    table: str
    benchmark: str
    metric: str
    model: str
    value: float | None
    marks: str = ""

    @property
    def display(self) -> str:
        if self.value is None:
            return self.marks or "–"
        return f"{self.value:g}{self.marks}"


def parse_value(raw) -> tuple[float | None, str]:
    """A table cell -> ``(value, marks)``: ``1.34`` -> (1.34, ""), ``"7.91‡"`` -> (7.91, "‡"), ``"N/S"`` -> (None,
    "N/S"), ``None`` -> (None, "")."""
    if raw is None:
        return None, ""
    if isinstance(raw, (int, float)):
        return float(raw), ""
    text = str(raw).strip()
    if text == "N/S":
        return None, "N/S"
    marks = ""
    while text and not (text[-1].isdigit() or text[-1] == "."):
        marks = text[-1] + marks
        text = text[:-1]
    try:
        return float(text), marks
    except ValueError:
        raise ValueError(f"reference table cell {raw!r} is not a number, null, 'N/S' or a number with a mark") from None


class ReferenceTables:
    """All reference results, queryable by (benchmark, metric)."""

    def __init__(self, results: list[ReferenceResult], benchmark_labels: dict[str, str], captions: dict[str, str]):
        self._results = results
        self.benchmark_labels = benchmark_labels
        self.captions = captions

    @classmethod
    def load(cls, folder: str | Path | None = None) -> "ReferenceTables":
        folder = Path(folder) if folder else TABLES_DIR
        files = sorted(folder.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"no reference tables (*.json) in {str(folder)!r}")
        results, labels, captions = [], {}, {}
        for f in files:
            data = json.loads(f.read_text())
            table = data["table"]
            captions[table] = data.get("caption", "")
            declared = data["benchmarks"]
            for key, spec in declared.items():
                if table != "Table 1" or key not in labels:  # the detailed tables' column names win
                    labels[key] = spec.get("label", key)
            for model, per_benchmark in data["results"].items():
                for bench, per_metric in per_benchmark.items():
                    if bench not in declared:
                        raise ValueError(f"{f.name}: model {model!r} has undeclared benchmark {bench!r}")
                    for metric, raw in per_metric.items():
                        if metric not in declared[bench]["metrics"] or metric not in METRICS:
                            raise ValueError(f"{f.name}: {model!r}/{bench!r} has unknown metric {metric!r}")
                        value, marks = parse_value(raw)
                        results.append(ReferenceResult(table, bench, metric, model, value, marks))
        return cls(results, labels, captions)

    # ---- queries -----------------------------------------------------------------------------
    def tables(self) -> list[str]:
        return sorted(self.captions, key=lambda t: int(t.split()[-1]))

    def benchmarks(self) -> list[str]:
        return sorted({r.benchmark for r in self._results})

    def all_results(self) -> list[ReferenceResult]:
        return list(self._results)

    def results(self, benchmark: str, metric: str, include_missing: bool = False) -> list[ReferenceResult]:
        """One result per model, from the most detailed table (Table 1 only for models absent elsewhere), in the
        order the paper lists them."""
        found = [r for r in self._results if r.benchmark == benchmark and r.metric == metric]
        detailed = [r for r in found if r.table != "Table 1"]
        seen = {r.model for r in detailed}
        merged = detailed + [r for r in found if r.table == "Table 1" and r.model not in seen]
        return [r for r in merged if include_missing or r.value is not None]

    def value(self, benchmark: str, metric: str, model: str = "Audex 30B-A3B") -> float | None:
        for r in self.results(benchmark, metric):
            if r.model == model:
                return r.value
        return None

    def compare(self, benchmark: str, metric: str, ours: float | None, our_label: str = "this run") -> list[dict]:
        """Rows ``{model, value, display, table, ours}`` sorted best first (by the metric's direction), with our
        result inserted; a missing ``ours`` is listed last."""
        info = METRICS[metric]
        rows = [{"model": r.model, "value": r.value, "display": r.display, "table": r.table, "ours": False}
                for r in self.results(benchmark, metric)]
        rows.sort(key=lambda row: row["value"] if info.lower_is_better else -row["value"])
        mine = {"model": our_label, "value": ours, "display": "–" if ours is None else f"{ours:.2f}", "table": "", "ours": True}
        if ours is None:
            return rows + [mine]
        pos = next((i for i, row in enumerate(rows)
                    if (ours < row["value"] if info.lower_is_better else ours > row["value"])), len(rows))
        return rows[:pos] + [mine] + rows[pos:]
