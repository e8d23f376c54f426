"""Tensor/pipeline parallelism as TensorRT-LLM's own Triton model runs it (leader or orchestrator mode), on the
reference executor: only the rank that takes requests answers them, a participant refuses the client API and the LLM
model on it waits for the leader; an engine for two ranks in a one-process job is refused, as the MPI world check
does. What only a GPU host shows (the engine's shards computing together, the batched Python post-processor in
orchestrator mode) is in tests/gpu."""

import pytest
from test_guided_executor import Collector, engine_cfg, speech_job
from test_strict_executor import prompts  # noqa: F401 - the module fixture

import audex.serving.reference_executor as trtllm
from audex.serving.guided_executor import GuidedExecutor
from audex.serving.triton.handlers import parallel_config


def mpi_job(monkeypatch, rank: int, size: int) -> None:
    """This process as rank ``rank`` of an ``mpirun -n size`` job (the variables Open MPI sets)."""
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", str(rank))
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", str(size))


def engine(model, world_size):
    return trtllm.ReferenceEngine(model.backbone, max_batch_size=8, max_input_len=4096, max_num_tokens=8192,
                                  max_prompt_embedding_table_size=8 * 800, world_size=world_size)


def test_leader_mode_only_rank_0_takes_and_answers_requests(tiny_model, prompts, monkeypatch):  # noqa: F811
    cond, uncond = prompts
    mpi_job(monkeypatch, 1, 2)
    participant = GuidedExecutor.create(trtllm, engine(tiny_model, 2), tiny_model.tokenizer, trtllm.ExecutorConfig())
    try:
        assert not participant.executor.can_enqueue_requests()
        with pytest.raises(RuntimeError, match="only the leader rank"):
            participant.executor.enqueue_requests([trtllm.Request([1, 2, 3], 2)])
        with pytest.raises(RuntimeError, match="only the leader rank"):
            participant.executor.await_responses(timeout=None)
    finally:
        participant.shutdown()                     # returns: the reference has no leader to wait for
    mpi_job(monkeypatch, 0, 2)
    leader = GuidedExecutor.create(trtllm, engine(tiny_model, 2), tiny_model.tokenizer, trtllm.ExecutorConfig())
    try:
        got = Collector()
        job = leader.submit(speech_job(tiny_model, cond[0], uncond[0]), got)
        assert got.wait(job)[-1].tokens == engine_cfg(tiny_model, cond[:1], uncond[:1])[0]   # a CFG pair, guided
        assert leader.stats["unguided"] == 0
    finally:
        leader.shutdown()
    mpi_job(monkeypatch, 0, 1)                     # a two-rank engine in a one-process job
    with pytest.raises(RuntimeError, match="LEADER mode needs one MPI process per rank, but this job has 1"):
        trtllm.Executor(engine(tiny_model, 2), trtllm.ModelType.DECODER_ONLY, trtllm.ExecutorConfig())


def test_orchestrator_mode_follows_tensorrt_llms_triton_model(tiny_model, monkeypatch):
    params = {"gpu_device_ids": "0,1", "executor_worker_path": "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"}
    assert parallel_config(trtllm, {}) is None                               # LEADER mode: the MPI job decides
    leader = parallel_config(trtllm, {"gpu_device_ids": "0,1"})
    assert leader.communication_mode is trtllm.CommunicationMode.LEADER and leader.device_ids == [0, 1]
    monkeypatch.setenv("TRTLLM_ORCHESTRATOR", "1")
    orch = parallel_config(trtllm, params)
    assert orch.communication_mode is trtllm.CommunicationMode.ORCHESTRATOR
    assert orch.orchestrator_config.is_orchestrator                          # MPI rank 0 (one process, no mpirun)
    assert orch.orchestrator_config.worker_executable_path == params["executor_worker_path"]
    # one server process, the engine's two ranks spawned as workers: the orchestrator takes the requests
    executor = trtllm.Executor(engine(tiny_model, 2), trtllm.ModelType.DECODER_ONLY,
                               trtllm.ExecutorConfig(parallel_config=orch))
    try:
        assert executor.can_enqueue_requests()
        rid = executor.enqueue_request(trtllm.Request([1, 2, 3], 2))
        assert executor.await_responses(rid)[-1].result.is_final
    finally:
        executor.shutdown()
    with pytest.raises(ValueError, match="worker_path is no longer supported"):
        parallel_config(trtllm, params | {"worker_path": "/x"})
    monkeypatch.setenv("TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES", "0")
    with pytest.raises(ValueError, match="disable-spawn-processes is not supported"):
        parallel_config(trtllm, params)
    with pytest.raises(TypeError, match="unexpected keyword argument 'communication'"):
        trtllm.ParallelConfig(communication=1)
