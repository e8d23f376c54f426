"""Deployment: TensorRT-LLM checkpoints and HF folders, the ONNX audio front end, CFG pairing for in-flight
batching, Triton model repositories and a live Triton server (see each module). Importing this package is
cheap on purpose: the Triton python-backend proxy imports from it inside a NumPy-1 interpreter."""
