"""Classifier-free guidance for an in-flight-batching engine: pairing twin requests inside a logits post-processor.

The paper decodes each TTS/TTA prompt with an unconditional twin "in the same decoding batch" and combines their
next-token logits with eq. (3), ``logits' = cond + (lambda - 1)(cond - uncond)``, keeping the pair
token-synchronised (section 4.5). :mod:`audex.inference.decoding` does exactly that in its own loop. TensorRT-LLM has
no CFG for autoregressive decoding, and in-flight batching does not promise that two requests share a step: a twin
may be admitted a step later, the rows of a step come in any order, either twin may be cancelled.

Mechanism
---------
The twins are two ordinary requests. Their pair id and role travel in the request's ``client_id``
(``client_id = 2 * pair_id + role``, role 0 = conditional, 1 = unconditional: :func:`pair_client_id`). One batched
logits post-processor (TensorRT-LLM's ``ExecutorConfig.logits_post_processor_batched`` /
``LLM(batched_logits_processor=...)``, signature ``(req_ids, logits, token_ids, stream_ptr, client_ids)``, see
``tensorrt_llm/sampling_params.py`` ``BatchedLogitsProcessor``) sees every row of a step. Per pair it keeps the list
of *decided* tokens ``D``; a row's position is the number of tokens it has generated. Each step, for each row:

* **guided**: both twins are at the frontier ``len(D)`` in this step -> eq. (3) on the two rows (in float32), then
  the task grammar (:class:`~audex.inference.constraints.CodecConstraint`), then temperature/top-k/top-p and one
  draw from the pair's own seeded generator (:class:`~audex.inference.sampling.TokenSampler`); the token is appended
  to ``D`` and *forced* on both rows (their logits become 0 at the token, -inf elsewhere), so whatever sampler the
  engine runs afterwards picks it. Token synchronisation therefore never depends on the engine's sampler or seeds.
* **replay**: a row behind the frontier (its twin decided that position without it) is forced to ``D[t]``.
* **hold**: a row at the frontier whose twin is alive but absent from this step must not advance.
* **solo**: the unconditional twin was cancelled (or retired): the conditional row decides alone, lambda = 1.
* **retire**: the conditional twin was cancelled: the unconditional row is forced to the end token, so the engine
  finishes it instead of spending steps on it.

Limits
------
*Holding* needs an engine that can skip a scheduled row; Audex's own PyTorch engine can (``can_hold=True``), the
pairing is then exact at every position however the twins arrive. TensorRT-LLM cannot: a scheduled request always
emits a token. :class:`CfgLogitsPostProcessor` therefore runs with ``can_hold=False``: a lone conditional row at the
frontier decides that token from its own logits (lambda = 1 for that token, counted in ``stats["unguided"]``) and its
twin replays it later; a lone unconditional row at the frontier cannot be decided (its token must equal the
conditional one) and is retired. Under TensorRT-LLM's ``GUARANTEED_NO_EVICT`` scheduler (what
:mod:`audex.serving.triton.repository` configures) running requests are never paused, so twins that were admitted in the
same step stay together to the end; a twin admitted later stays behind by the same number of steps, and after
``max_lag_steps`` steps it is retired (the conditional row then finishes unguided) rather than decoding uselessly.
Enqueue both twins in one call (``executor.enqueue_requests([cond, uncond])``), conditional first, without chunked
context, so that FCFS admission puts them in one step whenever the batch has room for two;
:class:`~audex.serving.guided_executor.GuidedExecutor` hands a pair over only when it has.

The pairing logic is plain PyTorch (:class:`CfgPairTracker`) and is tested on the CPU against a naive lock-step
reference and against :mod:`audex.inference` under split, reordered and cancelled arrivals.

Example::

    >>> tracker = CfgPairTracker(SamplingParams(do_sample=False), guidance_scale=3.0, end_token_ids=[im_end])
    >>> actions = tracker.step([PairRow("a", 0, COND, 0, cond_logits), PairRow("b", 0, UNCOND, 0, uncond_logits)])
    >>> [a.kind for a in actions], actions[0].token == actions[1].token
    (['guided', 'guided'], True)
    >>> processor = CfgLogitsPostProcessor(tracker)     # ExecutorConfig(logits_post_processor_batched=processor)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from audex.inference.cfg import cfg_mix
from audex.inference.sampling import SamplingParams, TokenSampler

COND, UNCOND = 0, 1


def pair_client_id(pair_id: int, role: int) -> int:
    """The ``client_id`` a twin is submitted with: ``2 * pair_id + role`` (role 0 conditional, 1 unconditional)."""
    if role not in (COND, UNCOND) or pair_id < 0:
        raise ValueError(f"pair_id must be >= 0 and role 0 (cond) or 1 (uncond), got {pair_id}, {role}")
    return 2 * int(pair_id) + int(role)


def split_client_id(client_id: int) -> tuple[int, int]:
    return int(client_id) // 2, int(client_id) % 2


@dataclass
class PairRow:
    """One row of a step: request key, its pair, its role, how many tokens it has generated, its logits ``[V]``."""

    key: object
    pair_id: int
    role: int
    position: int
    logits: torch.Tensor


@dataclass
class PairAction:
    """What a row does this step: ``guided``/``replay``/``solo``/``retire`` emit ``token``; ``hold`` emits nothing."""

    kind: str
    token: int | None = None


@dataclass
class _Pair:
    guidance_scale: float
    sampler: TokenSampler
    constraint: object | None
    decided: list[int] = field(default_factory=list)
    gone: set[int] = field(default_factory=set)       # roles cancelled, retired or finished
    lag_steps: int = 0
    done: bool = False
    split: bool = False


class CfgPairTracker:
    """Engine-agnostic pairing state (see the module docstring).

    Args:
        sampling: how a pair's token is drawn (a pair gets its own :class:`TokenSampler`, seeded by ``seed``).
        guidance_scale: default lambda (per pair: :meth:`register`).
        end_token_ids: tokens that end a pair (``<|im_end|>``); the first one also retires a lone twin.
        can_hold: the engine can leave a scheduled row un-advanced (True for Audex's engine, False for TensorRT-LLM).
        max_lag_steps: with ``can_hold=False``, steps a twin may stay behind before it is retired.
        constraint_factory: ``pair_id -> constraint rows`` (``CodecConstraint.begin([prompt])``) for the task grammar.
    """

    def __init__(self, sampling: SamplingParams, guidance_scale: float, end_token_ids: Sequence[int], *,
                 can_hold: bool = True, max_lag_steps: int = 4, constraint_factory: Callable | None = None):
        if not end_token_ids:
            raise ValueError("give at least one end token id (<|im_end|>)")
        self.sampling = sampling
        self.guidance_scale = float(guidance_scale)
        self.end_token_ids = [int(t) for t in end_token_ids]
        self.can_hold = can_hold
        self.max_lag_steps = int(max_lag_steps)
        self.constraint_factory = constraint_factory
        self.pairs: dict[int, _Pair] = {}
        # tokens by action, and "split": pairs whose twins were ever apart at the frontier
        self.stats = {"guided": 0, "replay": 0, "hold": 0, "solo": 0, "retire": 0, "unguided": 0, "split": 0}

    def register(self, pair_id: int, guidance_scale: float | None = None, sampling: SamplingParams | None = None,
                 constraint=None) -> None:
        """Declare a pair up front (otherwise it is created with the defaults when its first row shows up)."""
        params = sampling or self.sampling
        if constraint is None and self.constraint_factory is not None:
            constraint = self.constraint_factory(pair_id)
        self.pairs[pair_id] = _Pair(float(self.guidance_scale if guidance_scale is None else guidance_scale),
                                    TokenSampler(params), constraint)

    def _pair(self, pair_id: int) -> _Pair:
        if pair_id not in self.pairs:
            self.register(pair_id)
        return self.pairs[pair_id]

    def cancel(self, pair_id: int, role: int) -> None:
        """One twin was cancelled (client gone, timeout): its partner goes on solo or is retired."""
        self._pair(pair_id).gone.add(role)

    def decided_tokens(self, pair_id: int) -> list[int]:
        return list(self.pairs[pair_id].decided)

    @staticmethod
    def _draw(pair: _Pair, logits: torch.Tensor) -> torch.Tensor:
        """The pair's token for this step, still on the logits' device (``[1]``): grammar, then the seeded draw."""
        logits = logits.float().reshape(1, -1)
        if pair.constraint is not None:
            logits = pair.constraint.apply(logits)
        return pair.sampler(logits).reshape(1)

    def _commit(self, pair: _Pair, token: int) -> None:
        if pair.constraint is not None:
            pair.constraint.advance(torch.tensor([token]))
        pair.decided.append(token)
        if token in self.end_token_ids:
            pair.done = True

    def step(self, rows: Sequence[PairRow]) -> list[PairAction]:
        """Actions for the rows of one engine step, in the order given (any order, any subset of the pairs).

        Every pair's token is drawn on the logits' device first, and all of them reach the host in one transfer
        (:func:`to_host`): one GPU sync per engine step, whatever the number of pairs."""
        actions: list[PairAction | None] = [None] * len(rows)
        draws: list[tuple[_Pair, torch.Tensor, str, list[int]]] = []     # (pair, token on device, kind, rows)
        by_pair: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_pair.setdefault(row.pair_id, []).append(i)
        for pair_id, idx in by_pair.items():
            pair = self._pair(pair_id)
            roles = [rows[i].role for i in idx]
            if len(roles) != len(set(roles)):
                raise ValueError(f"pair {pair_id} has two rows with role {roles} in one step: client ids must be unique")
            frontier = len(pair.decided)
            at_front = {}
            for i in idx:
                row = rows[i]
                if row.role in pair.gone and row.role == UNCOND:
                    actions[i] = PairAction("retire", self.end_token_ids[0])
                elif row.position < frontier:
                    actions[i] = PairAction("replay", pair.decided[row.position])
                elif row.position == frontier:
                    at_front[row.role] = i
                else:
                    raise ValueError(f"row {row.key!r} of pair {pair_id} is at position {row.position}, past the "
                                     f"{frontier} decided tokens: rows must report their own generated length")
            pair.lag_steps = pair.lag_steps + 1 if len(at_front) == 1 else 0
            if len(at_front) == 1 and not pair.gone and not pair.split:
                pair.split = True
                self.stats["split"] += 1
            if COND in at_front and UNCOND in at_front:
                cond, uncond = rows[at_front[COND]].logits, rows[at_front[UNCOND]].logits
                draws.append((pair, self._draw(pair, cfg_mix(cond.reshape(1, -1), uncond.reshape(1, -1),
                                                             pair.guidance_scale)),
                              "guided", [at_front[COND], at_front[UNCOND]]))
            elif COND in at_front:
                i = at_front[COND]
                twin_gone = UNCOND in pair.gone
                if not twin_gone and not self.can_hold and pair.lag_steps > self.max_lag_steps:
                    pair.gone.add(UNCOND)       # a twin that stays behind can never catch up: stop waiting for it
                    twin_gone = True
                if twin_gone:
                    draws.append((pair, self._draw(pair, rows[i].logits), "solo", [i]))
                elif self.can_hold:
                    actions[i] = PairAction("hold")
                else:
                    draws.append((pair, self._draw(pair, rows[i].logits), "solo", [i]))
                    self.stats["unguided"] += 1
            elif UNCOND in at_front:
                i = at_front[UNCOND]
                if COND in pair.gone or not self.can_hold:
                    pair.gone.add(UNCOND)       # its token would have to equal a conditional one not decided yet
                    actions[i] = PairAction("retire", self.end_token_ids[0])
                else:
                    actions[i] = PairAction("hold")
        if draws:
            for (pair, _, kind, idx), token in zip(draws, to_host([d[1] for d in draws])):
                self._commit(pair, token)
                for i in idx:
                    actions[i] = PairAction(kind, token)
        for a in actions:
            self.stats[a.kind] += 1
        return actions  # type: ignore[return-value]

    def finish(self, pair_id: int) -> None:
        """Forget a pair once both twins have ended."""
        self.pairs.pop(pair_id, None)


class CfgLogitsPostProcessor:
    """TensorRT-LLM batched logits post-processor running :class:`CfgPairTracker` (``can_hold=False``).

    ``__call__(req_ids, logits, token_ids, stream_ptr, client_ids)`` follows ``BatchedLogitsProcessor`` of
    ``tensorrt_llm/sampling_params.py`` (and ``ExecutorConfig.logits_post_processor_batched``): ``logits[i]`` is the
    request's ``[beam, vocab]`` (or ``[1, beam, vocab]``) tensor, modified in place; ``token_ids[i]`` its tokens
    (beam x length). A row's generated length is its length minus the length at its first sighting (its prompt).
    Requests whose ``client_id`` is None are not CFG twins and are left untouched (their first sighting still
    marks their context as done: :meth:`started`, which :class:`~audex.serving.guided_executor.GuidedExecutor` uses
    to count the token budget of contexts still waiting). Each request must set
    ``logits_post_processor_name`` to the batched processor's name (``Request.BATCHED_POST_PROCESSOR_NAME``).
    """

    def __init__(self, tracker: CfgPairTracker):
        if tracker.can_hold:
            raise ValueError("TensorRT-LLM cannot hold a scheduled request: build the tracker with can_hold=False")
        self.tracker = tracker
        self.prompt_lengths: dict[int, int] = {}
        # the engine calls the processor from its own thread while the serving side registers and cancels pairs
        self.lock = threading.RLock()

    def __call__(self, req_ids, logits, token_ids, stream_ptr, client_ids) -> None:
        with self.lock:
            self._process(req_ids, logits, token_ids, stream_ptr, client_ids)

    def _process(self, req_ids, logits, token_ids, stream_ptr, client_ids) -> None:
        rows, targets = [], []
        for req_id, row_logits, tokens, client_id in zip(req_ids, logits, token_ids, client_ids):
            length = len(tokens[0])
            start = self.prompt_lengths.setdefault(req_id, length)     # also: this request's context has run
            if client_id is None:
                continue
            pair_id, role = split_client_id(client_id)
            flat = row_logits.reshape(-1, row_logits.shape[-1])
            rows.append(PairRow(req_id, pair_id, role, length - start, flat[0]))
            targets.append(flat)
        if not rows:
            return
        stream = None
        if stream_ptr is not None and torch.cuda.is_available():
            stream = torch.cuda.ExternalStream(stream_ptr)
        with torch.cuda.stream(stream) if stream is not None else _null():
            for action, flat in zip(self.tracker.step(rows), targets):
                force_token(flat, action.token)

    def started(self, req_id: int) -> bool:
        """Whether the request's context step has run (the processor sees every request once its context is done)."""
        return req_id in self.prompt_lengths

    def release(self, req_id: int) -> None:
        self.prompt_lengths.pop(req_id, None)


def to_host(tokens: Sequence[torch.Tensor]) -> list[int]:
    """The step's drawn tokens (``[1]`` tensors, on any device) as ints: one device-to-host copy for all of them."""
    return [int(t) for t in torch.cat([t.reshape(1) for t in tokens]).tolist()]


def force_token(logits: torch.Tensor, token: int | None) -> None:
    """In place: 0 at ``token``, -inf elsewhere (every sampler then picks ``token``)."""
    if token is None:
        raise RuntimeError("a TensorRT-LLM row was asked to hold, which the engine cannot do (can_hold=False)")
    logits.fill_(float("-inf"))
    logits[..., token] = 0.0


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
