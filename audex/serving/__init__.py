"""Online serving of Audex: the request schema, the local engine, CFG pairing for in-flight batching, Triton.

Vocabulary (each word means one thing in this package):

* **TensorRT-LLM engine** (or just *engine* in TensorRT-LLM's own names such as ``engine_dir``): the compiled LLM that
  ``trtllm-build`` writes from the checkpoint of :mod:`audex.export.trtllm_checkpoint`. It runs the backbone only.
* **local engine** (:class:`~audex.serving.local_engine.LocalEngine`): whole requests served in this process with
  Audex's own PyTorch generation (:class:`~audex.inference.pipelines.AudexPipeline`); no TensorRT-LLM.
* **executor**: the in-flight batching scheduler API of ``tensorrt_llm.bindings.executor`` over a TensorRT-LLM
  engine, or the **reference executor** (:mod:`audex.serving.reference_executor`), the same API over PyTorch and the
  export's ``hf/`` folder; the **guided executor** (:mod:`audex.serving.guided_executor`) runs TTS/TTA on either as
  CFG pairs (:mod:`audex.serving.cfg_pairing`).
* **request** (:mod:`audex.serving.requests`): one client request (:class:`~audex.serving.requests.ServeRequest`),
  validated once, the same way everywhere.
* Triton (:mod:`audex.serving.triton`): a **repository** (``config.pbtxt`` files, :mod:`~audex.serving.triton.repository`),
  the one **python model** every python-backend model of it is (:mod:`~audex.serving.triton.python_model`), the
  **handler** it runs (the local engine, or one step of the GPU ensemble: :mod:`~audex.serving.triton.handlers`),
  the **worker** process that hosts a handler when the stub cannot (:mod:`~audex.serving.triton.worker`), and the
  **launcher** that starts ``tritonserver`` (:mod:`~audex.serving.triton.launcher`).

Importing this package is cheap on purpose: the Triton python model imports from it inside a NumPy-1 stub.
"""
