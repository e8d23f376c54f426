"""The CFG pairing counts of the LLM model as Triton custom metrics (python backend ``pb_utils.MetricFamily``).

Served next to Triton's own metrics (``/metrics`` on the metrics port): ``audex_cfg_tokens_total{model, action}``
counts tokens by what the pairing post-processor did with them (``guided``: both twins in the step; ``unguided``: a
lone conditional row decided without its twin; ``replay``, ``solo``, ``retire``, see
:mod:`audex.serving.cfg_pairing`) and ``audex_cfg_split_pairs_total{model}`` the pairs whose twins were ever apart.
On a healthy deployment ``unguided`` and ``split`` stay 0; any other value means a TTS/TTA answer was (partly)
decoded without guidance.
"""

from __future__ import annotations

TOKEN_ACTIONS = ("guided", "unguided", "replay", "solo", "retire")


class PairingMetrics:
    """Counters fed from :attr:`GuidedExecutor.stats <audex.serving.guided_executor.GuidedExecutor.stats>`.

    Args:
        pb_utils: ``triton_python_backend_utils`` (or an object with the same ``MetricFamily`` API).
        model_name: the ``model`` label (``tensorrt_llm`` / ``tensorrt_llm_stream``).
    """

    def __init__(self, pb_utils, model_name: str):
        counter = pb_utils.MetricFamily.COUNTER
        tokens = pb_utils.MetricFamily(name="audex_cfg_tokens_total", kind=counter,
                                       description="Tokens of CFG pairs by pairing action (unguided: decided "
                                                   "without the unconditional twin)")
        pairs = pb_utils.MetricFamily(name="audex_cfg_split_pairs_total", kind=counter,
                                      description="CFG pairs whose twins were ever not in the same step")
        # the families must outlive their metrics: Triton refuses to update a metric whose family was collected
        self.families = (tokens, pairs)
        self.metrics = {a: tokens.Metric(labels={"model": model_name, "action": a}) for a in TOKEN_ACTIONS}
        self.metrics["split"] = pairs.Metric(labels={"model": model_name})
        self.exported = dict.fromkeys(self.metrics, 0)

    def update(self, stats: dict) -> None:
        """Add what ``stats`` (running totals) gained since the last call."""
        for key, metric in self.metrics.items():
            delta = int(stats.get(key, 0)) - self.exported[key]
            if delta > 0:
                metric.increment(delta)
                self.exported[key] += delta
