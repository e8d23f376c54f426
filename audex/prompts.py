"""The chat templates of Figure 2 and the task prompts of appendix A, as a NeMo prompt format, and the one
``<sound>`` expander (:func:`expand_sound`) that data, inference and serving all use.

Rendered strings (``<|im_end|>`` ends every turn; turns are joined by ``"\\n"``; the last assistant turn ends
at its ``<|im_end|>``)::

    <|im_start|>system
    You are a helpful and harmless assistant.
    You are not allowed to use any tools<|im_end|>
    <|im_start|>user
    {user content}<|im_end|>
    <|im_start|>assistant
    <think>                                  thinking mode: <think>\\n{reasoning}\\n</think>\\n{answer}
    {reasoning}                              instruct mode: <think></think>\\n{answer}
    </think>                                 ("</think> right after <think>, without \\n", Figure 2a)
    {answer}<|im_end|>

User contents per task (Figure 2 b-d, appendix A.6-A.10):

* ASR ``<sound>\\nTranscribe the speech in the input audio`` (+ ``\\nLanguage: {LANGUAGE_ID}`` for
  language-conditioned multilingual ASR); AST ``<sound>\\nTranslate the spoken content in the audio to
  English``; audio QA ``<sound>\\n{question}``; captioning ``<sound>\\nDescribe the audio``; multiple choice,
  entailment and hallucination questions exactly as in A.9.
* TTS ``<|text to speech|> Generate speech for this transcription. {text}`` -> ``<speechgen_start>`` codes
  ``<speechgen_end>``; TTA ``<|text to audio|> Generate audio for this caption. {caption}`` ->
  ``<audiogen_start>`` codes ``<audiogen_end>``. Audio tasks are always in instruct mode (section 4.2).

Targets (section 4.1, appendix D), a choice this module fixes and :func:`parse_speech_target` reads back:

* ASR: ``Language: {language}\\nTranscription: {transcript}``
* AST: ``Language: {language}\\nTranscription: {transcript}\\nTranslation: {english}``

so an AST answer extends the ASR answer, and language-conditioned decoding teacher-forces
:func:`speech_target_prefix`.

Where ``<sound>`` goes: appendix A writes every evaluation prompt as ``<sound>\\n{question}`` (format
``"audex"``, the default); Figure 2b draws it after the question (format ``"audex-sound-last"``).

Trainable tokens: what the model generates after the generation prompt. The generation prompt is
``<|im_start|>assistant\\n<think></think>\\n`` in instruct mode and ``<|im_start|>assistant\\n<think>\\n`` in
thinking mode, so the answer (and in thinking mode the reasoning and ``</think>\\n``) plus the closing
``<|im_end|>`` are trainable; system and user turns, headers and the ``\\n`` between turns are not. In a
multi-turn thinking chat, assistant turns before the last user turn lose their reasoning (latest-turn
thought retention, appendix A.5) and are rendered as context, untrained; in instruct mode every assistant
turn is trained.

Tool-calling chats (tool definitions, assistant ``tool_calls``, ``tool`` turns; :mod:`audex.tool_calls`) are
rendered by the backbone tokenizer's own ``chat_template`` (Audex's Hermes-style template when it has none),
with the same rule: assistant turns train, everything else is context.

Why a subclass of NeMo's ``PromptFormatter``: the registry (``PromptFormatter.resolve("audex")``) and the
``encode_dialog`` contract (``input_ids``, ``context_ids``, ``answer_ids``, ``mask``) fit and make the format
usable from NeMo's Lhotse dataloader (``prompt_format: audex``). NeMo's ``qwen3``/``nemotron-nano-v3``
formatters do not fit as they are: they mask whole turns (the ``<|im_start|>assistant`` header is trained),
put ``\\n\\n`` (qwen3) or nothing (nano-v3) after ``</think>`` where Figure 2 has ``\\n``, end with a ``\\n``
after the last ``<|im_end|>``, randomly inject ``/think`` tags, and can only tokenise text, while TTS/TTA
answers are codec ids that live outside the text tokenizer. So ``encode_dialog`` is overridden; the turn
templates themselves are the ``TEMPLATE`` of the class.

Example::

    >>> fmt = PromptFormatter.resolve("audex")(tokenizer)
    >>> turns = [{"role": "user", "content": fmt.audio_content(asr_question())},
    ...          {"role": "assistant", "content": asr_target("en", "HELLO WORLD")}]
    >>> enc = fmt.encode_dialog(turns)             # input_ids, mask, context_ids, answer_ids
    >>> fmt.render_text(turns).endswith("Language: en\\nTranscription: HELLO WORLD<|im_end|>")
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from nemo.collections.common.prompts.formatter import Modality, PromptFormatter

from audex.tool_calls import TOOLS_SYSTEM_PROMPT, chat_template_for, is_tool_chat, tool_chat_parts
from audex.vocab import IM_END, IM_START, PAD, SOUND, THINK_END, THINK_START

SYSTEM_PROMPT = "You are a helpful and harmless assistant.\nYou are not allowed to use any tools"

# ---- task prompts (appendix A) ------------------------------------------------------------------
ASR_PROMPT = "Transcribe the speech in the input audio"
ASR_LANGUAGE_LINE = "Language: {language}"
AST_PROMPT = "Translate the spoken content in the audio to English"
CAPTION_PROMPT = "Describe the audio"
MCQ_PROMPT = "{question} Choose the correct option from the following options:\n{options}"
ENTAILMENT_PROMPT = ("Is the following description true about the input audio? Answer in Yes, No or Maybe.\n"
                     "Description: {description}")
HALLUCINATION_PROMPT = "Did you hear {sound_event} in the audio?"
TTS_USER_TEMPLATE = "<|text to speech|> Generate speech for this transcription. {text}"
TTA_USER_TEMPLATE = "<|text to audio|> Generate audio for this caption. {caption}"
S2S_REASONING_TEMPLATE = ("{question} \n\n Conclude your response with the sentence "
                          "\u2018The answer is \\boxed{{X}}.\u2019")
S2S_ANSWER_TEMPLATE = "The answer is {answer}"

# ---- speech targets (section 4.1) ---------------------------------------------------------------
ASR_TARGET_TEMPLATE = "Language: {language}\nTranscription: {transcript}"
AST_TARGET_TEMPLATE = ASR_TARGET_TEMPLATE + "\nTranslation: {translation}"

INSTRUCT_THINK = f"{THINK_START}{THINK_END}\n"
THINKING_OPEN = f"{THINK_START}\n"


def asr_question(language: str | None = None) -> str:
    """ASR user prompt (A.7); with ``language`` the multilingual, language-conditioned form."""
    return ASR_PROMPT if language is None else f"{ASR_PROMPT}\n{ASR_LANGUAGE_LINE.format(language=language)}"


def mcq_question(question: str, choices: Sequence[str]) -> str:
    """Multiple-choice prompt of MMAU/MMAR/MMSU (A.9): options lettered (A), (B), ..."""
    if not 2 <= len(choices) <= 26:
        raise ValueError(f"a multiple-choice question needs 2 to 26 choices, got {len(choices)}")
    options = "\n".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices))
    return MCQ_PROMPT.format(question=question, options=options)


def entailment_question(description: str) -> str:
    return ENTAILMENT_PROMPT.format(description=description)


def hallucination_question(sound_event: str) -> str:
    return HALLUCINATION_PROMPT.format(sound_event=sound_event)


def s2s_reasoning_prompt(transcribed_question: str) -> str:
    """Text-reasoning step of the speech-interaction cascade (A.8)."""
    return S2S_REASONING_TEMPLATE.format(question=transcribed_question)


def s2s_answer_text(answer: str) -> str:
    """What the cascade speaks for BigBenchAudio (A.8)."""
    return S2S_ANSWER_TEMPLATE.format(answer=answer)


def _condition(value: str | None, num_pads: int | None, what: str) -> str:
    if (value is None) == (num_pads is None):
        raise ValueError(f"give either the {what} or num_pads (a CFG-unconditional prompt), not both or neither")
    if num_pads is not None:
        if num_pads <= 0:
            raise ValueError(f"num_pads must be positive, got {num_pads}")
        return PAD * num_pads
    return value


def tts_user_content(text: str | None = None, num_pads: int | None = None) -> str:
    """TTS user turn; ``num_pads`` replaces the transcript by that many ``<pad>`` (CFG, section 4.3)."""
    return TTS_USER_TEMPLATE.format(text=_condition(text, num_pads, "transcript"))


def tta_user_content(caption: str | None = None, num_pads: int | None = None) -> str:
    """TTA user turn; ``num_pads`` replaces the caption by that many ``<pad>`` (CFG, section 4.3)."""
    return TTA_USER_TEMPLATE.format(caption=_condition(caption, num_pads, "caption"))


def asr_target(language: str, transcript: str) -> str:
    return ASR_TARGET_TEMPLATE.format(language=language, transcript=transcript)


def ast_target(language: str, transcript: str, translation: str) -> str:
    return AST_TARGET_TEMPLATE.format(language=language, transcript=transcript, translation=translation)


def speech_target_prefix(language: str) -> str:
    """The teacher-forced language field of language-conditioned ASR (appendix D)."""
    return ASR_TARGET_TEMPLATE.split("{transcript}")[0].format(language=language)


def parse_speech_target(text: str) -> dict[str, str | None]:
    """Read an ASR/AST answer back: ``{"language", "transcription", "translation"}`` (None when absent).
    An answer that does not follow the format is returned whole as the transcription."""
    fields = {"language": None, "transcription": None, "translation": None}
    labels = {"Language: ": "language", "Transcription: ": "transcription", "Translation: ": "translation"}
    current = None
    for line in text.split("\n"):
        label = next((lab for lab in labels if line.startswith(lab)), None)
        if label is not None:
            current = labels[label]
            fields[current] = line[len(label):]
        elif current is not None:
            fields[current] += "\n" + line
    if all(v is None for v in fields.values()):
        fields["transcription"] = text
    return {k: v.strip() if v is not None else None for k, v in fields.items()}


# ---- audio placeholders ---------------------------------------------------------------------------
class SoundPlaceholderError(ValueError):
    """The ``<sound>`` placeholders of a prompt do not fit its audio clips."""


def expand_sound(ids: Sequence[int], num_audio_frames: Sequence[int], tokenizer,
                 trainable: Sequence[bool] | None = None) -> tuple[list[int], list[bool]]:
    """Replace the i-th ``<sound>`` of ``ids`` by ``<so_start>`` + ``num_audio_frames[i]`` x ``<so_embedding>``
    + ``<so_end>`` (section 3.2: the adapter's frames fill the ``<so_embedding>`` rows). ``trainable`` (one flag
    per id, default all False) is expanded alongside; the placeholder rows are never trainable.

    Raises :class:`SoundPlaceholderError` when the counts differ, when the text already holds
    ``<so_start>``/``<so_embedding>``/``<so_end>``, or when a ``<sound>`` sits in a trainable turn.

    Example::

        >>> ids, _ = expand_sound(tok.encode("<sound>\\nHi"), [750], tok)   # one 30 s window
        >>> ids.count(tok.so_embedding)
        750
    """
    ids = list(ids)
    trainable = [False] * len(ids) if trainable is None else list(trainable)
    sound = tokenizer.sound
    n_sound = ids.count(sound)
    if n_sound != len(num_audio_frames):
        raise SoundPlaceholderError(f"{n_sound} <sound> tokens for {len(num_audio_frames)} audios")
    if not {tokenizer.so_start, tokenizer.so_embedding, tokenizer.so_end}.isdisjoint(ids):
        raise SoundPlaceholderError("the text contains <so_start>/<so_embedding>/<so_end>")
    out_ids: list[int] = []
    out_train: list[bool] = []
    k = 0
    for i, t in zip(ids, trainable):
        if i != sound:
            out_ids.append(i)
            out_train.append(t)
            continue
        if t:
            raise SoundPlaceholderError("<sound> in a trainable (assistant) turn")
        block = [tokenizer.so_start] + [tokenizer.so_embedding] * int(num_audio_frames[k]) + [tokenizer.so_end]
        out_ids.extend(block)
        out_train.extend([False] * len(block))
        k += 1
    return out_ids, out_train


@dataclass(frozen=True)
class PromptPiece:
    """A stretch of the sequence: ``text`` to tokenise, or pre-tokenised ``ids`` (codec tokens)."""

    text: str | None = None
    ids: tuple[int, ...] | None = None
    trainable: bool = False


class AudexPromptFormatter(PromptFormatter):
    """Figure 2 chat format (registered in NeMo as ``"audex"``); see the module docstring.

    Turns are ``{"role": "system"|"user"|"assistant", "content": str | Sequence[int], "thinking": str}``;
    an assistant ``content`` given as ids is pre-tokenised (e.g. ``<speechgen_start>`` codes
    ``<speechgen_end>``); an assistant ``prefix`` (ids) opens the answer as untrained context (the
    ``<speechgen_start>`` + reference codes of voice-prompted TTS, :mod:`audex.voice_prompt`). A missing system
    turn is filled with :data:`SYSTEM_PROMPT`.

    Example::

        >>> fmt = AudexPromptFormatter(tokenizer)
        >>> fmt.render_text([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\\n<think></think>\\n")
        True
    """

    NAME = "audex"
    OUTPUT_ROLE = "assistant"
    INFERENCE_PREFIX = f"{IM_START}assistant\n"
    SOUND_FIRST = True
    TEMPLATE = {
        "system": {"template": f"{IM_START}system\n|message|{IM_END}\n", "slots": {"message": Modality.Text}},
        "user": {"template": f"{IM_START}user\n|message|{IM_END}\n", "slots": {"message": Modality.Text}},
        OUTPUT_ROLE: {"template": f"{INFERENCE_PREFIX}|message|{IM_END}\n", "slots": {"message": Modality.Text}},
    }

    def __init__(self, tokenizer, defaults: list[dict] | None = None, system_prompt: str | None = SYSTEM_PROMPT,
                 chat_template: str | None = None):
        super().__init__(tokenizer, defaults)
        self.system_prompt = system_prompt
        self.chat_template = chat_template  # tool chats: None = the tokenizer's own, else Audex's built-in
        self._text_to_ids = getattr(tokenizer, "text_to_ids", None) or tokenizer.encode

    # ---- contents ------------------------------------------------------------------------------
    def audio_content(self, question: str, num_audios: int = 1) -> str:
        """User content with ``num_audios`` ``<sound>`` placeholders placed as this format places them."""
        sounds = SOUND * num_audios
        return f"{sounds}\n{question}" if self.SOUND_FIRST else f"{question}\n{sounds}"

    # ---- rendering -----------------------------------------------------------------------------
    def _turn_parts(self, role: str) -> tuple[str, str]:
        head, tail = self.get_template(role).split("|message|")
        return head, tail

    def pieces(self, turns: Sequence[dict], thinking: bool = False, tools: Sequence[dict] | None = None
               ) -> list[PromptPiece]:
        """The dialog as :class:`PromptPiece` s. If it does not end with an assistant turn, the generation
        prompt (assistant header + think prefix of the mode) is appended. A tool chat (``tools`` or tool turns)
        goes through :meth:`tool_chat_pieces`."""
        if is_tool_chat(turns, tools):
            return self.tool_chat_pieces(turns, thinking, tools)
        turns = list(turns)
        roles = [t.get("role") for t in turns]
        unknown = [r for r in roles if r not in self.get_roles()]
        if not turns or unknown:
            raise ValueError(f"turns must be a non-empty list with roles in {self.get_roles()}, got {roles}")
        if roles[0] != "system" and self.system_prompt is not None:
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)
        out: list[PromptPiece] = []
        for i, turn in enumerate(turns):
            role, content = turn["role"], turn["content"]
            head, tail = self._turn_parts(role)
            if role != self.OUTPUT_ROLE:
                if not isinstance(content, str):
                    raise ValueError(f"{role} turn {i}: content must be a string")
                out.append(PromptPiece(text=head + content + tail))
                continue
            trainable = not thinking or i > last_user
            reasoning = turn.get("thinking")
            if reasoning and not thinking:
                raise ValueError(f"assistant turn {i} carries reasoning but the dialog is in instruct mode")
            with_reasoning = thinking and trainable
            out.append(PromptPiece(text=head + (THINKING_OPEN if with_reasoning else INSTRUCT_THINK)))
            if with_reasoning:
                out.append(PromptPiece(text=f"{reasoning or ''}\n{THINK_END}\n", trainable=True))
            if turn.get("prefix"):  # a teacher-forced opening of the answer (a voice prompt's codes): context
                out.append(PromptPiece(ids=tuple(int(x) for x in turn["prefix"])))
            if isinstance(content, str):
                out.append(PromptPiece(text=content + IM_END, trainable=trainable))
            else:
                ids = tuple(int(x) for x in (content.tolist() if isinstance(content, torch.Tensor) else content))
                out.append(PromptPiece(ids=ids, trainable=trainable))
                out.append(PromptPiece(text=IM_END, trainable=trainable))
            if i < len(turns) - 1:
                out.append(PromptPiece(text=tail[len(IM_END):]))
        if turns[-1]["role"] != self.OUTPUT_ROLE:
            out.append(PromptPiece(text=self.INFERENCE_PREFIX + (THINKING_OPEN if thinking else INSTRUCT_THINK)))
        return out

    def tool_chat_template(self) -> str | None:
        """The template of tool chats (:func:`~audex.tool_calls.chat_template_for`)."""
        return chat_template_for(getattr(self.tokenizer, "hf", self.tokenizer), self.chat_template)

    def tool_chat_pieces(self, turns: Sequence[dict], thinking: bool = False, tools: Sequence[dict] | None = None
                         ) -> list[PromptPiece]:
        """A tool chat rendered by the chat template, assistant turns trainable; the default system turn drops
        Figure 2's "not allowed to use any tools" line (:func:`~audex.tool_calls.tool_chat_parts`)."""
        system = TOOLS_SYSTEM_PROMPT if self.system_prompt == SYSTEM_PROMPT else self.system_prompt
        parts = tool_chat_parts(getattr(self.tokenizer, "hf", self.tokenizer), turns, thinking, tools, system,
                                self.tool_chat_template())
        return [PromptPiece(text=text, trainable=trained) for text, trained in parts]

    def encode_pieces(self, pieces: Sequence[PromptPiece]) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        trainable: list[bool] = []
        for p in pieces:
            piece_ids = list(p.ids) if p.ids is not None else list(self._text_to_ids(p.text))
            ids.extend(piece_ids)
            trainable.extend([p.trainable] * len(piece_ids))
        return ids, trainable

    def render_text(self, turns: Sequence[dict], thinking: bool = False, tools: Sequence[dict] | None = None) -> str:
        """The dialog as one string (pre-tokenised ids are decoded with the tokenizer)."""
        return "".join(p.text if p.ids is None else self.tokenizer.decode(list(p.ids))
                       for p in self.pieces(turns, thinking, tools))

    def encode_dialog(self, turns: list[dict], thinking: bool = False, tools: Sequence[dict] | None = None
                      ) -> dict[str, torch.Tensor]:
        """NeMo's contract: ``input_ids``; for a dialog ending with an assistant turn also ``mask`` (trainable
        tokens), ``answer_ids`` (the last turn's generated part) and ``context_ids`` (everything before it,
        which equals the generation prompt of the dialog without its last turn)."""
        ids, trainable = self.encode_pieces(self.pieces(turns, thinking, tools))
        ans = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if turns[-1]["role"] == self.OUTPUT_ROLE:
            first = len(trainable)
            while first > 0 and trainable[first - 1]:
                first -= 1
            ans["context_ids"] = ans["input_ids"][:first]
            ans["answer_ids"] = ans["input_ids"][first:]
            ans["mask"] = torch.tensor(trainable, dtype=torch.bool)
        else:
            ans["context_ids"] = ans["input_ids"]
        return ans


class AudexSoundLastPromptFormatter(AudexPromptFormatter):
    """Figure 2b's placement of the audio: ``{question}\\n<sound>`` (registered as ``"audex-sound-last"``)."""

    NAME = "audex-sound-last"
    SOUND_FIRST = False


def get_prompt_formatter(name_or_formatter: str | AudexPromptFormatter, tokenizer=None, **kwargs) -> AudexPromptFormatter:
    """Resolve a registered Audex prompt format by name (or pass an instance through)."""
    if isinstance(name_or_formatter, AudexPromptFormatter):
        return name_or_formatter
    cls = PromptFormatter.resolve(name_or_formatter)
    if not issubclass(cls, AudexPromptFormatter):
        audex = sorted(n for n, c in PromptFormatter._REGISTERED_FORMATTERS.items() if issubclass(c, AudexPromptFormatter))
        raise ValueError(f"prompt format {name_or_formatter!r} is not an Audex format (it cannot place audio or "
                         f"codec tokens); use one of {audex}")
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to build a prompt formatter")
    return cls(tokenizer, **kwargs)
