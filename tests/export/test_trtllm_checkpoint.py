"""TensorRT-LLM checkpoint and HF folder export, checked against TensorRT-LLM's conversion spec
(tensorrt_llm/models/llama/convert.py, config.py, modeling_utils.py, mapping.py)."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from audex import config_path
from audex.cli.export import main as export_main
from audex.export.hf_folder import export_hf_folder
from audex.export.trtllm_checkpoint import (
    convert_llama_weights,
    trtllm_build_command,
    trtllm_config,
    write_trtllm_checkpoint,
)
from audex.models.checkpoint import CorruptCheckpointError, check_nemo_archive, load_model

PRETRAINED_CONFIG_FIELDS = {  # PretrainedConfig.__init__ (modeling_utils.py) + LLaMAConfig fields
    "architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
    "logits_dtype", "norm_epsilon", "position_embedding_type", "num_key_value_heads", "intermediate_size",
    "max_position_embeddings", "mapping", "quantization", "use_parallel_embedding", "embedding_sharding_dim",
    "head_size", "rotary_embedding_dim", "rotary_base", "rotary_scaling", "mlp_bias", "attn_bias",
}


def layer_names(local: int) -> set[str]:
    p = f"transformer.layers.{local}."
    return {p + n for n in ("attention.qkv.weight", "attention.dense.weight", "mlp.fc.weight", "mlp.gate.weight",
                            "mlp.proj.weight", "input_layernorm.weight", "post_layernorm.weight")}


def from_trtllm(ranks: list[dict], config: dict) -> dict:
    """Inverse of the spec, written independently: TP shards -> one HF Llama state dict."""
    tp = config["mapping"]["tp_size"]
    h, n_q, n_kv, d = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    q_rows, kv_rows = n_q * d // tp, max(n_kv, tp) * d // tp
    sd = {}
    for layer in range(config["num_hidden_layers"]):
        t = f"transformer.layers.{layer}."
        qkv = [r[t + "attention.qkv.weight"] for r in ranks]
        sd[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.cat([x[:q_rows] for x in qkv])
        k = torch.cat([x[q_rows:q_rows + kv_rows] for x in qkv])
        v = torch.cat([x[q_rows + kv_rows:] for x in qkv])
        if n_kv < tp:  # undo the duplication: keep one copy of each head
            k, v = (w.reshape(n_kv, tp // n_kv, d, h)[:, 0].reshape(n_kv * d, h) for w in (k, v))
        sd[f"model.layers.{layer}.self_attn.k_proj.weight"] = k
        sd[f"model.layers.{layer}.self_attn.v_proj.weight"] = v
        sd[f"model.layers.{layer}.self_attn.o_proj.weight"] = torch.cat([r[t + "attention.dense.weight"] for r in ranks], 1)
        sd[f"model.layers.{layer}.mlp.gate_proj.weight"] = torch.cat([r[t + "mlp.fc.weight"] for r in ranks])
        sd[f"model.layers.{layer}.mlp.up_proj.weight"] = torch.cat([r[t + "mlp.gate.weight"] for r in ranks])
        sd[f"model.layers.{layer}.mlp.down_proj.weight"] = torch.cat([r[t + "mlp.proj.weight"] for r in ranks], 1)
        sd[f"model.layers.{layer}.input_layernorm.weight"] = ranks[0][t + "input_layernorm.weight"]
        sd[f"model.layers.{layer}.post_attention_layernorm.weight"] = ranks[0][t + "post_layernorm.weight"]
    sd["model.embed_tokens.weight"] = ranks[0]["transformer.vocab_embedding.weight"]
    sd["model.norm.weight"] = ranks[0]["transformer.ln_f.weight"]
    sd["lm_head.weight"] = torch.cat([r["lm_head.weight"] for r in ranks])[: config["vocab_size"]]
    return sd


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_tiny_checkpoint_names_config_and_shards_rebuild_the_same_logits(tiny_model, tmp_path, tp_size):
    lm = tiny_model.backbone
    out = write_trtllm_checkpoint(lm, tmp_path / "ckpt", dtype="float32", tp_size=tp_size)
    config = json.loads((out / "config.json").read_text())
    assert PRETRAINED_CONFIG_FIELDS <= set(config)
    assert config["architecture"] == "LlamaForCausalLM" and config["position_embedding_type"] == "rope_gpt_neox"
    assert config["vocab_size"] == tiny_model.vocab.size == 1536
    assert config["mapping"]["world_size"] == tp_size and config["mapping"]["tp_size"] == tp_size
    assert "rank" not in config["mapping"]                          # PretrainedConfig.to_dict pops it
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] + [f"rank{r}.safetensors" for r in range(tp_size)]
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(tp_size)]
    expected = set().union(*(layer_names(i) for i in range(4))) | {
        "transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for r in ranks:
        assert set(r) == expected
        # tiny: 4 query heads, 2 KV heads of 32 -> qkv rows (4 + 2 * max(2, tp)) * 32 / tp
        assert r["transformer.layers.0.attention.qkv.weight"].shape == ((4 + 2 * max(2, tp_size)) * 32 // tp_size, 128)
        assert r["transformer.layers.0.mlp.fc.weight"].shape == (384 // tp_size, 128)
        assert r["transformer.layers.0.attention.dense.weight"].shape == (128, 128 // tp_size)
        assert r["lm_head.weight"].shape == (1536 // tp_size, 128)
    rebuilt = from_trtllm(ranks, config)
    state = lm.state_dict()
    for name, tensor in rebuilt.items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_config(lm.config)
    twin.load_state_dict(rebuilt, strict=True)
    ids = torch.tensor([[1, 5, 9, 700, 1400, 42]])
    torch.testing.assert_close(twin.eval()(ids).logits, lm(ids).logits)


def test_2b_checkpoint_plan_on_the_meta_device_with_tp4():
    import hydra

    from audex.vocab import AudexVocab

    cfg = OmegaConf.load(config_path("model", "audex_2b.yaml"))
    vocab = AudexVocab(**OmegaConf.to_container(cfg.vocab))
    with torch.device("meta"):
        backbone = hydra.utils.instantiate(cfg.backbone, _convert_="all", vocab_size=vocab.size,
                                           text_vocab_size=vocab.text_vocab_size)
    lm = backbone.lm
    config = trtllm_config(lm.config, dtype="bfloat16", tp_size=4)
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == \
        (205312, 2048, 28, 9216)
    assert config["tie_word_embeddings"] is True and config["rotary_base"] == 1e6
    state = lm.state_dict()
    weights = convert_llama_weights(state, config, rank=3)
    assert all(w.is_meta for w in weights.values())                  # no weight was allocated
    assert len(weights) == 28 * 7 + 3
    assert weights["transformer.layers.27.attention.qkv.weight"].shape == ((16 + 2 * 4) * 128 // 4, 2048)
    assert weights["transformer.layers.0.mlp.fc.weight"].shape == (9216 // 4, 2048)
    assert weights["transformer.layers.0.mlp.proj.weight"].shape == (2048, 9216 // 4)
    assert weights["lm_head.weight"].shape == (205312 // 4, 2048)   # tied: taken from the embedding
    assert weights["transformer.vocab_embedding.weight"].shape == (205312, 2048)
    cmd = trtllm_build_command("ckpt", "engine", {"max_prompt_embedding_table_size": 24000, "max_batch_size": 64})
    assert cmd[:5] == ["trtllm-build", "--checkpoint_dir", "ckpt", "--output_dir", "engine"]
    assert "--max_prompt_embedding_table_size" in cmd


def test_pipeline_parallel_ranks_hold_their_stage():
    cfg = OmegaConf.load(config_path("model", "audex_2b.yaml"))
    from transformers import AutoConfig

    hf = AutoConfig.for_model("llama", **OmegaConf.to_container(cfg.backbone.config))
    hf.vocab_size = 205312
    config = trtllm_config(hf, tp_size=2, pp_size=2)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        state = AutoModelForCausalLM.from_config(hf).state_dict()
    first, last = convert_llama_weights(state, config, rank=1), convert_llama_weights(state, config, rank=2)
    assert "transformer.vocab_embedding.weight" in first and "lm_head.weight" not in first
    assert "lm_head.weight" in last and "transformer.ln_f.weight" in last
    assert {k for k in first if ".layers." in k} == set().union(*(layer_names(i) for i in range(14)))


def test_hybrid_backbone_is_refused_with_the_hf_route(tmp_path):
    from transformers import AutoConfig

    hf = AutoConfig.for_model("nemotron_h")
    with pytest.raises(ValueError, match="PyTorch backend from the HF folder"):
        trtllm_config(hf)


def test_hf_folder_reloads_with_identical_logits(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = export_hf_folder(tiny_model, tmp_path / "hf")
    lm = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    tok = tiny_model.tokenizer
    ids = torch.tensor([tok.encode("<|im_start|>user\nHello<|im_end|>") + [tiny_model.vocab.speechgen_start, 800]])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, tiny_model(input_ids=ids).logits, rtol=0, atol=0)
    meta = json.loads((folder / "audex_export.json").read_text())
    assert meta["vocab_size"] == 1536 and meta["so_embedding_id"] == tok.so_embedding


def test_nemo_roundtrip_and_corrupt_or_truncated_archives(tiny_model, tmp_path):
    nemo = tmp_path / "tiny.nemo"
    tiny_model.save_to(str(nemo))
    assert any(n.endswith("model_config.yaml") for n in check_nemo_archive(nemo))
    restored = load_model(nemo)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, tiny_model(input_ids=ids).logits)
    data = nemo.read_bytes()
    (tmp_path / "cut.nemo").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="cut.nemo.*truncated or corrupt"):
        load_model(tmp_path / "cut.nemo")
    (tmp_path / "junk.nemo").write_bytes(b"not an archive at all" * 100)
    with pytest.raises(CorruptCheckpointError, match="junk.nemo"):
        load_model(tmp_path / "junk.nemo")
    (tmp_path / "empty.nemo").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        load_model(tmp_path / "empty.nemo")


def export_cli(overrides):
    """``audex-export`` with these command-line overrides."""
    with initialize_config_dir(str(config_path()), version_base=None):
        return export_main(compose("export", overrides=overrides))


def test_export_cli_writes_the_whole_folder_and_explains_the_engine_build(tiny_model, tmp_path, capsys):
    nemo = tmp_path / "tiny.nemo"
    tiny_model.save_to(str(nemo))
    export_cli([f"model_path={nemo}", f"export_dir={tmp_path / 'out'}", "trtllm.tp_size=2", "trtllm.dtype=float32"])
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"hf", "trtllm_ckpt", "frontend.onnx", "speech_codec", "audio_codec",
                                               "manifest.json"}
    assert sorted(p.name for p in (out / "trtllm_ckpt").iterdir()) == ["config.json", "rank0.safetensors",
                                                                      "rank1.safetensors"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab"]["size"] == 1536
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].strip().startswith("trtllm-build --checkpoint_dir") and "--max_prompt_embedding_table_size" in printed[-1]
    assert "tensorrt_llm is not importable" in "\n".join(printed)
    with pytest.raises(CorruptCheckpointError):
        (tmp_path / "bad.nemo").write_bytes(nemo.read_bytes()[:1000])
        export_cli([f"model_path={tmp_path / 'bad.nemo'}", f"export_dir={tmp_path / 'bad'}"])


@pytest.mark.gpu
def test_engine_build_and_greedy_equality_on_a_gpu(tiny_model, tmp_path):
    """On a GPU host with TensorRT-LLM: build the tiny engine and compare its greedy tokens with PyTorch's."""
    pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM is not installed (it installs only on CUDA hosts)")
    from tensorrt_llm import SamplingParams as TrtSampling

    # in 1.x ``tensorrt_llm.LLM`` is the PyTorch-backend LLM (an HF folder); engines load with this one
    from tensorrt_llm._tensorrt_engine import LLM

    from audex.inference.decoding import AudexDecoder
    from audex.inference.sampling import SamplingParams

    ckpt = write_trtllm_checkpoint(tiny_model.backbone, tmp_path / "ckpt", dtype="float32")
    import subprocess

    subprocess.run(trtllm_build_command(ckpt, tmp_path / "engine", {"max_batch_size": 4, "max_input_len": 256,
                                                                     "max_seq_len": 320}), check=True)
    prompt = tiny_model.tokenizer.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    llm = LLM(model=str(tmp_path / "engine"), skip_tokenizer_init=True)
    out = llm.generate([prompt], TrtSampling(max_tokens=16, temperature=0.0, end_id=tiny_model.tokenizer.im_end,
                                             pad_id=tiny_model.tokenizer.pad_id))
    ref = AudexDecoder.for_model(tiny_model).generate([prompt], SamplingParams(do_sample=False, max_new_tokens=16))
    assert list(out[0].outputs[0].token_ids)[: len(ref.token_ids[0])] == ref.token_ids[0]
