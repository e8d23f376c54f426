"""Audex: one decoder-only LLM that hears and speaks.

Importing ``audex`` registers its ``_target_`` prefix with NeMo's allow-list so that
``ModelPT.restore_from("model.nemo")`` can rebuild Audex models; an installed Audex does this even in a process
that never imports it (see ``audex_nemo_hook``).
"""

from pathlib import Path

__version__ = "0.1.0"

#: the package's YAML configs (model, data, trainer, stages, inference presets, eval, export): package data, so an
#: installed Audex finds its defaults outside a checkout; a checkout's ``conf/`` is a link onto this folder
CONF_DIR = Path(__file__).resolve().parent / "conf"


def config_path(*parts: str) -> Path:
    """A file or folder of Audex's configs: ``config_path("infer", "presets.yaml")``, ``config_path("model")``."""
    path = CONF_DIR.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"Audex config {'/'.join(parts)!r} not found under {CONF_DIR} (the package's conf/); "
                                "reinstall Audex or give the path of your own YAML")
    return path

NEMO_TARGET_PREFIXES = ("audex.",)


def register_nemo_targets() -> None:
    """Add Audex's ``_target_`` prefix to NeMo 3.0's instantiation allow-list (idempotent)."""
    from nemo.core.classes import common

    for prefix in NEMO_TARGET_PREFIXES:
        if prefix not in common.ALLOWED_TARGET_PREFIXES:
            common.ALLOWED_TARGET_PREFIXES.append(prefix)
