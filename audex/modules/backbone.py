"""The LLM backbone: a transformers causal LM, loaded or built from config, with the extended vocabulary.

Dense 2B models use the Llama family (``model_type: llama``); the 30B-A3B model is Nemotron-H
(``model_type: nemotron_h``: hybrid Mamba2 / attention / MoE). Any ``AutoModelForCausalLM`` architecture
whose embeddings can be resized works.

Vocabulary extension (section 3.1): the embedding table and, when untied, the output head grow from the
text vocabulary to :attr:`AudexVocab.size`; every new row is drawn from N(0, 0.02) with a dedicated,
seeded generator (transformers' ``resize_token_embeddings`` would initialise them to the mean of the old
rows), and the existing text rows are kept bit-identical.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from audex.modules.megatron_backbone import megatron_lm
from audex.parallel.config import check_engine
from audex.parallel.sharded_read import new_vocabulary_rows, sharded_read_refusal

log = logging.getLogger(__name__)
_ON_META = contextvars.ContextVar("audex_backbone_on_meta", default=None)


@contextlib.contextmanager
def backbone_on_meta(read_shards: bool = False, rank0: bool = False):
    """Within this block an engine-``hf`` :class:`AudexBackbone` is built on the meta device: its architecture and
    the extended vocabulary, no weights (nothing is read from ``pretrained_path``, nothing is allocated). A split
    training run builds so on every rank but 0; ``AudexModel.configure_model`` shards it and broadcasts rank 0's
    weights into the shards (:func:`audex.parallel.sharding.materialize_from_rank0`).

    ``read_shards`` (every rank of a split run whose backbone comes from ``pretrained_path``, rank 0 included):
    the backbone records its folder as ``sharded_source`` and each rank later reads its own shards from the
    safetensors files (:mod:`audex.parallel.sharded_read`). Where the folder cannot be read so
    (:func:`~audex.parallel.sharded_read.sharded_read_refusal`, the reason is logged), the ``rank0`` process loads
    the whole model instead and the others stay on meta: the broadcast path above."""
    token = _ON_META.set({"read_shards": read_shards, "rank0": rank0})
    try:
        yield
    finally:
        _ON_META.reset(token)


def build_causal_lm(pretrained_path: str | None, config: dict | None, model_type: str | None, dtype=None):
    """A transformers causal LM from a local folder or an inline config (random init). Hub kernels stay off
    (transformers >= 5.25 turns them on by default): loading is offline and the forwards are the torch ones the
    parallel plans and the export were checked against."""
    if pretrained_path:
        if not Path(pretrained_path).exists():
            raise FileNotFoundError(
                f"backbone folder {pretrained_path!r} does not exist: set model.backbone.pretrained_path to a local "
                "Hugging Face folder (no downloads at run time)"
            )
        meta = _ON_META.get()
        if meta:      # the folder's architecture only; the weights come from rank 0 or from the shards' reads
            hf_cfg = AutoConfig.from_pretrained(pretrained_path, local_files_only=True)
            saved = getattr(hf_cfg, "dtype", None)           # what dtype="auto" loads
            saved = getattr(torch, saved) if isinstance(saved, str) else saved
            with torch.device("meta"):
                lm = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype or saved)
            if not meta["read_shards"]:
                return lm
            why = "config.json records no dtype" if (dtype or saved) is None else sharded_read_refusal(
                lm, pretrained_path)
            if why is None:
                lm.audex_read_from = str(pretrained_path)
                return lm
            log.warning("backbone %s is not read shard by shard (%s): rank 0 loads it whole and broadcasts it",
                        pretrained_path, why)
            if not meta["rank0"]:
                return lm
        return AutoModelForCausalLM.from_pretrained(pretrained_path, local_files_only=True, dtype=dtype or "auto",
                                                    use_kernels=False)
    if not model_type:
        raise ValueError("model.backbone needs either pretrained_path or model_type + config")
    hf_cfg = AutoConfig.for_model(model_type, **dict(config or {}))
    meta = _ON_META.get()
    if meta and not meta["rank0"]:     # an inline config: the weights come from rank 0 (no folder to read)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)


@torch.no_grad()
def extend_vocabulary(lm: nn.Module, new_size: int, init_std: float = 0.02, seed: int = 0) -> int:
    """Grow ``lm``'s input embeddings (and untied output head) to ``new_size`` rows.

    Returns the old size. Old rows are copied bit-exactly; new rows ~ N(0, init_std)
    (:func:`audex.parallel.sharded_read.new_vocabulary_rows`, which the sharded read draws alike).
    """
    emb = lm.get_input_embeddings()
    old_size, dim = emb.weight.shape
    if new_size < old_size:
        raise ValueError(f"the extended vocabulary ({new_size}) is smaller than the backbone's ({old_size})")
    if new_size == old_size:
        return old_size
    is_meta = emb.weight.device.type == "meta"
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    head = lm.get_output_embeddings()
    tables = [emb.weight] + ([head.weight] if head is not None and not tied else [])
    extras = [] if is_meta else new_vocabulary_rows(old_size, new_size, [int(w.shape[1]) for w in tables],
                                                     init_std, seed)

    def grown(weight: torch.Tensor, i: int) -> torch.Tensor:
        if is_meta:
            return torch.empty(new_size, weight.shape[1], dtype=weight.dtype, device="meta")
        return torch.cat([weight, extras[i].to(device=weight.device, dtype=weight.dtype)], dim=0)

    # The eager build's new modules draw their (discarded) default init from the global generator, as they always
    # have: the parts built after the backbone (the adapter) start from those draws, in the demo and every saved
    # run. On meta nothing is drawn, so rank 0 of a sharded read (whose adapter every rank receives) makes the
    # same draws with throw-away CPU modules: its adapter then equals one process's.
    meta = _ON_META.get()
    spend = is_meta and bool(meta and meta["rank0"] and meta["read_shards"])
    device = "meta" if is_meta else emb.weight.device
    if spend:
        nn.Embedding(new_size, dim, dtype=emb.weight.dtype)
    new_emb = nn.Embedding(new_size, dim, device=device, dtype=emb.weight.dtype)
    new_emb.weight = nn.Parameter(grown(emb.weight, 0), requires_grad=emb.weight.requires_grad)
    lm.set_input_embeddings(new_emb)
    if head is not None:
        if tied:
            head.weight = new_emb.weight
        else:
            if spend:
                nn.Linear(dim, new_size, bias=head.bias is not None, dtype=head.weight.dtype)
            new_head = nn.Linear(dim, new_size, bias=head.bias is not None, device=device, dtype=head.weight.dtype)
            new_head.weight = nn.Parameter(grown(head.weight, 1))
            if head.bias is not None:
                new_head.bias = nn.Parameter(torch.cat([head.bias, torch.zeros(new_size - old_size, dtype=head.bias.dtype,
                                                                                 device=head.bias.device)]))
            lm.set_output_embeddings(new_head)
    lm.config.vocab_size = new_size
    return old_size


class AudexBackbone(nn.Module):
    """A causal LM with the extended Audex vocabulary.

    Args:
        pretrained_path: local Hugging Face folder with real weights.
        model_type: transformers ``model_type`` for a randomly initialised backbone (``llama``, ``nemotron_h``).
        config: the transformers config kwargs (``hidden_size``, ``num_hidden_layers``, ...).
        vocab_size: size of the extended vocabulary (set by :class:`AudexModel` from its vocabulary).
        text_vocab_size: the text rows, for a checkpoint that is already extended to ``vocab_size``.
        init_std / init_seed: initialisation of the new embedding rows.
        engine: ``hf`` (transformers modules, torch-native parallelism) or ``megatron``: the same weights, loaded
            and vocabulary-extended as for ``hf``, then converted into megatron-core's model
            (:class:`audex.modules.megatron_backbone.MegatronCausalLM`, same interface as ``lm``).
        parallelism: engine ``megatron``: the ``parallelism:`` sizes (a dict); None = read from megatron-core's
            initialised parallel state (:func:`audex.parallel.megatron_strategy.init_model_parallel`).
        megatron: engine ``megatron``: extra ``TransformerConfig`` fields (router bias update rate, recompute, ...).

    Example::

        bb = AudexBackbone(model_type="llama", config=dict(hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, vocab_size=512), vocab_size=1536)
        bb.lm(input_ids=torch.tensor([[1, 2, 3]])).logits.shape   # [1, 3, 1536]
    """

    def __init__(self, pretrained_path: str | None = None, model_type: str | None = None, config: dict | None = None,
                 vocab_size: int | None = None, init_std: float = 0.02, init_seed: int = 0, dtype: str | None = None,
                 text_vocab_size: int | None = None, engine: str = "hf", parallelism: dict | None = None,
                 megatron: dict | None = None):
        super().__init__()
        self.engine = check_engine(engine)
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else None
        self.lm = build_causal_lm(pretrained_path, config, model_type, dtype=torch_dtype)
        folder = self.lm.__dict__.pop("audex_read_from", None)   # backbone_on_meta(read_shards=True), not refused
        #: where configure_model reads this rank's shards from (audex.parallel.sharded_read); None: not so read
        self.sharded_source = None if folder is None else {"folder": folder, "init_std": init_std, "init_seed": init_seed}
        self.read_report: dict | None = None
        rows = int(self.lm.get_input_embeddings().weight.shape[0])
        # a folder written by AudexModel.save_pretrained is already extended: keep it as it is
        already_extended = vocab_size is not None and rows == vocab_size and text_vocab_size is not None
        self.text_vocab_size = int(text_vocab_size) if already_extended else rows
        if vocab_size is not None and not already_extended:
            extend_vocabulary(self.lm, int(vocab_size), init_std=init_std, seed=init_seed)
        if self.engine == "megatron":
            if self.on_meta:
                raise ValueError("engine megatron builds its own sharded model: backbone_on_meta() is for engine hf")
            self.lm = megatron_lm(self.lm, parallelism, dtype=torch_dtype, overrides=megatron)

    @property
    def on_meta(self) -> bool:
        """True while the weights are not materialised (built within :func:`backbone_on_meta`)."""
        return self.lm.get_input_embeddings().weight.device.type == "meta"

    @property
    def hidden_size(self) -> int:
        return int(self.lm.config.hidden_size)

    def forward(self, **kwargs):
        return self.lm(**kwargs)
