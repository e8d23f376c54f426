"""The one model loader: a ``.nemo`` archive, a pretrained folder, or a model YAML -> :class:`AudexModel`.

A ``.nemo`` is a tar archive (NeMo's ``save_to``); a copy cut short by a failed upload, or any other file renamed
``.nemo``, makes NeMo fail deep inside ``tarfile`` or ``yaml`` with a message that names neither the file nor the
cure. :func:`check_nemo_archive` reads the whole archive first (every member to its end, so truncation shows)
and raises :class:`CorruptCheckpointError` naming the file and what to do. Inference, evaluation, export and
serving all load through :func:`load_model`.

Example::

    >>> model = load_model("audex_2b.nemo")                        # device="auto": cuda when there is one
    >>> model = load_model("tiny_hf/", device="cpu")               # a folder from AudexModel.save_pretrained
    >>> model = load_model("conf/model/tiny.yaml", dtype="bfloat16")   # random weights, for smoke tests
"""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path

import torch

from audex.models.audex_model import AudexModel

log = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
    """A ``.nemo`` (or pretrained folder) that cannot be read: truncated, not an archive, or missing its config."""


def check_nemo_archive(path: str | os.PathLike) -> list[str]:
    """Read every member of a ``.nemo`` to its end; returns the member names or raises :class:`CorruptCheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist (expected a .nemo archive written by model.save_to())")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"{str(path)!r} is empty (0 bytes): the copy failed; copy the .nemo again")
    names = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                names.append(member.name)
                if member.isfile():
                    f = tar.extractfile(member)
                    while f is not None and f.read(1 << 20):
                        pass
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{str(path)!r} is not a readable .nemo archive ({type(e).__name__}: {e}); it is truncated or corrupt: "
            "copy it again (compare its size/checksum with the original) or re-save it with model.save_to()"
        ) from None
    if not any(Path(n).name == "model_config.yaml" for n in names):
        raise CorruptCheckpointError(
            f"{str(path)!r} is a tar archive but holds no model_config.yaml, so it is not a NeMo model archive "
            f"(members: {names[:8]}); export from the .nemo that model.save_to() wrote"
        )
    return names


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> cuda when available, else cpu; anything else as ``torch.device``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(path: str | os.PathLike, device: str | torch.device = "auto",
               dtype: str | torch.dtype | None = None) -> AudexModel:
    """An :class:`AudexModel` in eval mode on ``device`` from a ``.nemo`` (checked first), a pretrained folder
    (``AudexModel.save_pretrained``) or a model YAML (``conf/model/tiny.yaml``: random weights, for smoke tests
    only). ``dtype`` (``"bfloat16"``, ``torch.float16``, ...) casts the LLM; the encoder and codecs keep theirs."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model {str(p)!r} does not exist: give a .nemo file, a folder written by "
                                "AudexModel.save_pretrained, or a model YAML such as conf/model/tiny.yaml")
    dev = resolve_device(device)
    if p.is_dir():
        if not (p / "audex_config.yaml").exists():
            raise CorruptCheckpointError(
                f"{str(p)!r} is a folder without audex_config.yaml: give a .nemo, a folder written by "
                "AudexModel.save_pretrained(), or a model YAML")
        model = AudexModel.from_pretrained(str(p))
    elif p.suffix == ".nemo":
        check_nemo_archive(p)
        model = AudexModel.restore_from(str(p), map_location=dev)
    elif p.suffix in (".yaml", ".yml"):
        log.warning("building %s with RANDOM weights (a model YAML, not a checkpoint)", p)
        model = AudexModel.from_config_file(str(p))
    else:
        raise ValueError(f"model {str(p)!r}: expected a .nemo file, a pretrained folder or a model YAML")
    model = model.to(dev)
    if dtype is not None:
        model.llm.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()
