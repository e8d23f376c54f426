"""Offline export of an Audex model: the Hugging Face folder, the TensorRT-LLM checkpoint, the ONNX audio front end,
and the export folder that bundles them (see each module). Online serving lives in :mod:`audex.serving`."""
