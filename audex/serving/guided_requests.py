"""The executor requests of an :class:`~audex.serving.llm_job.LlmJob`, built by
:class:`~audex.serving.guided_executor.GuidedExecutor` with the executor module it runs on
(``tensorrt_llm.bindings.executor`` or :mod:`audex.serving.reference_executor`).

Under KV block reuse TensorRT-LLM keys cached blocks by (id, extra id): a clip's prompt-table positions get its
content hash as extra id (every clip uses the same fake ids, so two clips must not share blocks; text positions still
do), and a CFG twin gets an id unique to its pair and role on every position (its blocks are its own, so the
scheduler never skips it for a block its partner is filling, see :mod:`audex.serving.executor_blocks`), with a
one-row prompt table when it has none: TensorRT-LLM takes extra ids only with a prompt table.
"""

from __future__ import annotations

from typing import Sequence

import torch

from audex.serving.engine_facts import EngineFacts, content_id
from audex.serving.llm_job import LlmJob

TWIN_EXTRA_ID_BASE = 1 << 60          # twin extra ids: base + client id (unique per pair and role, above clip hashes)


def prompt_tuning(trtllm, engine: EngineFacts | None, ids: Sequence[int], job: LlmJob, twin: int | None):
    """The request's ``PromptTuningConfig`` (None when it needs none); ``twin``: the twin's extra id, or None."""
    table = job.prompt_table
    has_table = table is not None and table.numel() > 0
    reuse = engine is not None and engine.block_reuse
    if not reuse:
        return trtllm.PromptTuningConfig(table) if has_table else None
    if twin is not None:
        if not has_table:
            table = torch.zeros(1, engine.hidden_size, dtype=engine.dtype)
        return trtllm.PromptTuningConfig(table, [twin] * len(ids))
    if not has_table:
        return None
    clip = content_id(table)
    return trtllm.PromptTuningConfig(table, [clip if i >= engine.vocab_size else 0 for i in ids])


def executor_request(trtllm, engine: EngineFacts | None, ids: Sequence[int], job: LlmJob, *, client_id=None,
                     forced: bool):
    """One ``Request`` of ``job`` on prompt ``ids``. ``forced``: a CFG row, whose token the post-processor forces
    (greedy in the engine, tagged with ``client_id``); else the engine samples from the job's preset.

    Every request goes through the batched post-processor: twins to be paired, the others so that the router sees
    when their context has run (the token budget of contexts still waiting, ``GuidedExecutor._admit``)."""
    s = job.sampling
    if forced or not s.do_sample:
        sampling = trtllm.SamplingConfig(1, top_k=1)
    else:
        sampling = trtllm.SamplingConfig(1, top_k=s.top_k or None, top_p=s.top_p, temperature=s.temperature,
                                         seed=s.seed)
    twin = None if client_id is None else TWIN_EXTRA_ID_BASE + int(client_id)
    return trtllm.Request(list(ids), int(job.max_new_tokens), streaming=job.streaming, sampling_config=sampling,
                          output_config=trtllm.OutputConfig(exclude_input_from_output=True), end_id=int(job.end_id),
                          pad_id=int(job.pad_id), prompt_tuning_config=prompt_tuning(trtllm, engine, ids, job, twin),
                          logits_post_processor_name=trtllm.Request.BATCHED_POST_PROCESSOR_NAME,
                          client_id=client_id if forced else None)
