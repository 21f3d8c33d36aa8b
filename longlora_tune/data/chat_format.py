"""Prompt and answer token ids through a torchtune model tokenizer's own chat template.

An instruction-tuned Llama 3, Qwen2.5 or Mistral model was trained on its family's chat format, so its
long-context SFT should use it too. torchtune's model tokenizers implement those formats in
``tokenize_messages(list[Message])``; :class:`ChatFormat` runs a LongAlpaca record through it as a
conversation ``[system (optional), user, assistant]`` and splits the result into

* the prompt: everything up to the answer, i.e. the generation prompt (the conversation with an empty
  assistant turn and no end tokens, which ends with the assistant header), all labels ignored;
* the answer tail: the answer's tokens, the end-of-turn token and any EOS the tokenizer appends, labelled
  as ``tokenize_messages``'s mask says (Llama 3's final ``<|end_of_text|>`` is masked there, so it is
  ignored here too).

``prompt + tail`` are exactly the tokens of ``tokenize_messages`` on the whole conversation (checked when
the format is built); only the assistant header moves into the masked prompt (torchtune trains it). What
torchtune 0.6.1 emits for ``[user "Q", assistant "A"]``, and how it differs from the Hugging Face chat
templates of the released models:

* Llama 3 / 3.1: ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nQ<|eot_id|>``
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\nA<|eot_id|><|end_of_text|>``. Hugging Face's
  Llama 3.1 template also inserts a system turn (``Cutting Knowledge Date: ...``) when none is given, and
  ends at ``<|eot_id|>``.
* Qwen2.5: ``<|im_start|>user\\nQ<|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>``. Hugging Face's
  template adds the default system turn ``You are Qwen, created by Alibaba Cloud. You are a helpful
  assistant.`` when none is given, and a ``\\n`` after the last ``<|im_end|>``. Text is not stripped.
* Mistral (``MistralChatTemplate``, v0.1/v0.2 format): ``<s>[INST] Q  [/INST] A</s>``: ``[INST]`` and
  ``[/INST]`` are plain text, each piece encoded separately, so with Mistral's SentencePiece (dummy prefix,
  whitespace kept) there are two spaces before ``[/INST]`` and one before the answer, where Hugging Face's
  template gives ``[INST] Q [/INST]A</s>`` (and v0.3 uses control tokens for ``[INST]``). No system
  prompt.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Optional

from torchtune.data import Message

from longlora_tune.errors import LongLoRAConfigError

# Short stand-ins used to probe the template once (the format must not depend on the text).
_PROBE_USERS = ("Which animal?", "Name the bird in the story.")
_PROBE_ANSWER = "A small bird."


def _end_flag(tokenizer: Any) -> Optional[str]:
    """The keyword of ``tokenize_messages`` that turns end tokens off (its name differs per family)."""
    params = inspect.signature(tokenizer.tokenize_messages).parameters
    for name in ("add_end_tokens", "add_eos"):
        if name in params:
            return name
    return None


class ChatFormat:
    """A LongAlpaca record as a chat conversation, tokenized by the model tokenizer's template.

    Args:
        tokenizer: a torchtune model tokenizer with a chat template, e.g. ``llama3_tokenizer``,
            ``qwen2_5_tokenizer``, ``mistral_tokenizer`` (or ``llama2_tokenizer`` given a
            ``prompt_template``). Its ``max_seq_len`` is not applied (over-long samples are the dataset's
            business, and cutting from the right would drop the answer).
        system_prompt: optional system turn put before every user turn.

    Raises:
        LongLoRAConfigError: (one line) for a tokenizer without ``tokenize_messages``, one whose template
            adds nothing around the messages, one that rejects the system prompt, or one whose prompt and
            answer do not tokenize independently.
    """

    def __init__(self, tokenizer: Any, *, system_prompt: Optional[str] = None) -> None:
        name = type(tokenizer).__name__
        if not callable(getattr(tokenizer, "tokenize_messages", None)):
            raise LongLoRAConfigError(
                f"dataset.template=chat needs a torchtune model tokenizer with tokenize_messages, not "
                f"{name}; use a model tokenizer (llama3_tokenizer, qwen2_5_tokenizer, ...) or "
                "dataset.template=llama2_chat"
            )
        self._end_flag = _end_flag(tokenizer)
        if self._end_flag is None:
            raise LongLoRAConfigError(
                f"dataset.template=chat: {name}.tokenize_messages takes neither add_end_tokens nor add_eos; "
                "use dataset.template=llama2_chat or alpaca"
            )
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise LongLoRAConfigError(f"dataset.system_prompt={system_prompt!r} must be a string or null")
        if getattr(tokenizer, "max_seq_len", None) is not None:
            tokenizer = copy.copy(tokenizer)
            tokenizer.max_seq_len = None
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt or None
        try:
            self._probe_prompt = self.prompt_ids(_PROBE_USERS[0])
            self._check(name)
        except LongLoRAConfigError:
            raise
        except Exception as e:  # the template's own refusal (e.g. Mistral's "no system prompt")
            what = "dataset.system_prompt" if self.system_prompt else "dataset.template=chat"
            raise LongLoRAConfigError(
                f"{what}: {name}'s chat template refused a LongAlpaca conversation ({e})".replace("\n", " ")
            ) from e

    def _messages(self, user: str, answer: str) -> list[Message]:
        messages = []
        if self.system_prompt:
            messages.append(Message(role="system", content=self.system_prompt, masked=True))
        messages.append(Message(role="user", content=user, masked=True))
        messages.append(Message(role="assistant", content=answer, masked=False))
        return messages

    def _tokenize(self, user: str, answer: str, end: bool) -> tuple[list[int], list[bool]]:
        return self.tokenizer.tokenize_messages(self._messages(user, answer), **{self._end_flag: end})

    def _check(self, name: str) -> None:
        """Check on probe texts that the template is one and that prompt and answer tokenize apart."""
        user = _PROBE_USERS[0]
        bos = [self.tokenizer.bos_id] if getattr(self.tokenizer, "bos_id", None) is not None else []
        plain = bos + self.tokenizer.encode(user, add_bos=False, add_eos=False)
        if self._probe_prompt == plain:
            raise LongLoRAConfigError(
                f"dataset.template=chat: {name} has no chat template (tokenize_messages adds nothing around "
                "the messages); use dataset.template=llama2_chat for Llama 2, or give the tokenizer a "
                "prompt_template"
            )
        for probe in _PROBE_USERS:
            full, _ = self._tokenize(probe, _PROBE_ANSWER, True)
            tail, _ = self.answer_ids(_PROBE_ANSWER)
            if full != self.prompt_ids(probe) + tail:
                raise LongLoRAConfigError(
                    f"dataset.template=chat: {name}'s chat template does not tokenize the prompt and the "
                    "answer independently; use dataset.template=llama2_chat or alpaca"
                )

    def prompt_ids(self, user: str) -> list[int]:
        """Token ids of the generation prompt: the conversation up to and including the assistant header.

        Args:
            user: the user turn's text.

        Returns:
            The ids (BOS, system and user turns, assistant header), all to be ignored by the loss.
        """
        return self._tokenize(user, "", False)[0]

    def answer_ids(self, answer: str) -> tuple[list[int], list[bool]]:
        """Token ids that follow the prompt: the answer, its end-of-turn token and any EOS.

        Args:
            answer: the assistant turn's text.

        Returns:
            ``(ids, trained)``: ``trained[i]`` is False where ``tokenize_messages`` masks the token
            (Llama 3's final ``<|end_of_text|>``).
        """
        tokens, mask = self._tokenize(_PROBE_USERS[0], answer, True)
        n = len(self._probe_prompt)
        return tokens[n:], [not m for m in mask[n:]]
