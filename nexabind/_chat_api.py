"""``Llama``'s chat calls: the prompt from a chat handler, a named format or the model's
template, and the OpenAI ``chat.completion`` shapes of :mod:`nexabind.openai`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from nexabind import chat as chat_mod
from nexabind import chat_formats, openai
from nexabind._chat_plan import plan_chat
from nexabind._emit import spelled_markers
from nexabind._lcp import LlamaCompat
from nexabind.grammar import LlamaGrammar
from nexabind.tokens import Token

__all__ = ["LlamaChat"]

logger = logging.getLogger("nexabind.llama")


class LlamaChat(LlamaCompat):
    """Chat (see :class:`nexabind.Llama`)."""

    def format_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``messages`` into a prompt with this Llama's chat format or template.

        Raises:
            ValueError: A message is malformed.
            TemplateError: The template refused the messages.
        """
        setup = self._chat
        if setup.formatter is not None:
            return setup.formatter(messages=chat_mod.check_messages(messages)).prompt
        return chat_mod.format_chat(
            self._check().model,
            messages,
            template=setup.template,
            add_generation_prompt=add_generation_prompt,
        )

    def _template_source(self) -> str | None:
        """The jinja text this Llama renders chats with, if it renders with one."""
        setup = self._chat
        if setup.formatter is not None:
            return None
        return chat_mod.jinja_source(self._check().model, setup.template)

    def _chat_prompt(
        self, messages: list[dict[str, Any]], formatter: Any, **extra: Any
    ) -> tuple[list[int], list[str], Any]:
        """The prompt tokens of ``messages``, the format's stop strings and stopping criteria."""
        checked = chat_mod.check_messages(messages)
        setup = self._chat
        fmt = formatter or setup.formatter
        if fmt is None:
            model = self._check().model
            if self.tokenizer_ is None:
                tokens = chat_mod.prompt_tokens(model, checked, template=setup.template, **extra)
                return tokens, [], None
            text = chat_mod.format_chat(model, checked, template=setup.template, **extra)
            return self.tokenize(text.encode(), add_bos=True, special=True), [], None
        if setup.fallback and formatter is None and not self._fallback_warned:
            self._fallback_warned = True
            logger.warning(
                "%s has no chat template: chats use the chatml format; pass chat_format= or "
                "chat_template= to choose another",
                self.model_path,
            )
        res = fmt(messages=checked, **extra)
        tokens = self.tokenize(res.prompt.encode(), add_bos=not res.added_special, special=True)
        stops = [res.stop] if isinstance(res.stop, str) else list(res.stop or [])
        return tokens, stops, res.stopping_criteria

    def chat_tokens(self, text: str, seen: tuple[str, Sequence[int]] | None = None) -> list[int]:
        """Tokenize a prompt :meth:`format_chat` rendered, continuing from what the model saw.

        With ``seen`` (the text of the previous prompt and its reply, and the tokens the model
        saw for them: the prompt's, then the generated ids) and a ``text`` that starts with
        that text, the result is those tokens plus only the tokens of what follows, so a
        follow-up turn passed to :meth:`generate` decodes only its new tokens (see
        :func:`nexabind.chat.continue_prompt`).
        """
        return chat_mod.continue_prompt(self._check().model, text, seen)

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> Iterator[Token]:
        """Generate the assistant's reply to ``messages``, one :class:`Token` at a time.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            **options: As for :meth:`generate` (``max_tokens``, ``stop``, sampling options).
        """
        tokens, stops, criteria = self._chat_prompt(messages, None)
        stop = options.pop("stop", None)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if criteria is not None:
            options.setdefault("stopping_criteria", criteria)
        return self.generate(tokens, stop=stop + stops, **options)  # type: ignore[attr-defined]

    def create_chat_completion(
        self,
        messages: list[dict[str, Any]],
        functions: list[dict[str, Any]] | None = None,
        function_call: str | dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        response_format: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        logits_processor: Any = None,
        grammar: LlamaGrammar | str | None = None,
        logit_bias: dict[int, float] | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        **options: Any,
    ) -> Any:
        """Answer a conversation; returns a ``chat.completion`` dict or an iterator of chunks.

        llama-cpp-python's arguments, in its order; ``**options``: more sampling options of
        :class:`nexabind.sampling.SamplingOptions`. The prompt comes from ``chat_handler``,
        else ``chat_format``, else the model's template (chatml, with a warning logged once,
        when the model has none). ``logprobs=True`` fills each choice's ``logprobs`` as
        OpenAI's chat API does, with ``top_logprobs`` alternatives per token.

        Raises:
            ValueError: ``top_logprobs`` without ``logprobs=True``, or out of range; a
                malformed message.
            TemplateError: The template refused the messages.
        """
        request = {k: v for k, v in locals().items() if k not in ("self", "messages", "options")}
        handler = self.chat_handler or self._chat.handler
        if handler is not None and not isinstance(handler, chat_formats.FormatterHandler):
            return handler(llama=self, messages=messages, **request, **options)
        formatter = handler.formatter if handler is not None else None
        return self._chat_completion(messages, formatter=formatter, **request, **options)

    def _chat_completion(
        self,
        messages: list[dict[str, Any]],
        *,
        formatter: Any = None,
        functions: list[dict[str, Any]] | None = None,
        function_call: str | dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        stream: bool = False,
        stop: str | Sequence[str] | None = None,
        response_format: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        model: str | None = None,
        logits_processor: Any = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        **sampling: Any,
    ) -> Any:
        """The chat pipeline behind :meth:`create_chat_completion` and chat handlers made from
        a formatter (``formatter`` renders the prompt instead of this Llama's format)."""
        if top_logprobs is not None and not logprobs:
            msg = "top_logprobs needs logprobs=True"
            raise ValueError(msg)
        if top_logprobs is not None and top_logprobs < 0:
            msg = f"top_logprobs={top_logprobs} is invalid; use a number of tokens >= 0"
            raise ValueError(msg)
        plan = plan_chat(
            chat_mod.check_messages(messages),
            template=self._template_source(),
            tools=tools,
            tool_choice=tool_choice,
            functions=functions,
            function_call=function_call,
            response_format=response_format,
            grammar=sampling.get("grammar"),
        )
        sampling["grammar"] = plan.grammar
        tokens, stops, criteria = self._chat_prompt(plan.messages, formatter, **plan.extra)
        if plan.opener:
            tokens = tokens + self.tokenize(plan.opener.encode(), add_bos=False, special=True)
        output = plan.output
        stop_list = [stop] if isinstance(stop, str) else list(stop or [])
        n_top = (top_logprobs or 0) if logprobs else False
        it = self._start(
            tokens,
            max_tokens=self._budget(tokens, max_tokens),
            stop=stop_list + stops,
            logprobs=n_top,
            options=sampling,
            processors=logits_processor,
            criteria=criteria,
            next_seed=True,
            spelled=None if output is None else spelled_markers(self._check().model, plan.markers),
        )
        shape = openai.chat_chunks if stream else openai.chat_completion
        return shape(
            it,
            self._outcome,
            model=model or self.model_path,
            logprobs=bool(logprobs),
            piece=self._check().model.token_to_piece,
            tools=output,
        )
