"""CFG twins through the LLM API's per-request logits processors: rebuilding whole engine steps for the pair tracker.

TensorRT-LLM's PyTorch backend has no batched logits processor and no ``client_id`` for it: each request carries its
own ``SamplingParams(logits_processor=...)`` and the engine calls it once per step, request after request (context
requests first), as ``lp(req_id, logits, token_ids, None, None)`` with ``logits`` a ``[beam, 1, vocab]`` view of the
step's logits, modified in place before the step's sampling (``_execute_logit_post_processors`` of
``tensorrt_llm/_torch/pyexecutor/model_engine.py``). :class:`~audex.serving.cfg_pairing.CfgPairTracker` needs the
rows of a pair *together*. :class:`StepPairing` rebuilds them:

* a **step** ends when a request already called in it is called again, or when a row belongs to another logits
  tensor (it keeps a row of the current step, so a later step cannot reuse that memory; an engine that writes every
  step into one static buffer, CUDA graphs, is caught by the first rule because every request is called each step);
* each row of a pair is **tried** with the rows of the same pair seen so far in the step (tracker state saved and
  restored: the seeded draw, the grammar state, the decided tokens), and every row of the pair is forced to the
  trial's token at once. A lone twin at the frontier is forced to its unguided token; if its partner shows up later
  in the same step both rows are re-forced to the guided token -- the engine samples only after the last call;
* the step's rows are **committed** (the tracker's real step, which draws exactly what the trial drew) when the next
  step starts, or when the pair ends.

Each twin's processor (:class:`TwinLogitsProcessor`) names a :class:`StepPairing` by session id; it is looked up in
this process (``SamplingParams`` are pickled to the executor worker, which must be this process:
``TLLM_WORKER_USE_SINGLE_PROCESS=1``, see :mod:`audex.serving.llm_api_backend`). :class:`ContextProbe` only marks
that a plain request's context has run (the admission's token budget) and helps find step boundaries.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

import torch

from audex.serving.cfg_pairing import CfgPairTracker, PairRow, force_token

SESSIONS: dict[str, "StepPairing"] = {}


@dataclass
class _StepRow:
    row: PairRow          # with a copy of the raw logits (the target is forced in place)
    target: torch.Tensor  # ``[beam, vocab]`` view into the engine's logits


class StepPairing:
    """Per-request processor calls -> :class:`CfgPairTracker` steps (see the module docstring)."""

    def __init__(self, tracker: CfgPairTracker):
        if tracker.can_hold:
            raise ValueError("the LLM API cannot hold a scheduled request: build the tracker with can_hold=False")
        self.tracker = tracker
        self.lock = threading.RLock()
        self.session = uuid.uuid4().hex
        self.started: set = set()                    # keys of requests whose context has run
        self.on_started = None                       # called (key) the first time a request's context has run
        self._rows: dict[int, list[_StepRow]] = {}   # pair -> rows of the current step
        self._seen: set[int] = set()                 # engine request ids called in the current step
        self._anchor: torch.Tensor | None = None     # a row of the current step (keeps its storage alive)
        SESSIONS[self.session] = self

    def close(self) -> None:
        SESSIONS.pop(self.session, None)

    # ---- called by the processors, from the engine's thread -------------------------------------
    def _enter(self, req_id: int, key, logits: torch.Tensor) -> None:
        storage = logits.untyped_storage().data_ptr()
        if req_id in self._seen or self._anchor is None or self._anchor.untyped_storage().data_ptr() != storage:
            self._commit_all()
            self._anchor = logits
        self._seen.add(req_id)
        if key not in self.started:
            self.started.add(key)
            if self.on_started is not None:
                self.on_started(key)

    def seen(self, req_id: int, key, logits: torch.Tensor) -> None:
        """A plain request's row (nothing to force)."""
        with self.lock:
            self._enter(req_id, key, logits)

    def row(self, req_id: int, key, pair_id: int, role: int, position: int, logits: torch.Tensor) -> None:
        """A twin's row: try the pair's rows of this step and force every one of them."""
        with self.lock:
            self._enter(req_id, key, logits)
            target = logits.reshape(-1, logits.shape[-1])
            rows = self._rows.setdefault(pair_id, [])
            rows.append(_StepRow(PairRow(req_id, pair_id, role, position, target[0].detach().clone()), target))
            for step_row, action in zip(rows, self._trial(pair_id, [r.row for r in rows])):
                force_token(step_row.target, action.token)

    # ---- tracker state: trial and commit --------------------------------------------------------
    def _trial(self, pair_id: int, rows: list[PairRow], peek=None):
        tracker = self.tracker
        pair = tracker.pairs.get(pair_id)
        if pair is None:
            raise RuntimeError(f"CFG pair {pair_id} has a row but was never registered (or already finished)")
        generator = pair.sampler._generator
        saved = (len(pair.decided), set(pair.gone), pair.lag_steps, pair.done, pair.split, dict(tracker.stats),
                 None if pair.constraint is None else (pair.constraint.states, pair.constraint.counts),
                 generator, None if generator is None else generator.get_state())
        try:
            actions = tracker.step(rows)
            if peek is not None:
                peek(dict(tracker.stats))
            return actions
        finally:
            n, gone, lag, done, split, stats, constraint, gen, gen_state = saved
            del pair.decided[n:]
            pair.gone, pair.lag_steps, pair.done, pair.split = gone, lag, done, split
            tracker.stats.clear()
            tracker.stats.update(stats)
            if constraint is not None:
                pair.constraint.states, pair.constraint.counts = constraint
            pair.sampler._generator = gen
            if gen is not None:
                gen.set_state(gen_state)

    def _commit(self, pair_id: int) -> None:
        rows = self._rows.pop(pair_id, None)
        if rows:
            self.tracker.step([r.row for r in rows])

    def _commit_all(self) -> None:
        for pair_id in list(self._rows):
            self._commit(pair_id)
        self._seen.clear()

    # ---- called by the serving side -------------------------------------------------------------
    def register(self, pair_id: int, **kwargs) -> None:
        params = kwargs.get("sampling") or self.tracker.sampling
        if params.do_sample and params.seed is None:
            raise ValueError(f"CFG pair {pair_id} samples without a seed: a step's trial and its commit must draw the "
                             "same token, so every sampled pair needs SamplingParams.seed")
        with self.lock:
            self.tracker.register(pair_id, **kwargs)

    def cancel(self, pair_id: int, role: int) -> None:
        """A twin is gone from now on; the rows already forced in the current step keep their tokens."""
        with self.lock:
            if pair_id in self.tracker.pairs:
                self._commit(pair_id)
                self.tracker.cancel(pair_id, role)

    def finish(self, pair_id: int) -> None:
        """Both twins have ended: commit what the pair did in the current step and forget it."""
        with self.lock:
            self._commit(pair_id)
            self.tracker.finish(pair_id)

    def stats(self) -> dict:
        """The tracker's counts, the rows of the current step included (tried, not committed)."""
        with self.lock:
            base = dict(self.tracker.stats)
            out = dict(base)
            for pair_id, rows in self._rows.items():
                tried = {}
                self._trial(pair_id, [r.row for r in rows], peek=tried.update)
                out = {k: out[k] + tried[k] - base[k] for k in out}
            return out


class TwinLogitsProcessor:
    """``LogitsProcessor`` of one CFG twin (``tensorrt_llm.sampling_params.LogitsProcessor`` signature): its rows
    go to the :class:`StepPairing` of ``session``; ``prompt_len`` turns the request's tokens into its position."""

    def __init__(self, session: str, key, pair_id: int, role: int, prompt_len: int):
        self.session, self.key, self.pair_id, self.role, self.prompt_len = session, key, pair_id, role, prompt_len

    def __call__(self, req_id, logits, token_ids, stream_ptr, client_id) -> None:
        pairing = _session(self.session)
        pairing.row(req_id, self.key, self.pair_id, self.role, len(token_ids[0]) - self.prompt_len, logits)


class ContextProbe:
    """``LogitsProcessor`` of a plain request: changes nothing, tells the :class:`StepPairing` its context has run."""

    def __init__(self, session: str, key):
        self.session, self.key = session, key

    def __call__(self, req_id, logits, token_ids, stream_ptr, client_id) -> None:
        _session(self.session).seen(req_id, self.key, logits)


def _session(session: str) -> StepPairing:
    pairing = SESSIONS.get(session)
    if pairing is None:
        raise RuntimeError(f"no CFG pairing session {session} in this process: the LLM's executor worker must run "
                           "in the serving process (TLLM_WORKER_USE_SINGLE_PROCESS=1, tensor_parallel_size=1)")
    return pairing
