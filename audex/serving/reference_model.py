"""The model side of the reference executor (:mod:`audex.serving.reference_executor`): the transformers causal LM
that stands in for a TensorRT-LLM engine, its prompt-table embedding and one forward pass of one request.

Prompt ids from the vocabulary size on index ``PromptTuningConfig.embedding_table`` (row ``id - vocab_size``):
Audex's audio frames. The table is checked (``PromptTuningBuffers::validate``: rows per request, the weights' dtype)
when a context enters the step, as the engine does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from audex.serving.executor_api import ReferenceEngine
from audex.serving.executor_blocks import check_table


class ReferenceModel:
    """The LM of a :class:`ReferenceEngine` (an HF folder, loaded in float32, or a ``torch.nn.Module``).

    Args:
        engine: the model and its build sizes.
        max_batch_size: the executor's batch size: the prompt table holds that many slices of
            ``max_prompt_embedding_table_size // max_batch_size`` rows, one per request.
    """

    def __init__(self, engine: ReferenceEngine, max_batch_size: int):
        if isinstance(engine.model, torch.nn.Module):
            self.lm = engine.model
        else:
            if not (Path(engine.model) / "config.json").exists():
                raise FileNotFoundError(f"{engine.model!r} is not a Hugging Face model folder (no config.json): give "
                                        "the export's hf/ folder")
            self.lm = AutoModelForCausalLM.from_pretrained(str(engine.model), dtype=torch.float32)
        self.lm.eval()
        self.dtype = engine.dtype
        self.vocab_size = int(self.lm.get_input_embeddings().weight.shape[0])
        self.max_seq_len = int(engine.max_seq_len or self.lm.config.max_position_embeddings)
        self.max_prompt_vocab_size = int(engine.max_prompt_embedding_table_size) // int(max_batch_size)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.lm.config)

    def embed(self, ids: Sequence[int], table: torch.Tensor | None) -> dict:
        """The forward's inputs for ``ids``: ``input_ids``, or ``inputs_embeds`` with table rows at fake ids."""
        ids = torch.tensor([list(ids)])
        if table is None or int(ids.max()) < self.vocab_size:
            return {"input_ids": ids}
        emb = self.lm.get_input_embeddings()
        fake = ids >= self.vocab_size
        embeds = emb(torch.where(fake, torch.zeros_like(ids), ids))
        embeds[fake] = table.to(embeds.dtype)[ids[fake] - self.vocab_size]
        return {"inputs_embeds": embeds}

    @torch.no_grad()
    def forward(self, ids: Sequence[int], table: torch.Tensor | None, cache, context: bool) -> torch.Tensor:
        """Run ``ids`` on ``cache`` (updated in place); the last position's logits as ``[1, beam=1, vocab]``."""
        if context and table is not None:
            check_table(table, self.max_prompt_vocab_size, self.dtype)
        out = self.lm(**self.embed(ids, table), past_key_values=cache, use_cache=True)
        return out.logits[:, -1:, :].float()
