"""The Audex backbone as a TensorRT-LLM checkpoint (``config.json`` + ``rank{N}.safetensors``) for ``trtllm-build``.

TensorRT-LLM cannot be installed on the CPU machines this project is developed on, so the conversion is written
against TensorRT-LLM's own source and tested against that spec (weight names, shapes, config fields, sharding):

* weight names and the HF -> TRT-LLM mapping: ``tensorrt_llm/models/llama/convert.py``
  (``get_prefix_and_param_name_map`` and ``load_weights_from_hf_model``): ``q/k/v_proj`` -> one
  ``transformer.layers.{l}.attention.qkv.weight`` (each of q, k, v split by rows per TP rank, then concatenated
  ``[q_r; k_r; v_r]``; KV heads duplicated up to the TP size when there are fewer), ``o_proj`` ->
  ``attention.dense`` (split by columns), ``gate_proj`` -> ``mlp.fc`` and ``up_proj`` -> ``mlp.gate`` (rows),
  ``down_proj`` -> ``mlp.proj`` (columns), ``input_layernorm`` / ``post_attention_layernorm`` ->
  ``input_layernorm`` / ``post_layernorm`` (replicated), ``model.norm`` -> ``transformer.ln_f``,
  ``embed_tokens`` -> ``transformer.vocab_embedding`` (split only with ``use_parallel_embedding``), ``lm_head``
  (from the embedding when tied) padded to ``pad_vocab_size(vocab, tp)`` and split by rows;
* the split helpers: ``tensorrt_llm/models/convert_utils.py`` (``split``, ``dup_kv_weight``) and
  ``tensorrt_llm/_utils.py`` (``pad_vocab_size``);
* ``config.json``: ``PretrainedConfig.to_dict`` of ``tensorrt_llm/models/modeling_utils.py`` plus the fields
  ``LLaMAConfig.from_hugging_face`` sets (``tensorrt_llm/models/llama/config.py``), with ``mapping`` as
  ``Mapping.to_dict`` of ``tensorrt_llm/mapping.py`` writes it (without ``rank``) and ``quantization`` as
  ``QuantConfig`` (no quantisation);
* pipeline stages: ``Mapping.pp_layers`` (``torch.tensor_split`` of the layers), embedding on the first stage,
  ``ln_f`` and ``lm_head`` on the last; rank = ``pp_rank * tp_size + tp_rank``
  (``PretrainedModel.from_checkpoint`` loads ``rank{rank}.safetensors``).

The extended vocabulary is simply the table's size: 205,312 rows (a multiple of 512, so every power-of-two TP size
divides it). Audio enters through the prompt table: see :mod:`audex.export.frontend_onnx`.

Hybrid (Nemotron-H: Mamba2 + attention + MoE) backbones have no ``trtllm-build`` path; TensorRT-LLM serves them from
the Hugging Face folder with its PyTorch backend (``tensorrt_llm/_torch/models/modeling_nemotron_h.py``, whose
``NemotronHHfWeightMapper`` reads transformers 5's fused expert layout), so for them only the HF folder is written.

Example::

    >>> write_trtllm_checkpoint(model.backbone, "ckpt", dtype="bfloat16", tp_size=2)
    >>> sorted(os.listdir("ckpt"))
    ['config.json', 'rank0.safetensors', 'rank1.safetensors']
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LLAMA_FAMILY = ("llama", "mistral")  # the dense 2B backbone's family (tensorrt_llm/models/llama)


def pad_vocab_size(vocab_size: int, tp_size: int) -> int:
    """``tensorrt_llm._utils.pad_vocab_size``."""
    return int(math.ceil(vocab_size / tp_size) * tp_size)


def split(v: torch.Tensor, tp_size: int, idx: int, dim: int = 0) -> torch.Tensor:
    """``tensorrt_llm.models.convert_utils.split``: the ``idx``-th of ``tp_size`` equal chunks along ``dim``."""
    if tp_size == 1:
        return v
    if v.dim() == 1:
        return torch.chunk(v, tp_size)[idx].contiguous()
    return torch.chunk(v, tp_size, dim=dim)[idx].contiguous()


def dup_kv_weight(v: torch.Tensor, num_head: int, tp_size: int) -> torch.Tensor:
    """``tensorrt_llm.models.convert_utils.dup_kv_weight``: repeat each KV head so that every TP rank gets one."""
    if tp_size % num_head:
        raise ValueError(f"cannot share {num_head} KV heads over tp_size={tp_size}: tp_size must be a multiple of it")
    reps = tp_size // num_head
    head_size = v.shape[0] // num_head
    v = v.reshape(num_head, head_size, -1)[:, None, :, :].expand(num_head, reps, head_size, v.shape[1])
    return v.reshape(num_head * reps * head_size, -1).clone().detach()


def pp_layers(num_layers: int, pp_size: int, pp_rank: int) -> list[int]:
    """``tensorrt_llm.mapping.Mapping.pp_layers``."""
    if pp_size > num_layers:
        raise ValueError(f"pp_size={pp_size} is larger than the {num_layers} layers")
    return torch.tensor_split(torch.arange(num_layers), pp_size)[pp_rank].tolist()


def _rope(hf_config) -> tuple[float, dict | None]:
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return float(theta), scaling


def trtllm_config(hf_config, *, dtype: str = "bfloat16", tp_size: int = 1, pp_size: int = 1,
                  use_parallel_embedding: bool = False, embedding_sharding_dim: int = 0) -> dict:
    """``config.json`` of the checkpoint for a Llama-family transformers config (see the module docstring)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        raise ValueError(
            f"a TensorRT-LLM checkpoint for trtllm-build is written for Llama-family backbones, not {model_type!r}; "
            "hybrid Nemotron-H backbones are served by TensorRT-LLM's PyTorch backend from the HF folder (hf/)"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if tp_size < 1 or pp_size < 1:
        raise ValueError(f"tp_size and pp_size must be >= 1, got {tp_size}, {pp_size}")
    n_heads = int(hf_config.num_attention_heads)
    n_kv = int(getattr(hf_config, "num_key_value_heads", None) or n_heads)
    head_size = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads)
    if n_heads % tp_size:
        raise ValueError(f"{n_heads} attention heads do not split over tp_size={tp_size}")
    if n_kv >= tp_size and n_kv % tp_size or n_kv < tp_size and tp_size % n_kv:
        raise ValueError(f"{n_kv} KV heads do not split over (or duplicate to) tp_size={tp_size}")
    if hf_config.intermediate_size % tp_size:
        raise ValueError(f"intermediate_size {hf_config.intermediate_size} does not split over tp_size={tp_size}")
    rotary_base, rotary_scaling = _rope(hf_config)
    architecture = "LlamaForCausalLM" if model_type == "llama" else "MistralForCausalLM"
    world = tp_size * pp_size
    return {
        "architecture": architecture,
        "dtype": dtype,
        "vocab_size": int(hf_config.vocab_size),
        "hidden_size": int(hf_config.hidden_size),
        "num_hidden_layers": int(hf_config.num_hidden_layers),
        "num_attention_heads": n_heads,
        "hidden_act": str(hf_config.hidden_act),
        "logits_dtype": "float32",
        "norm_epsilon": float(hf_config.rms_norm_eps),
        "runtime_defaults": None,
        "position_embedding_type": "rope_gpt_neox",
        "num_key_value_heads": n_kv,
        "intermediate_size": int(hf_config.intermediate_size),
        "max_position_embeddings": int(hf_config.max_position_embeddings),
        # Mapping.to_dict of the pinned release without "rank"; it has no "auto_parallel" (Mapping(**mapping) raises)
        "mapping": {"world_size": world, "gpus_per_node": 8, "cp_size": 1, "tp_size": tp_size, "pp_size": pp_size,
                    "moe_tp_size": tp_size, "moe_cluster_size": 1, "moe_ep_size": 1, "attn_tp_size": tp_size,
                    "attn_cp_size": 1, "cp_config": {}, "enable_attention_dp": False,
                    "enable_lm_head_tp_in_adp": False},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128, "smoothquant_val": 0.5,
                         "clamp_val": None, "use_meta_recipe": False, "has_zero_point": False,
                         "pre_quant_scale": False, "exclude_modules": None},
        "use_parallel_embedding": bool(use_parallel_embedding),
        "embedding_sharding_dim": int(embedding_sharding_dim),
        "head_size": head_size,
        "qk_layernorm": False,
        "rotary_embedding_dim": head_size,
        "mlp_bias": bool(getattr(hf_config, "mlp_bias", False)),
        "attn_bias": bool(getattr(hf_config, "attention_bias", False)),
        "rotary_base": rotary_base,
        "rotary_scaling": rotary_scaling,
        "residual_mlp": False,
        "disable_weight_only_quant_plugin": False,
        "tie_word_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)),
    }


def convert_llama_weights(state_dict: dict[str, torch.Tensor], config: dict, rank: int) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` state dict -> the tensors of ``rank{rank}.safetensors`` (works on meta tensors too)."""
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    tp_rank, pp_rank = rank % tp, rank // tp
    dtype = DTYPES[config["dtype"]]
    n_kv = config["num_key_value_heads"]
    mha = n_kv == config["num_attention_heads"]
    layers = pp_layers(config["num_hidden_layers"], pp, pp_rank)
    out: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in state_dict:
            raise KeyError(f"the backbone has no weight {name!r}: is it a Llama-family transformers model?")
        return state_dict[name].detach().to(dtype)

    for local, layer in enumerate(layers):
        src, dst = f"model.layers.{layer}.", f"transformer.layers.{local}."
        q, k, v = (get(src + f"self_attn.{p}_proj.weight") for p in "qkv")
        if not mha and n_kv < tp:
            k, v = dup_kv_weight(k, n_kv, tp), dup_kv_weight(v, n_kv, tp)
        # GQA: split q, k, v separately; MHA: split_qkv_tp, which gives the same [q_r; k_r; v_r] rows
        out[dst + "attention.qkv.weight"] = torch.cat([split(q, tp, tp_rank), split(k, tp, tp_rank),
                                                       split(v, tp, tp_rank)], dim=0)
        if config["attn_bias"]:
            qb, kb, vb = (get(src + f"self_attn.{p}_proj.bias") for p in "qkv")
            out[dst + "attention.qkv.bias"] = torch.cat([split(qb, tp, tp_rank), split(kb, tp, tp_rank),
                                                         split(vb, tp, tp_rank)])
        out[dst + "attention.dense.weight"] = split(get(src + "self_attn.o_proj.weight"), tp, tp_rank, dim=1)
        out[dst + "mlp.fc.weight"] = split(get(src + "mlp.gate_proj.weight"), tp, tp_rank, dim=0)
        out[dst + "mlp.gate.weight"] = split(get(src + "mlp.up_proj.weight"), tp, tp_rank, dim=0)
        out[dst + "mlp.proj.weight"] = split(get(src + "mlp.down_proj.weight"), tp, tp_rank, dim=1)
        out[dst + "input_layernorm.weight"] = get(src + "input_layernorm.weight")
        out[dst + "post_layernorm.weight"] = get(src + "post_attention_layernorm.weight")

    embedding = get("model.embed_tokens.weight")
    if pp_rank == pp - 1:
        head_weight = embedding if config["tie_word_embeddings"] or "lm_head.weight" not in state_dict else get("lm_head.weight")
        padded = pad_vocab_size(config["vocab_size"], tp)
        if padded != head_weight.shape[0]:
            head_weight = torch.nn.functional.pad(head_weight, (0, 0, 0, padded - head_weight.shape[0]))
        out["lm_head.weight"] = split(head_weight, tp, tp_rank)
        out["transformer.ln_f.weight"] = get("model.norm.weight")
    if pp_rank == 0:
        if config["use_parallel_embedding"]:
            embedding = split(embedding, tp, tp_rank, dim=config["embedding_sharding_dim"])
        out["transformer.vocab_embedding.weight"] = embedding
    return out


def write_trtllm_checkpoint(lm, out_dir: str | Path, *, dtype: str = "bfloat16", tp_size: int = 1, pp_size: int = 1,
                            use_parallel_embedding: bool = False) -> Path:
    """``config.json`` + ``rank{N}.safetensors`` for every rank of ``tp_size * pp_size``."""
    config = trtllm_config(lm.config, dtype=dtype, tp_size=tp_size, pp_size=pp_size,
                           use_parallel_embedding=use_parallel_embedding)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=4))
    state = {k: v for k, v in lm.state_dict().items()}
    for rank in range(tp_size * pp_size):
        weights = convert_llama_weights(state, config, rank)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"rank{rank}.safetensors"))
    return out


def trtllm_build_command(checkpoint_dir: str | Path, engine_dir: str | Path, build: dict) -> list[str]:
    """The ``trtllm-build`` command line for the checkpoint (audio goes through the prompt table, hence
    ``--max_prompt_embedding_table_size``)."""
    cmd = ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(engine_dir)]
    for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_prompt_embedding_table_size",
                "tokens_per_block", "gemm_plugin"):
        if build.get(key) is not None:
            cmd += [f"--{key}", str(build[key])]
    return cmd


# the trtllm-build sizes that serving needs to know (copied into the Triton LLM model's parameters)
BUILD_KEYS = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_prompt_embedding_table_size",
              "tokens_per_block")


def check_prompt_table(build: dict, max_audio_seconds: float, frames_per_window: int, window_seconds: float) -> int:
    """Rows one clip of ``max_audio_seconds`` needs in the prompt table; ``ValueError`` when the engine cannot give
    them to every request. TensorRT-LLM gives each request ``max_prompt_embedding_table_size // max_batch_size`` rows
    (``PromptTuningBuffers``) and a clip takes whole encoder windows (750 frames per 30 s)."""
    rows = math.ceil(max_audio_seconds / window_seconds) * int(frames_per_window)
    batch = int(build["max_batch_size"])
    size = int(build.get("max_prompt_embedding_table_size") or 0)
    if size // batch < rows:
        raise ValueError(
            f"trtllm.build.max_prompt_embedding_table_size={size} gives each of max_batch_size={batch} requests "
            f"{size // batch} rows, but one clip of serve.max_audio_seconds={max_audio_seconds:g} takes {rows} "
            f"rows ({frames_per_window} frames per {window_seconds:g} s window): set "
            f"max_prompt_embedding_table_size to at least {rows * batch} (= {rows} x {batch}) and rebuild the engine, "
            "or lower max_batch_size / max_audio_seconds")
    return rows


def tensorrt_llm_available() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


def build_engine(checkpoint_dir: str | Path, engine_dir: str | Path, build: dict) -> str:
    """Run ``trtllm-build`` when TensorRT-LLM is installed; otherwise return the command to run on a GPU host."""
    cmd = trtllm_build_command(checkpoint_dir, engine_dir, build)
    if not tensorrt_llm_available():
        return ("tensorrt_llm is not importable here (it installs only on CUDA hosts); build the engine on a GPU "
                f"host with:\n  {shlex.join(cmd)}")
    subprocess.run(cmd, check=True)
    return f"built the TensorRT-LLM engine in {engine_dir}"

