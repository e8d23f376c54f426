"""The value types of ``tensorrt_llm.bindings.executor`` as the pinned release's nanobind bindings define them, for
the reference executor (:mod:`audex.serving.reference_executor`, which re-exports every name here).

Constructors take the keyword names and defaults of ``cpp/tensorrt_llm/nanobind/executor/{request,executorConfig}.cpp``
of TensorRT-LLM ``TRTLLM_VERSION``: a keyword the bindings do not have raises ``TypeError``, one they have but the
reference does not model raises ``ValueError`` when set. :class:`ReferenceEngine` stands for what ``trtllm-build``
fixes in an engine (its sizes and weight dtype).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from audex.serving.executor_blocks import DEFAULT_TOKENS_PER_BLOCK, TRTLLM_VERSION


class ModelType(enum.Enum):
    DECODER_ONLY = 0


class BatchingType(enum.Enum):
    STATIC = 0
    INFLIGHT = 1


class CapacitySchedulerPolicy(enum.Enum):
    MAX_UTILIZATION = 0
    GUARANTEED_NO_EVICT = 1
    STATIC_BATCH = 2


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


class CommunicationType(enum.Enum):
    MPI = 0


class CommunicationMode(enum.Enum):
    LEADER = 0
    ORCHESTRATOR = 1


_ROOT = "tensorrt_llm.bindings.executor"


def _refuse_unknown(cls: str, given: dict, known: tuple[str, ...]) -> None:
    """A keyword the pinned binding does not have is a ``TypeError`` (as nanobind raises); one it has but the
    reference does not model is a ``ValueError`` when set to anything but its default (passed here as None)."""
    for name, value in given.items():
        if name not in known:
            raise TypeError(f"{cls}.__init__() got an unexpected keyword argument {name!r}: {_ROOT}.{cls} of "
                            f"tensorrt_llm=={TRTLLM_VERSION} takes no such argument")
        if value is not None:
            raise ValueError(f"{cls}({name}=...) is a real {_ROOT} argument that the reference executor does not "
                             "model; leave it unset")


class SchedulerConfig:
    """``SchedulerConfig(capacity_scheduler_policy=GUARANTEED_NO_EVICT, context_chunking_policy=None,
    dynamic_batch_config=None)``."""

    def __init__(self, capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
                 context_chunking_policy=None, dynamic_batch_config=None):
        if capacity_scheduler_policy is not CapacitySchedulerPolicy.GUARANTEED_NO_EVICT:
            raise ValueError("the reference executor models the GUARANTEED_NO_EVICT capacity scheduler only")
        _refuse_unknown("SchedulerConfig", {"context_chunking_policy": context_chunking_policy,
                                            "dynamic_batch_config": dynamic_batch_config},
                        ("context_chunking_policy", "dynamic_batch_config"))
        self.capacity_scheduler_policy = capacity_scheduler_policy


_KV_UNMODELLED = ("max_attention_window", "sink_token_length", "host_cache_size", "onboard_blocks",
                  "cross_kv_cache_fraction", "secondary_offload_min_priority", "event_buffer_max_size",
                  "enable_partial_reuse", "copy_on_partial_reuse", "use_uvm", "runtime_defaults")


class KvCacheConfig:
    """``KvCacheConfig(enable_block_reuse=True, max_tokens=None, ..., free_gpu_memory_fraction=None, ...)``: block
    reuse is **on** by default, as in the bindings (:mod:`audex.serving.executor_blocks`)."""

    def __init__(self, enable_block_reuse: bool = True, max_tokens: int | None = None, *args,
                 free_gpu_memory_fraction: float | None = None, **unmodelled):
        if args:
            raise TypeError("KvCacheConfig: give the arguments after max_tokens by keyword")
        _refuse_unknown("KvCacheConfig", unmodelled, _KV_UNMODELLED)
        self.enable_block_reuse = bool(enable_block_reuse)
        self.max_tokens = max_tokens
        self.free_gpu_memory_fraction = free_gpu_memory_fraction


class LogitsPostProcessorConfig:
    """``LogitsPostProcessorConfig(processor_map=None, processor_batched=None, replicate=True)``."""

    def __init__(self, processor_map: dict | None = None, processor_batched: Callable | None = None,
                 replicate: bool = True):
        self.processor_map, self.processor_batched, self.replicate = processor_map, processor_batched, replicate


class OrchestratorConfig:
    """``OrchestratorConfig(is_orchestrator=True, worker_executable_path="", orch_leader_comm=None,
    spawn_processes=True)``."""

    def __init__(self, is_orchestrator: bool = True, worker_executable_path: str = "", orch_leader_comm=None,
                 spawn_processes: bool = True):
        _refuse_unknown("OrchestratorConfig", {"orch_leader_comm": orch_leader_comm}, ("orch_leader_comm",))
        self.is_orchestrator, self.worker_executable_path = bool(is_orchestrator), str(worker_executable_path)
        self.spawn_processes = bool(spawn_processes)


class ParallelConfig:
    """``ParallelConfig(communication_type=MPI, communication_mode=LEADER, device_ids=None, participant_ids=None,
    orchestrator_config=None, num_nodes=None)``."""

    def __init__(self, communication_type: CommunicationType = CommunicationType.MPI,
                 communication_mode: CommunicationMode = CommunicationMode.LEADER, device_ids=None,
                 participant_ids=None, orchestrator_config: OrchestratorConfig | None = None, num_nodes=None):
        _refuse_unknown("ParallelConfig", {"participant_ids": participant_ids, "num_nodes": num_nodes},
                        ("participant_ids", "num_nodes"))
        self.communication_type, self.communication_mode = communication_type, communication_mode
        self.device_ids = None if device_ids is None else [int(d) for d in device_ids]
        self.orchestrator_config = orchestrator_config


def mpi_world() -> tuple[int, int]:
    """``(rank, size)`` of this process in the MPI job that started it (``mpirun`` / Slurm set these), ``(0, 1)``
    outside one; what ``mpi4py``'s ``COMM_WORLD`` reports, read without MPI."""
    for rank, size in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                       ("SLURM_PROCID", "SLURM_NTASKS")):
        if os.environ.get(rank) is not None:
            return int(os.environ[rank]), int(os.environ.get(size, "1"))
    return 0, 1


def serves_requests(parallel: ParallelConfig | None, world_size: int) -> bool:
    """Whether this process's executor takes requests (``canEnqueueRequests``): in ``LEADER`` mode every rank of an
    MPI job of the engine's ``world_size`` runs an executor and only rank 0 (the leader) takes requests, the others
    are participants; in ``ORCHESTRATOR`` mode the one process with ``is_orchestrator`` takes them and spawns the
    engine's ranks as workers (``spawn_processes``)."""
    parallel = parallel or ParallelConfig()
    rank, size = mpi_world()
    if parallel.communication_mode is CommunicationMode.ORCHESTRATOR:
        orch = parallel.orchestrator_config
        if orch is None:
            raise ValueError("ParallelConfig(communication_mode=ORCHESTRATOR) needs an orchestrator_config")
        if not orch.spawn_processes:
            raise ValueError("OrchestratorConfig(spawn_processes=False) is not modelled by the reference executor")
        return orch.is_orchestrator
    if size != world_size:
        raise RuntimeError(f"the engine runs on {world_size} ranks (tp_size * pp_size) and LEADER mode needs one MPI "
                           f"process per rank, but this job has {size}: launch the server under mpirun -n "
                           f"{world_size}, or use ORCHESTRATOR mode")
    return rank == 0


_EXECUTOR_UNMODELLED = ("normalize_log_probs", "iter_stats_max_iterations", "request_stats_max_iterations",
                        "peft_cache_config", "decoding_config", "use_gpu_direct_storage",
                        "gpu_weights_percent", "max_queue_size", "extended_runtime_perf_knob_config", "debug_config",
                        "recv_poll_period_ms", "max_seq_idle_microseconds", "spec_dec_config",
                        "guided_decoding_config", "additional_model_outputs", "cache_transceiver_config",
                        "gather_generation_logits", "mm_embedding_offloading", "enable_trt_overlap")


class ExecutorConfig:
    """``ExecutorConfig(max_beam_width=1, scheduler_config=SchedulerConfig(), kv_cache_config=KvCacheConfig(),
    enable_chunked_context=False, ..., batching_type=INFLIGHT, max_batch_size=None, max_num_tokens=None, ...,
    parallel_config=None, ..., logits_post_processor_config=None, ...)``. There is no ``max_input_len``: that is the engine's
    (:class:`ReferenceEngine`); ``max_batch_size`` / ``max_num_tokens`` override the engine's at run time."""

    def __init__(self, max_beam_width: int = 1, scheduler_config: SchedulerConfig | None = None,
                 kv_cache_config: KvCacheConfig | None = None, enable_chunked_context: bool = False, *args,
                 batching_type: BatchingType = BatchingType.INFLIGHT, max_batch_size: int | None = None,
                 max_num_tokens: int | None = None, parallel_config: ParallelConfig | None = None,
                 logits_post_processor_config=None, **unmodelled):
        if args:
            raise TypeError("ExecutorConfig: give the arguments after enable_chunked_context by keyword")
        _refuse_unknown("ExecutorConfig", unmodelled, _EXECUTOR_UNMODELLED)
        if max_beam_width != 1:
            raise ValueError("the reference executor decodes with beam width 1 only (Audex serves no beam search)")
        if enable_chunked_context:
            raise ValueError("the reference executor does not model chunked context (Audex serves without it)")
        self.max_beam_width = 1
        self.scheduler_config = scheduler_config if scheduler_config is not None else SchedulerConfig()
        self.kv_cache_config = kv_cache_config if kv_cache_config is not None else KvCacheConfig()
        self.enable_chunked_context = False
        self.batching_type = batching_type
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.logits_post_processor_config = logits_post_processor_config
        self.parallel_config = parallel_config


_SAMPLING_UNMODELLED = ("top_p_min", "top_p_reset_ids", "top_p_decay", "min_tokens", "beam_search_diversity_rate",
                        "repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty",
                        "early_stopping", "no_repeat_ngram_size", "num_return_sequences", "min_p",
                        "beam_width_array")


class SamplingConfig:
    """``SamplingConfig(beam_width=1, *, top_k=None, top_p=None, ..., seed=None, temperature=None, ...)``."""

    def __init__(self, beam_width: int = 1, *, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, temperature: float | None = None, **unmodelled):
        _refuse_unknown("SamplingConfig", unmodelled, _SAMPLING_UNMODELLED)
        self.beam_width, self.top_k, self.top_p = beam_width, top_k, top_p
        self.temperature, self.seed = temperature, seed


class OutputConfig:
    """``OutputConfig(return_log_probs=False, return_context_logits=False, return_generation_logits=False,
    exclude_input_from_output=False, return_encoder_output=False, return_perf_metrics=False,
    additional_model_outputs=None)``."""

    def __init__(self, return_log_probs: bool = False, return_context_logits: bool = False,
                 return_generation_logits: bool = False, exclude_input_from_output: bool = False,
                 return_encoder_output: bool = False, return_perf_metrics: bool = False,
                 additional_model_outputs=None):
        if return_log_probs or return_context_logits or return_generation_logits or return_encoder_output \
                or return_perf_metrics or additional_model_outputs is not None:
            raise ValueError("the reference executor returns token ids only (no logits, log-probs or metrics)")
        self.exclude_input_from_output = bool(exclude_input_from_output)


class PromptTuningConfig:
    """``PromptTuningConfig(embedding_table, input_token_extra_ids=None)``."""

    def __init__(self, embedding_table: torch.Tensor, input_token_extra_ids: Sequence[int] | None = None):
        self.embedding_table = embedding_table
        self.input_token_extra_ids = None if input_token_extra_ids is None else [int(e) for e in input_token_extra_ids]


_REQUEST_UNMODELLED = ("position_ids", "bad_words", "stop_words", "embedding_bias", "external_draft_tokens_config",
                       "multimodal_input", "multimodal_embedding", "mrope_config", "lora_config", "lookahead_config",
                       "kv_cache_retention_config", "logits_post_processor", "encoder_input_token_ids",
                       "return_all_generated_tokens", "priority", "type", "context_phase_params",
                       "encoder_input_features", "encoder_output_length", "cross_attention_mask",
                       "num_return_sequences", "eagle_config", "skip_cross_attn_blocks", "guided_decoding_params",
                       "language_adapter_uid", "allotted_time_ms")


class Request:
    """``Request(input_token_ids, max_tokens, *, streaming=False, sampling_config=SamplingConfig(),
    output_config=OutputConfig(), end_id=None, pad_id=None, ..., prompt_tuning_config=None, ...,
    logits_post_processor_name=None, ..., client_id=None, ...)``; ``input_token_ids`` and ``max_tokens`` are
    read-only, as in the bindings."""

    BATCHED_POST_PROCESSOR_NAME = "batched"

    def __init__(self, input_token_ids: Sequence[int], max_tokens: int, *, streaming: bool = False,
                 sampling_config: SamplingConfig | None = None, output_config: OutputConfig | None = None,
                 end_id: int | None = None, pad_id: int | None = None,
                 prompt_tuning_config: PromptTuningConfig | None = None, logits_post_processor_name: str | None = None,
                 client_id: int | None = None, **unmodelled):
        _refuse_unknown("Request", unmodelled, _REQUEST_UNMODELLED)
        self._input_token_ids = [int(t) for t in input_token_ids]
        self._max_tokens = int(max_tokens)
        self.streaming = bool(streaming)
        self.sampling_config = sampling_config or SamplingConfig()
        self.output_config = output_config or OutputConfig()
        self.end_id, self.pad_id = end_id, pad_id
        self.prompt_tuning_config = prompt_tuning_config
        self.client_id = client_id
        self.logits_post_processor_name = logits_post_processor_name

    @property
    def input_token_ids(self) -> list[int]:
        return list(self._input_token_ids)

    @property
    def max_tokens(self) -> int:
        return self._max_tokens


@dataclass
class ReferenceEngine:
    """What ``trtllm-build`` fixes in an engine, for the reference executor: pass it as ``Executor``'s
    ``model_path``. ``model``: an HF folder (the export's ``hf/``) or a ``torch.nn.Module``; the sizes are the
    ``trtllm-build`` flags of the same names (``tokens_per_block``: ``plugin_config``); ``dtype`` is the weights'
    dtype, which a request's prompt table must match; ``world_size`` the ranks of its mapping. An engine built
    without ``max_prompt_embedding_table_size``
    takes no prompt table at all."""

    model: object
    max_batch_size: int = 2048
    max_input_len: int = 1024
    max_seq_len: int | None = None
    max_num_tokens: int = 8192
    max_prompt_embedding_table_size: int = 0
    tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK
    dtype: torch.dtype = torch.float32
    world_size: int = 1                   # tp_size * pp_size of the engine's mapping: the ranks that run it

    @classmethod
    def from_build(cls, model, build: dict, dtype: torch.dtype = torch.float32) -> "ReferenceEngine":
        """From the ``trtllm.build`` flags of ``conf/export.yaml`` (keys it does not model are left out)."""
        names = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_prompt_embedding_table_size",
                 "tokens_per_block", "world_size")
        return cls(model, dtype=dtype, **{k: int(build[k]) for k in names if build.get(k) is not None})


@dataclass
class Result:
    output_token_ids: list[list[int]]
    is_final: bool
    finish_reasons: list[FinishReason]
    sequence_index: int = 0


@dataclass
class Response:
    request_id: int
    result: Result | None = None
    error_msg: str = ""
    client_id: int | None = None

    def has_error(self) -> bool:
        return self.result is None
