"""Export an Audex .nemo for TensorRT-LLM + Triton (also installed as the console script ``audex-export-trtllm``).

    python scripts/export_trtllm.py model_path=audex_2b.nemo export_dir=audex_export trtllm.tp_size=2

Writes hf/, trtllm_ckpt/, frontend.onnx, the codec folders and manifest.json (see audex.export.bundle); builds the
engine when tensorrt_llm is importable, otherwise prints the trtllm-build command for a GPU host.
"""

from audex.export.bundle import main

if __name__ == "__main__":
    main()
