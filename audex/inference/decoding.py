"""KV-cached batched decoding for Audex: left-padded prompts (with or without audio), CFG pairs, constraints.

One step of the loop is: backbone forward of the last token of every row (the KV cache, and for the
hybrid Nemotron-H backbone the Mamba conv/SSM state, hold the rest) -> CFG mixing of paired rows ->
constraint mask -> temperature / top-k / top-p -> draw -> append the token to the row (to both rows of a
CFG pair) -> stop rows that sampled ``<|im_end|>``.

Prompts of different lengths are left-padded; the attention mask zeroes the pads, position ids count
only real tokens (``cumsum(mask) - 1``, as ``generate()`` does), so a padded row decodes the tokens it
would decode alone. The cache is transformers' ``DynamicCache(config=...)``, which builds the right
layer kinds for the backbone: key/value layers for attention, conv + recurrent state layers for Mamba.

Why not ``generate()``: it cannot run the prefill from ``inputs_embeds`` carrying audio *and* pair CFG rows
with a mixing rule applied before a per-position RVQ mask, and its draw uses the global RNG. The loop is
short; ``bench/decode.py`` measures it against ``generate()`` on the same backbone.

Example::

    >>> decoder = AudexDecoder.for_model(model)
    >>> out = decoder.generate([tok.encode(prompt)], SamplingParams(max_new_tokens=64))
    >>> tok.decode(out.token_ids[0])
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from audex.inference.cfg import CfgPairBatch
from audex.inference.constraints import CodecConstraint
from audex.inference.sampling import SamplingParams, TokenSampler


@dataclass
class GenerationOutput:
    """Generated tokens per prompt (the stop token excluded) and why each row stopped."""

    token_ids: list[list[int]]
    finish_reasons: list[str]  # "stop" (sampled <|im_end|>) or "length" (hit max_new_tokens)
    num_steps: int


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ``input_ids [B, L]`` and ``attention_mask [B, L]``, padded on the left."""
    if not prompts:
        raise ValueError("no prompts to decode")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: every row needs at least one token")
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (pads get position 1, as in ``generate()``; they are masked)."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def select_next_tokens(
    row_logits: torch.Tensor,
    sampler: TokenSampler,
    pairs: CfgPairBatch | None = None,
    constrained=None,
) -> torch.Tensor:
    """One selection step: CFG mix (if paired) -> constraint mask -> sample. ``[R, V]`` -> ``[B]`` tokens."""
    logits = pairs.guide(row_logits) if pairs is not None else row_logits.float()
    if constrained is not None:
        logits = constrained.apply(logits)
    return sampler(logits)


class AudexDecoder:
    """Batched, KV-cached decoding over a transformers causal LM (Llama or Nemotron-H backbones).

    Args:
        lm: the transformers causal LM (``AudexModel.backbone``, or any HF causal LM).
        pad_token_id: fills left padding and the inputs of rows that already stopped.
        stop_token_ids: a row stops after sampling one of these (``<|im_end|>``).
        embed_inputs: ``(input_ids [B, L], audio_embeds list[Tensor[N_i, d]]) -> inputs_embeds``
            (``AudexModel.embed_inputs``); needed only for prompts with audio.
    """

    def __init__(self, lm: torch.nn.Module, *, pad_token_id: int, stop_token_ids: Sequence[int],
                 embed_inputs: Callable | None = None):
        self.lm = lm
        self.pad_token_id = int(pad_token_id)
        self.stop_token_ids = torch.tensor(sorted({int(t) for t in stop_token_ids}), dtype=torch.long)
        if self.stop_token_ids.numel() == 0:
            raise ValueError("give at least one stop token id (<|im_end|>)")
        self.embed_inputs = embed_inputs
        self._keeps_last_logits = "logits_to_keep" in inspect.signature(lm.forward).parameters

    @classmethod
    def for_model(cls, model) -> "AudexDecoder":
        """The decoder of an :class:`~audex.models.audex_model.AudexModel` (stops on ``<|im_end|>``)."""
        tok = model.tokenizer
        return cls(model.backbone, pad_token_id=tok.pad_id, stop_token_ids=[tok.im_end],
                   embed_inputs=model.embed_inputs)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def new_cache(self):
        return DynamicCache(config=self.lm.config)

    def _forward(self, attention_mask, position_ids, cache, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache, use_cache=True)
        if self._keeps_last_logits:
            kwargs["logits_to_keep"] = 1
        out = self.lm(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        return out.logits[:, -1, :]

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        audio_embeds: Sequence[Sequence[torch.Tensor]] | None = None,
        uncond_prompts: Sequence[Sequence[int]] | None = None,
        constraint: CodecConstraint | None = None,
    ) -> GenerationOutput:
        """Decode every prompt until ``<|im_end|>`` or ``params.max_new_tokens``.

        Args:
            prompts: B prompts as token ids (already expanded: ``<so_start>`` N x ``<so_embedding>`` ``<so_end>``).
            params: sampling parameters (``params.guidance_scale`` is used when ``uncond_prompts`` are given).
            audio_embeds: per prompt, the adapter outputs of its audios in order of appearance.
            uncond_prompts: the B unconditional CFG twins; their rows decode in the same batch and every
                sampled token is appended to both rows of its pair (given with lambda = 1 they change nothing).
            constraint: the task's token grammar, applied to the guided logits.
        """
        prompts = [list(map(int, p)) for p in prompts]
        num_prompts = len(prompts)
        pairs = None
        rows = prompts
        if uncond_prompts is not None:
            pairs = CfgPairBatch(prompts, [list(map(int, p)) for p in uncond_prompts], params.guidance_scale)
            rows = pairs.rows
        elif params.uses_cfg:
            raise ValueError(
                f"guidance_scale={params.guidance_scale} needs unconditional prompts (uncond_prompts); "
                "set guidance_scale=1.0 to decode without CFG"
            )
        device = self.device
        input_ids, attention_mask = left_pad(rows, self.pad_token_id, device)
        position_ids = positions_from_mask(attention_mask)
        sampler = TokenSampler(params)
        constrained = constraint.begin(prompts) if constraint is not None else None

        cache = self.new_cache()
        if audio_embeds is not None and any(len(a) for a in audio_embeds):
            if self.embed_inputs is None:
                raise ValueError("these prompts carry audio, but the decoder was built without embed_inputs")
            if len(audio_embeds) != num_prompts:
                raise ValueError(f"audio_embeds has {len(audio_embeds)} entries for {num_prompts} prompts")
            flat = [emb for per_prompt in audio_embeds for emb in per_prompt]
            inputs_embeds = self.embed_inputs(input_ids, flat)
            logits = self._forward(attention_mask, position_ids, cache, inputs_embeds=inputs_embeds)
        else:
            logits = self._forward(attention_mask, position_ids, cache, input_ids=input_ids)

        # the mask grows by one column per step; allocate it once
        full_mask = torch.cat(
            [attention_mask, attention_mask.new_ones(len(rows), params.max_new_tokens)], dim=1)
        prompt_width = attention_mask.shape[1]
        next_position = position_ids[:, -1:] + 1
        stop_ids = self.stop_token_ids.to(device)
        finished = torch.zeros(num_prompts, dtype=torch.bool, device=device)  # sampled a stop token
        generated = []
        step = 0
        for step in range(1, params.max_new_tokens + 1):
            tokens = select_next_tokens(logits, sampler, pairs, constrained)
            tokens = torch.where(finished, torch.full_like(tokens, self.pad_token_id), tokens)
            if constrained is not None:
                constrained.advance(tokens)
            generated.append(tokens)
            finished |= torch.isin(tokens, stop_ids)
            if bool(finished.all()) or step == params.max_new_tokens:
                break
            step_ids = CfgPairBatch.to_both_rows(tokens) if pairs is not None else tokens
            logits = self._forward(full_mask[:, : prompt_width + step], next_position, cache,
                                   input_ids=step_ids.unsqueeze(1))
            next_position = next_position + 1

        stop_set = set(self.stop_token_ids.tolist())
        token_ids, reasons = [], []
        for row, toks in enumerate(torch.stack(generated, dim=1).tolist()):
            if bool(finished[row]):
                end = next(i for i, t in enumerate(toks) if t in stop_set)
                token_ids.append(toks[:end])
                reasons.append("stop")
            else:
                token_ids.append(toks)
                reasons.append("length")
        return GenerationOutput(token_ids=token_ids, finish_reasons=reasons, num_steps=step)

