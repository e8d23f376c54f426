"""Training stages as configuration: which parts learn, the text-row gradient mask, and ``init_from``.

Table 3 of the paper, "Trainable Modules" row, becomes ``model.stage.trainable``:

==================  ==========================================  ======================================
stage               ``trainable``                               what learns
==================  ==========================================  ======================================
stage0_text         ``[llm]``                                   the whole LLM (text SFT)
stage1 (warmup)     ``[adapter, audio_token_rows]``             MLP adapter + the embedding rows (and
                                                                untied output-head rows) of the audio /
                                                                speech codec tokens; text rows masked
stage2 (audio gen)  ``[llm]``                                   the whole LLM
stage3, single      ``[adapter, llm]``                          adapter + LLM
==================  ==========================================  ======================================

The AF-Whisper encoder and the codecs are frozen in every stage (Table 3); asking for them is an error.

Text rows stay **bit-identical** under ``audio_token_rows`` (appendix C.1): a gradient hook zeroes their
gradient, the row-masked tables sit in an optimizer group without weight decay, and the decoupled weight decay
is applied to the trainable rows only (:func:`audex.parts.optim.build_optimizer_and_scheduler`). AdamW then
moves a row with an all-zero gradient history by exactly ``-lr * 0 / (0 + eps) = 0``.

Example::

    report = apply_stage(model, OmegaConf.create({"name": "stage1", "trainable": ["adapter", "audio_token_rows"]}))
    print(report)   # stage1: adapter (8,320) + audio_token_rows (262,144 of 393,216 rows*dim) trainable ...
    load_init_weights(model, "runs/demo/stage0_text/stage0_text.nemo")
"""

from __future__ import annotations

import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from audex.models.checkpoint import check_nemo_archive

log = logging.getLogger(__name__)

TRAINABLE_PARTS = ("adapter", "llm", "audio_token_rows")
ALWAYS_FROZEN = ("audio_encoder", "speech_codec", "audio_codec")
_HANDLES_ATTR = "_audex_grad_mask_handles"


@dataclass
class StageReport:
    """What :func:`apply_stage` made trainable (parameter counts; row-masked tables count trainable rows only)."""

    name: str
    trainable_parts: list[str]
    trainable_params: int
    frozen_params: int
    row_masked: dict[str, int] = field(default_factory=dict)  # parameter name -> trainable rows

    def __str__(self) -> str:
        masked = ", ".join(f"{k}: {v} rows" for k, v in self.row_masked.items())
        return (f"{self.name}: trains {'+'.join(self.trainable_parts)} -- {self.trainable_params:,} trainable / "
                f"{self.frozen_params:,} frozen parameters" + (f"; row-masked: {masked}" if masked else ""))


def _row_masked_tables(model) -> dict[str, nn.Parameter]:
    """The input embedding and, when untied, the output head of the backbone (by parameter name)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    tables = {}
    for module in (model.backbone.get_input_embeddings(), model.backbone.get_output_embeddings()):
        if module is None:
            continue
        p = module.weight
        if id(p) not in names:
            raise RuntimeError("the backbone's embedding table is not a parameter of the model")
        tables.setdefault(names[id(p)], p)  # tied tables are one parameter: registered once
    return tables


def trainable_row_mask(model, device=None) -> torch.Tensor:
    """Bool ``[vocab.size]``: True for the rows stage1 trains (every id at or above ``text_vocab_size``:
    speech/audio codec tokens, generation specials and padding rows)."""
    return ~model.vocab.text_row_mask(device=device)


def _remove_masks(model) -> None:
    for handle in getattr(model, _HANDLES_ATTR, []):
        handle.remove()
    setattr(model, _HANDLES_ATTR, [])
    for p in model.parameters():
        if hasattr(p, "audex_row_mask"):
            del p.audex_row_mask


def _stage_value(stage_cfg, key, default=None):
    if stage_cfg is None:
        return default
    return stage_cfg.get(key, default) if hasattr(stage_cfg, "get") else getattr(stage_cfg, key, default)


def apply_stage(model, stage_cfg) -> StageReport:
    """Freeze/unfreeze ``model`` for a stage and register the text-row gradient mask. Idempotent.

    Args:
        model: an :class:`~audex.models.audex_model.AudexModel`.
        stage_cfg: mapping with ``name`` and ``trainable`` (a subset of ``adapter``, ``llm``,
            ``audio_token_rows``).

    Each row-masked parameter gets an ``audex_row_mask`` attribute (bool ``[rows]``) that the optimizer
    builder reads to keep weight decay off the frozen rows.
    """
    name = str(_stage_value(stage_cfg, "name", "stage"))
    parts = list(_stage_value(stage_cfg, "trainable", []) or [])
    bad = [p for p in parts if p not in TRAINABLE_PARTS]
    if bad:
        frozen = [p for p in bad if p in ALWAYS_FROZEN]
        if frozen:
            raise ValueError(f"model.stage.trainable lists {frozen}: the audio encoder and the codecs stay frozen in "
                             f"every stage (Table 3); choose from {list(TRAINABLE_PARTS)}")
        raise ValueError(f"unknown entries {bad} in model.stage.trainable; choose from {list(TRAINABLE_PARTS)}")
    if not parts:
        raise ValueError(f"stage {name!r} trains nothing: set model.stage.trainable to some of {list(TRAINABLE_PARTS)}")
    if "adapter" in parts and model.adapter is None:
        raise ValueError(f"stage {name!r} trains the adapter but this model has none (model.adapter is null)")

    _remove_masks(model)
    model.requires_grad_(False)
    if "adapter" in parts:
        model.adapter.requires_grad_(True)
    if "llm" in parts:
        model.llm.requires_grad_(True)

    row_masked = {}
    if "audio_token_rows" in parts and "llm" not in parts:  # with the whole LLM training, no mask is needed
        handles = []
        for pname, table in _row_masked_tables(model).items():
            if table.shape[0] != model.vocab.size:
                raise ValueError(f"{pname} has {table.shape[0]} rows, expected vocab.size={model.vocab.size}")
            # a backbone built on the meta device (ranks > 0 of a split run) gets its mask on the host
            mask = trainable_row_mask(model, device="cpu" if table.is_meta else table.device)
            table.requires_grad_(True)
            table.audex_row_mask = mask
            keep = mask.to(table.dtype).unsqueeze(1)
            handles.append(table.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device, grad.dtype)))
            row_masked[pname] = int(mask.sum())
        setattr(model, _HANDLES_ATTR, handles)

    for part in ALWAYS_FROZEN:  # belt and braces: nothing above may have unfrozen them
        module = getattr(model, part, None)
        if module is not None and any(p.requires_grad for p in module.parameters()):
            raise RuntimeError(f"{part} became trainable in stage {name!r}; it must stay frozen")

    trainable = frozen = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            mask = getattr(p, "audex_row_mask", None)
            trainable += p.numel() if mask is None else int(mask.sum()) * p[0].numel()
            frozen += 0 if mask is None else int((~mask).sum()) * p[0].numel()
        else:
            frozen += p.numel()
    report = StageReport(name, parts, trainable, frozen, row_masked)
    log.info("%s", report)
    return report


# ---- init_from ---------------------------------------------------------------------------------------
def _state_dict_from_nemo(path: Path) -> dict[str, torch.Tensor]:
    # Only the weights member is extracted: restoring the whole model would build it a second time.
    check_nemo_archive(path)  # a truncated or renamed file fails here, with the file named and the cure
    with tarfile.open(path, "r:*") as tar:
        member = next((m for m in tar.getmembers() if os.path.basename(m.name) == "model_weights.ckpt"), None)
        if member is None:
            raise ValueError(f"{path} is not a single-file .nemo with model_weights.ckpt inside")
        with tempfile.TemporaryDirectory() as tmp:
            tar.extract(member, tmp, filter="data")
            return torch.load(Path(tmp) / member.name, map_location="cpu", weights_only=True)


def _state_dict_from_lightning(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in ckpt:
        raise ValueError(f"{path} has no 'state_dict': give a Lightning .ckpt or a .nemo file")
    return ckpt["state_dict"]


def load_init_weights(model, path: str | os.PathLike, strict: bool = True) -> None:
    """Initialise ``model`` from the previous stage's ``.nemo`` or Lightning ``.ckpt`` (weights only; the
    optimizer, scheduler and step counter start fresh, as a new stage does).

    ``strict`` (the default) demands the same parameter names and shapes, so that a stage never silently
    starts from half a model; the error lists what differs.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model.init_from={str(path)!r} does not exist: point it at the previous stage's "
                                ".nemo (written at the end of every stage) or a checkpoint .ckpt")
    state = _state_dict_from_nemo(path) if path.suffix == ".nemo" else _state_dict_from_lightning(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: {tuple(state[k].shape)} in file vs {tuple(own[k].shape)} in model"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if strict and (missing or unexpected or mismatched):
        raise ValueError(
            f"model.init_from={str(path)!r} does not match this model's architecture: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(mismatched)} with other shapes (e.g. {mismatched[:3]}). Use the same model config as the previous "
            "stage, or set model.init_from_strict=false to load the matching part only"
        )
    state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(state, strict=False)
    log.info("initialised %d tensors from %s", len(state), path)
