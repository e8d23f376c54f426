"""NeMo JSON manifests, plain and tarred, read as Lhotse cuts without NeMo's ASR collection.

A NeMo manifest is JSON lines with ``audio_filepath``, ``duration`` and ``text`` (optional: ``offset``,
``sampling_rate``, ``lang``, ``shard_id`` for tarred data, any other key). In an ``input_cfg`` item::

    - {type: nemo, manifest_filepath: train.json, tags: {task: asr, language: en}, blend: asr_ast}
    - {type: nemo_tarred, manifest_filepath: "manifest__OP_0..1_CL_.json",
       tarred_audio_filepaths: "audio__OP_0..1_CL_.tar", tags: {task: asr}, blend: asr_ast}

Each line becomes a ``MonoCut``: its text and ``lang`` in ``supervisions[0]``, every other key in
``cut.custom`` (a line's ``task`` key gives that line's task; an item's ``tags`` give every line of the
item theirs, see :mod:`audex.data.sources`). :func:`count_manifest_lines` counts an item's examples in
one pass over its manifests, so an item needs no ``num_samples``.

Why not NeMo's own reader (``LazyNeMoIterator``, ``LazyNeMoTarredIterator``): both expand their paths
with ``nemo.collections.asr.data.audio_to_text``, which imports NeMo's ASR collection and its
dependencies (kaldialign, librosa, ...) that ``nemo-toolkit[common]`` does not install; and both stop
the whole stream at a malformed line or an audio file that cannot be opened. Lhotse has no NeMo reader.
These readers reuse NeMo's path resolution (``get_full_path``) and shard notation (``_OP_``/``_CL_`` for
braces), and turn a missing or unreadable file into a cut whose audio fails to load (counted by the loader
as a ``missing_audio`` / ``corrupt_audio`` skip) and a malformed line into a cut without audio
(``missing_field``).

Audex registers them with NeMo's ``input_cfg`` parser as ``audex_nemo`` / ``audex_nemo_tarred``;
:func:`audex.data.blend.annotate_input_cfg` routes ``type: nemo`` / ``nemo_tarred`` items to them.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import braceexpand
from lhotse import AudioSource, CutSet, MonoCut, Recording, SupervisionSegment
from lhotse.dataset.dataloading import resolve_seed
from lhotse.lazy import LazyIteratorChain, count_newlines_fast
from lhotse.serialization import open_best
from lhotse.utils import compute_num_samples
from nemo.collections.common.data.lhotse.cutset import data_type_parser
from nemo.collections.common.parts.preprocessing.manifest import get_full_path

log = logging.getLogger("audex.data")

#: ``type`` of an ``input_cfg`` item -> the Audex parser registered for it
NEMO_TYPES = {"nemo": "audex_nemo", "nemo_tarred": "audex_nemo_tarred"}
#: sampling rate assumed for the placeholder recording of a file that cannot be opened (its load fails anyway)
PLACEHOLDER_RATE = 16000


def expand_paths(paths) -> list[str]:
    """NeMo's path notation -> a list of paths: a path, a list of paths, or a brace pattern written with
    ``{}`` or NeMo's ``_OP_``/``_CL_`` (``audio__OP_0..3_CL_.tar`` -> ``audio_0.tar`` ... ``audio_3.tar``)."""
    if isinstance(paths, (str, Path)):
        text = str(paths).replace("_OP_", "{").replace("_CL_", "}")
        return list(braceexpand.braceexpand(text))
    out = []
    for p in paths:
        out.extend(expand_paths(p[0] if isinstance(p, (list, tuple)) else p))
    return out


def count_manifest_lines(manifest_filepath) -> int:
    """Examples of a NeMo manifest (all its shards): one pass counting lines, as for a Lhotse JSONL."""
    total = 0
    for path in expand_paths(manifest_filepath):
        if not Path(path).is_file():
            raise FileNotFoundError(f"NeMo manifest {path} does not exist (manifest_filepath of an input_cfg item)")
        total += count_newlines_fast(path)
    return total


def read_lines(manifest: str) -> Iterator[dict | MonoCut]:
    """The lines of one manifest shard as dicts; a line that is not JSON or lacks ``audio_filepath`` or a numeric
    ``duration`` becomes a cut without audio (logged here, counted by the loader as a ``missing_field`` skip)
    instead of stopping the stream. Lines with a true ``_skipme`` are left out, as in NeMo."""
    with open_best(manifest, "r") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                problem = None if isinstance(data, dict) else "not a JSON object"
            except json.JSONDecodeError as e:
                data, problem = {}, f"not JSON ({e.msg})"
            if problem is None and "audio_filepath" not in data:
                problem = "no 'audio_filepath'"
            if problem is None and not isinstance(data.get("duration"), (int, float)):
                problem = f"'duration' is {data.get('duration')!r}, not a number"
            if problem is not None:
                log.warning("NeMo manifest %s:%d: %s; the line is skipped (counted as missing_field)", manifest,
                            line_no, problem)
                custom = {k: v for k, v in data.items() if k in ("task", "shard_id")} if isinstance(data, dict) else {}
                yield MonoCut(id=f"{manifest}:{line_no}", start=0.0, duration=0.0, channel=0, recording=None,
                              supervisions=[], custom=custom)
            elif not data.get("_skipme", False):
                yield data


def _placeholder(rec_id: str, source: AudioSource, duration: float) -> Recording:
    return Recording(id=rec_id, sources=[source], sampling_rate=PLACEHOLDER_RATE,
                     num_samples=compute_num_samples(duration, PLACEHOLDER_RATE), duration=duration)


def _cut(data: dict, rec: Recording, cut_id: str, text_field: str, lang_field: str) -> MonoCut:
    duration = float(data.pop("duration"))
    offset = float(data.pop("offset", 0.0) or 0.0)
    cut = rec.to_cut()
    if offset or duration < rec.duration - 1e-3:
        cut = cut.truncate(offset=offset, duration=min(duration, rec.duration - offset), preserve_id=True)
    cut = cut.with_id(cut_id)
    text, lang = data.pop(text_field, None), data.pop(lang_field, None)
    cut.supervisions = [SupervisionSegment(id=cut_id, recording_id=rec.id, start=0.0, duration=cut.duration,
                                           channel=0, text=text, language=lang)]
    cut.custom = data
    return cut


def _line_id(audio_filepath: str, data: dict) -> str:
    stem = str(Path(audio_filepath).with_suffix(""))
    offset = data.get("offset")
    return f"{stem}-{round(float(offset) * 100):06d}" if offset else stem


class NeMoManifestIterator:
    """Lazy ``Iterable[Cut]`` over a plain NeMo manifest (one or more shards); see the module docstring.

    Without ``sampling_rate`` in a line, the file's header is read (as NeMo does); ``metadata_only`` skips
    that (for counting and measuring). Malformed lines: see :func:`read_lines`.

    Example::

        >>> cuts = CutSet(NeMoManifestIterator("train.json"))        # or "train__OP_0..7_CL_.json"
        >>> cut = next(iter(cuts))
        >>> cut.supervisions[0].text, cut.custom                        # "text"; the line's other keys
    """

    def __init__(self, path, text_field: str = "text", lang_field: str = "lang", metadata_only: bool = False,
                 shuffle_shards: bool = False, shard_seed: int | str = "trng"):
        self.path, self.paths = path, expand_paths(path)
        self.text_field, self.lang_field, self.metadata_only = text_field, lang_field, metadata_only
        self.shuffle_shards, self.shard_seed = shuffle_shards, shard_seed

    def __iter__(self):
        paths = list(self.paths)
        if self.shuffle_shards:
            random.Random(resolve_seed(self.shard_seed)).shuffle(paths)
        for manifest in paths:
            for data in read_lines(manifest):
                if isinstance(data, MonoCut):  # a malformed line
                    yield data
                    continue
                written = str(data.pop("audio_filepath"))
                audio = get_full_path(written, manifest, force_cache=False)
                rate = data.pop("sampling_rate", None) or data.pop("sample_rate", None)
                yield _cut(data, self._recording(audio, float(data["duration"]) + float(data.get("offset") or 0), rate),
                           _line_id(written, data), self.text_field, self.lang_field)

    def _recording(self, audio: str, duration: float, rate: int | None) -> Recording:
        source = AudioSource(type="file", channels=[0], source=audio)
        if rate is not None or self.metadata_only:
            rate = int(rate or PLACEHOLDER_RATE)
            return Recording(id=audio, sources=[source], sampling_rate=rate,
                             num_samples=compute_num_samples(duration, rate), duration=duration)
        try:
            return Recording.from_file(audio, recording_id=audio)
        except Exception:  # missing or unreadable: the audio load fails later and is counted with its reason
            return _placeholder(audio, source, duration)

    def __len__(self) -> int:
        return sum(count_newlines_fast(p) for p in self.paths)

    def __add__(self, other):
        return LazyIteratorChain(self, other)


class NeMoTarredIterator:
    """Lazy ``Iterable[Cut]`` over a tarred NeMo manifest: shard ``i`` of ``tarred_audio_filepaths`` holds the
    audio of manifest shard ``i`` (or, with one manifest, of its lines with ``shard_id == i``). Audio is read
    from the tar into memory, one member at a time; a line whose file is not in its tar gets a recording that
    fails to load (``missing_audio``), a member that cannot be decoded one that fails with ``corrupt_audio``.

    Example::

        >>> cuts = CutSet(NeMoTarredIterator("manifest__OP_0..7_CL_.json", "audio__OP_0..7_CL_.tar"))
        >>> next(iter(cuts)).load_audio().shape                       # read from audio_0.tar
    """

    def __init__(self, manifest_path, tar_paths, text_field: str = "text", lang_field: str = "lang",
                 shuffle_shards: bool = False, shard_seed: int | str = "trng"):
        self.manifests, self.tars = expand_paths(manifest_path), expand_paths(tar_paths)
        if len(self.manifests) not in (1, len(self.tars)):
            raise ValueError(f"tarred NeMo manifest: {len(self.manifests)} manifest shards for {len(self.tars)} tar "
                             "files; give one manifest (lines with shard_id) or one per tar")
        self.text_field, self.lang_field = text_field, lang_field
        self.shuffle_shards, self.shard_seed = shuffle_shards, shard_seed

    def _shard_lines(self, shard: int) -> tuple[dict[str, list[dict]], list[MonoCut]]:
        by_name: dict[str, list[dict]] = defaultdict(list)
        malformed = []
        one = len(self.manifests) == 1 and len(self.tars) > 1
        for data in read_lines(self.manifests[0 if one else shard]):
            line_shard = (data.custom if isinstance(data, MonoCut) else data).get("shard_id", -1)
            if one and str(line_shard) != str(shard):
                continue
            if isinstance(data, MonoCut):
                malformed.append(data)
            else:
                by_name[str(data["audio_filepath"])].append(data)
        return by_name, malformed

    def __iter__(self):
        shards = list(range(len(self.tars)))
        if self.shuffle_shards:
            random.Random(resolve_seed(self.shard_seed)).shuffle(shards)
        for shard in shards:
            tar_path, (lines, malformed) = self.tars[shard], self._shard_lines(shard)
            yield from malformed
            with open_best(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile() or member.name not in lines:
                        continue
                    raw = tar.extractfile(member).read()
                    for data in lines.pop(member.name):
                        yield self._from_bytes(data, raw, f"{tar_path}/{member.name}")
            for name, rest in lines.items():  # in the manifest, not in the tar
                for data in rest:
                    yield self._make(data, _placeholder(f"{tar_path}/{name}", AudioSource(
                        type="file", channels=[0], source=f"{tar_path}/{name}"), float(data["duration"])))

    def _from_bytes(self, data: dict, raw: bytes, rec_id: str):
        try:
            rec = Recording.from_bytes(raw, recording_id=rec_id)
        except Exception:  # undecodable member: kept in memory as is, its load fails with corrupt_audio
            rec = _placeholder(rec_id, AudioSource(type="memory", channels=[0], source=raw), float(data["duration"]))
        return self._make(data, rec)

    def _make(self, data: dict, rec: Recording) -> MonoCut:
        written = str(data.pop("audio_filepath"))
        data.pop("shard_id", None)
        return _cut(data, rec, _line_id(written, data), self.text_field, self.lang_field)

    def __len__(self) -> int:
        return sum(count_newlines_fast(p) for p in self.manifests)

    def __add__(self, other):
        return LazyIteratorChain(self, other)


def _fields(config) -> dict:
    return {"text_field": config.get("text_field", "text"), "lang_field": config.get("lang_field", "lang")}


@data_type_parser(NEMO_TYPES["nemo"])
def read_nemo(config) -> tuple[CutSet, bool]:
    """NeMo ``input_cfg`` parser of ``type: nemo`` items (tarred when the item has ``tarred_audio_filepaths``)."""
    if config.get("tarred_audio_filepaths") is not None:
        return read_nemo_tarred(config)
    cuts = CutSet(NeMoManifestIterator(config.manifest_filepath, metadata_only=bool(config.get("metadata_only", False)),
                                       shuffle_shards=bool(config.get("shuffle", False)),
                                       shard_seed=config.get("shard_seed", "trng"), **_fields(config)))
    return cuts, False


@data_type_parser(NEMO_TYPES["nemo_tarred"])
def read_nemo_tarred(config) -> tuple[CutSet, bool]:
    """NeMo ``input_cfg`` parser of ``type: nemo_tarred`` items."""
    if config.get("tarred_audio_filepaths") is None:
        raise ValueError(f"input_cfg item {config.get('manifest_filepath')!r} of type nemo_tarred needs "
                         "tarred_audio_filepaths (the tar shards of its audio)")
    cuts = CutSet(NeMoTarredIterator(config.manifest_filepath, config.tarred_audio_filepaths,
                                     shuffle_shards=bool(config.get("shuffle", False)),
                                     shard_seed=config.get("shard_seed", "trng"), **_fields(config)))
    if not config.get("force_finite", False) and not config.get("metadata_only", False):
        cuts = cuts.repeat(preserve_id=True)  # as NeMo's tarred reader: the blend ends the stream
    return cuts, True


def read_manifest_cuts(path: str | Path, tarred_audio_filepaths=None) -> CutSet:
    """A NeMo manifest (plain, or tarred with ``tarred_audio_filepaths``) as a finite CutSet (evaluation)."""
    if tarred_audio_filepaths is not None:
        return CutSet(NeMoTarredIterator(path, tarred_audio_filepaths))
    return CutSet(NeMoManifestIterator(path))


def is_nemo_manifest(path: str | Path) -> bool:
    """True when ``path`` (or the first shard of a ``_OP_``/``_CL_`` pattern) is a JSON-lines file whose first line
    has NeMo's ``audio_filepath`` key."""
    first_shard = expand_paths(path)[0]
    if not Path(first_shard).is_file():
        return False
    try:
        with open_best(first_shard, "r") as f:
            row = json.loads(f.readline())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):  # not text, not JSON, or unreadable
        return False
    return isinstance(row, dict) and "audio_filepath" in row
