"""Audex: one decoder-only LLM that hears and speaks.

Importing ``audex`` registers its ``_target_`` prefix with NeMo's allow-list so that
``ModelPT.restore_from("model.nemo")`` can rebuild Audex models; an installed Audex does this even in a process
that never imports it (see ``audex_nemo_hook``).
"""

__version__ = "0.1.0"

NEMO_TARGET_PREFIXES = ("audex.",)


def register_nemo_targets() -> None:
    """Add Audex's ``_target_`` prefix to NeMo 3.0's instantiation allow-list (idempotent)."""
    from nemo.core.classes import common

    for prefix in NEMO_TARGET_PREFIXES:
        if prefix not in common.ALLOWED_TARGET_PREFIXES:
            common.ALLOWED_TARGET_PREFIXES.append(prefix)
