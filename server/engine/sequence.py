"""One request's state while it generates: its tokens, their logprobs, and why it stopped."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.sampling import SamplingParams, TokenChooser


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    adapters: list[str]  # as the client listed them
    params: SamplingParams


@dataclass
class Sequence:
    request: GenerationRequest
    chooser: TokenChooser
    tokenizer: object
    eos_ids: frozenset[int]
    adapters: list[str] = field(default_factory=list)  # canonical order, once loaded
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # length | eos_token | stop_sequence
    text: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: float) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        params = self.request.params
        if token in self.eos_ids:
            self.finish_reason = "eos_token"
        elif params.stop and self._hit_stop(params.stop):
            self.finish_reason = "stop_sequence"
        elif len(self.tokens) >= params.max_new_tokens:
            self.finish_reason = "length"
        if self.finished and self.finish_reason != "stop_sequence":
            self.text = self._decode(self.tokens)

    def _hit_stop(self, stops: tuple[str, ...]) -> bool:
        previous, self.text = self.text, self._decode(self.tokens)
        for stop in stops:
            at = self.text.find(stop, max(0, len(previous) - len(stop) + 1))
            if at >= 0:
                self.text = self.text[: at + len(stop)]  # as TGI: the stop sequence ends the text
                return True
        return False

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
