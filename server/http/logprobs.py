"""Log-probabilities in the OpenAI API's two shapes, from the engine's `TokenLogprobs`: the completions API's
parallel lists (token texts, log-probabilities, alternatives, character offsets) and the chat API's entries
(with each token's UTF-8 bytes). A token's text is what the tokenizer decodes for it alone."""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

from server.engine.outputs import TokenLogprobs
from server.http.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

TokenText = Callable[[int], str]


def completion_logprobs(tokens: list[int], logprobs: list[TokenLogprobs | None], text_of: TokenText,
                        offset: int = 0) -> CompletionLogprobs:
    """`tokens` with their log-probabilities (None: a prompt's first token, which nothing predicts); offsets
    count characters from `offset` on."""
    texts = [text_of(t) for t in tokens]
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[None if lp is None else lp.logprob for lp in logprobs],
        top_logprobs=[None if lp is None else {text_of(t): v for t, v in lp.top} for lp in logprobs],
        text_offset=list(accumulate((len(t) for t in texts[:-1]), initial=offset)) if texts else [])


def chat_logprobs(logprobs: list[TokenLogprobs], text_of: TokenText) -> ChatLogprobs:
    def entry(token: int, logprob: float) -> dict:
        text = text_of(token)
        return dict(token=text, logprob=logprob, bytes=list(text.encode()))

    return ChatLogprobs(content=[
        ChatTokenLogprob(**entry(lp.token, lp.logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
        for lp in logprobs])
