"""What every Audex python-backend model reads the same way: its ``config.pbtxt`` parameters, the serving limits
among them, one value per request, and the error response (standard library + NumPy only: runs in any stub)."""

from __future__ import annotations

from pathlib import Path

# ServeLimits fields as config.pbtxt parameters (strings) -> their types
LIMIT_FIELDS = {"max_audio_seconds": float, "max_new_tokens": int, "max_speech_seconds": float,
                "max_context_tokens": int, "tta_seconds": float, "max_text_chars": int}


def config_parameters(model_config: dict) -> dict[str, str]:
    """``parameters`` of a model config (the JSON Triton hands ``initialize``) as plain strings."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def limit_values(params: dict) -> dict:
    """The :class:`~audex.export.serving.ServeLimits` fields the parameters set, cast to their types."""
    return {k: cast(params[k]) for k, cast in LIMIT_FIELDS.items() if params.get(k) not in (None, "", "None")}


def model_file(path: str | None, model_dir: str | None) -> str | None:
    """A file parameter: absolute as given, else relative to the model's version folder."""
    if path and not Path(path).is_absolute() and model_dir:
        return str(Path(model_dir) / path)
    return path or None


def one_request(array, name: str) -> None:
    """Each Triton request carries one item (batch dimension 1): the server batches requests itself."""
    if array is None:
        raise ValueError(f"input {name!r} is required")
    if array.ndim == 0 or array.shape[0] != 1:
        batch = array.shape[0] if array.ndim else 0
        raise ValueError(f"send one input per request (input {name!r} has a batch of {batch}); the server batches "
                         "requests itself")


def one_value(array, name: str, cast, default=None):
    """One value per request: ``array`` of shape ``[1, 1]`` (or ``[1]``) -> ``cast(value)``; None -> ``default``."""
    if array is None:
        return default
    if array.size != 1:
        raise ValueError(f"input {name!r} must hold one value per request, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"input {name!r} is not UTF-8 text") from None
    return cast(value)


def error_response(pb_utils, message: str, invalid: bool = True):
    """An error response; ``invalid`` = the client sent something the server refuses (INVALID_ARG, HTTP 400)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid else None
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
