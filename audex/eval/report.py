"""Suite summaries: one JSON and one Markdown file per run, with our numbers beside the paper's, and plots.

A :class:`SuiteSummary` holds the headline metrics, the sample accounting (scored, errors per reason, flags
such as empty hypotheses), breakdowns (per language, per SNR level, ...), comparisons with the paper's
reference tables (:mod:`audex.eval.reference`) and notes (for example that a Fréchet distance was measured with
the fallback embedding and is not comparable with FD_openl3). :func:`write_summary` writes ``summary.json``,
``summary.md`` and whatever plots the suite asked for (matplotlib, headless).

Example::

    summary = SuiteSummary(suite="asr", model="tiny.nemo", metrics={"wer": 4.2},
                           comparisons=[Comparison("openasr/librispeech_clean", "wer", 4.2)])
    write_summary(summary, "outputs/eval/asr")     # summary.json, summary.md
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from audex.eval.metrics import NotComputed
from audex.eval.reference import METRICS, ReferenceTables


@dataclass
class Comparison:
    """Our value on ``benchmark``, printed beside the paper's ``metric`` column for it.

    ``comparable=False`` when our number is measured differently (e.g. a Fréchet distance in the fallback
    embedding space): the paper's rows are printed for context, ours is not ranked among them.
    """

    benchmark: str
    metric: str
    ours: float | None
    note: str = ""
    comparable: bool = True
    our_metric: str | None = None  # label of our number when it is not the paper's metric


@dataclass
class SuiteSummary:
    suite: str
    model: str
    benchmark: str | None = None
    metrics: dict[str, float | NotComputed | None] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    error_reasons: dict[str, int] = field(default_factory=dict)
    flags: dict[str, int] = field(default_factory=dict)
    breakdowns: dict[str, dict[str, dict[str, float | int | str | None]]] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        data = asdict(self)
        data["metrics"] = {k: _json_value(v) for k, v in self.metrics.items()}
        return data


def _json_value(value):
    if isinstance(value, NotComputed):
        return value.to_json()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, NotComputed):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _metric_label(metric: str) -> str:
    """``wer`` -> "WER ↓"; a derived name such as ``wer_average`` -> "WER (average) ↓"."""
    base, _, qualifier = metric.partition("_")
    key = metric if metric in METRICS else base
    info = METRICS.get(key)
    if info is None:
        return metric
    arrow = "↓" if info.lower_is_better else "↑"
    extra = f" ({qualifier.replace('_', ' ')})" if key != metric else ""
    return f"{info.label}{extra} {arrow}"


def render_markdown(summary: SuiteSummary, references: ReferenceTables | None = None) -> str:
    refs = references or ReferenceTables.load()
    lines = [f"# Audex eval: `{summary.suite}`", "", f"- model: `{summary.model}`"]
    if summary.benchmark:
        lines.append(f"- benchmark: `{summary.benchmark}`")
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    for name, value in summary.metrics.items():
        lines.append(f"| {_metric_label(name)} | {_fmt(value)} |")

    c = summary.counts
    lines += ["", "## Samples", "", "| total | scored | errors |", "|---|---|---|",
              f"| {c.get('total', 0)} | {c.get('scored', 0)} | {c.get('errors', 0)} |"]
    if summary.error_reasons:
        lines += ["", "Not scored, by reason:", "", "| reason | samples |", "|---|---|"]
        lines += [f"| {r} | {n} |" for r, n in sorted(summary.error_reasons.items(), key=lambda kv: -kv[1])]
    if summary.flags:
        lines += ["", "Scored, but flagged:", "", "| flag | samples |", "|---|---|"]
        lines += [f"| {r} | {n} |" for r, n in sorted(summary.flags.items(), key=lambda kv: -kv[1])]

    for title, rows in summary.breakdowns.items():
        if not rows:
            continue
        columns = list(dict.fromkeys(col for row in rows.values() for col in row))
        lines += ["", f"## {title}", "", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for label, row in rows.items():
            lines.append(f"| {label} | " + " | ".join(_fmt(row.get(col)) for col in columns) + " |")

    groups: dict[tuple, list[Comparison]] = {}
    for comp in summary.comparisons:
        groups.setdefault((comp.benchmark.split("/")[0], comp.metric, comp.comparable), []).append(comp)
    for comps in groups.values():
        if len(comps) > 1 and comps[0].comparable:
            lines += _wide_table(comps, refs)
        else:
            for comp in comps:
                lines += _ranked_table(comp, refs)

    if summary.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in summary.notes]
    if summary.plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in summary.plots]
    return "\n".join(lines) + "\n"


def _ranked_table(comp: Comparison, refs: ReferenceTables) -> list[str]:
    """One benchmark: the paper's models and ours, best first."""
    metric = comp.metric
    label = refs.benchmark_labels.get(comp.benchmark, comp.benchmark)
    lines = ["", f"## vs. the paper: {label} (`{comp.benchmark}`), {_metric_label(metric)}", ""]
    if comp.note:
        lines += [f"> {comp.note}", ""]
    rows = refs.compare(comp.benchmark, metric, comp.ours if comp.comparable else None)
    if not comp.comparable:
        rows = [r for r in rows if not r["ours"]]
        lines += [f"This run: **{_fmt(comp.ours)}** ({comp.our_metric or 'a different measure'}), NOT comparable with "
                  f"the published {_metric_label(metric)} below:", ""]
    lines += ["| model | value | source |", "|---|---|---|"]
    for row in rows:
        name = f"**{row['model']}**" if row["ours"] else row["model"]
        value = f"**{row['display']}**" if row["ours"] else row["display"]
        lines.append(f"| {name} | {value} | {row['table'] or 'this run'} |")
    return lines


def _wide_table(comps: list[Comparison], refs: ReferenceTables) -> list[str]:
    """Several benchmarks of one family (languages, SNR levels, categories) as the paper prints them: one
    column per benchmark, one row per model, this run on top."""
    metric = comps[0].metric
    labels = [refs.benchmark_labels.get(c.benchmark, c.benchmark) for c in comps]
    family = comps[0].benchmark.split("/")[0]
    lines = ["", f"## vs. the paper: `{family}/*`, {_metric_label(metric)}", ""]
    lines += [f"> {c.benchmark}: {c.note}" for c in comps if c.note]
    if any(c.note for c in comps):
        lines.append("")
    per_benchmark = [{r.model: r for r in refs.results(c.benchmark, metric, include_missing=True)} for c in comps]
    # models with a number in at least one column, in the paper's order
    models = list(dict.fromkeys(m for table in per_benchmark for m, r in table.items() if r.value is not None))
    tables = sorted({r.table for table in per_benchmark for r in table.values()}, key=lambda t: int(t.split()[-1]))
    lines += ["| model | " + " | ".join(labels) + " |", "|---" * (len(comps) + 1) + "|",
              "| **this run** | " + " | ".join(f"**{_fmt(c.ours)}**" for c in comps) + " |"]
    for model in models:
        cells = [table[model].display if model in table else "–" for table in per_benchmark]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", f"Source: {', '.join(tables)}."]
    return lines


def write_summary(summary: SuiteSummary, out_dir: str | Path, references: ReferenceTables | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "summary.json", out / "summary.md"
    json_path.write_text(json.dumps(summary.to_json(), indent=2, ensure_ascii=False) + "\n")
    md_path.write_text(render_markdown(summary, references))
    return {"json": json_path, "markdown": md_path}


# ---- plots ---------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_bars(values: dict[str, float], path: str | Path, title: str, ylabel: str,
              reference: dict[str, float] | None = None, reference_label: str = "paper") -> Path:
    """Bars of ``values`` (e.g. WER per language), with the paper's values as hollow bars beside them."""
    plt = _pyplot()
    labels = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.2))
    width = 0.4 if reference else 0.8
    xs = range(len(labels))
    ax.bar([x - (width / 2 if reference else 0) for x in xs], [values[k] for k in labels], width, label="this run")
    if reference:
        ax.bar([x + width / 2 for x in xs], [reference.get(k, float("nan")) for k in labels], width, fill=False,
               edgecolor="black", label=reference_label)
        ax.legend()
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curves(x: Sequence[float], series: dict[str, Sequence[float | None]], path: str | Path, title: str,
                xlabel: str, ylabel: str, x_ticks: Sequence[str] | None = None) -> Path:
    """Lines (e.g. WER per SNR level) for this run and reference models; x is placed at equal spacing."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    positions = list(range(len(x)))
    for i, (label, ys) in enumerate(series.items()):
        ys = [float("nan") if y is None else y for y in ys]
        ax.plot(positions, ys, marker="o", linewidth=2.5 if i == 0 else 1.2, label=label)
    ax.set_xticks(positions, list(x_ticks) if x_ticks else [f"{v:g}" for v in x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
