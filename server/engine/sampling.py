"""Choosing the next token: TGI's and OpenAI's parameters, with the semantics of transformers' logits processors,
batched on the device."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from server.engine.constraints import mask_constrained

GREEDY_TEMPERATURE = 1e-5
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default; the API fits it to the context room left (api/validation.py)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS  # None: the default, fitted to the context (the API's)
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0  # OpenAI: minus penalty times the count of each generated token
    presence_penalty: float = 0.0  # OpenAI: minus penalty once per token generated at all
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0  # alternatives reported per generated token
    prompt_logprobs: bool = False  # logprob of each prompt token (TGI's decoder_input_details)
    processed_logprobs: bool = False  # a constrained row's logprobs after its grammar's mask (vLLM's processed)

    @property
    def sampling(self) -> bool:
        """As in TGI: any warper turns sampling on; as in vLLM, a temperature under 1e-5 means greedy."""
        if self.temperature is not None and self.temperature < GREEDY_TEMPERATURE:
            return False
        warped = (self.temperature not in (None, 1.0)) or bool(self.top_k) or (self.top_p not in (None, 1.0))
        return self.do_sample or warped


class TokenChooser:
    """Per-sequence state for picking tokens: its parameters and, when sampling, a seeded generator. The choosing
    itself is batched (`sample`)."""

    def __init__(self, params: SamplingParams, prompt_length: int = 0):
        self.params = params
        self.prompt_length = prompt_length  # OpenAI's penalties count the generated tokens only
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if params.sampling:
            self.seed = params.seed if params.seed is not None else random.getrandbits(63)
            # on the CPU whatever the model's device: a seed gives the same draws on every device
            self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def processes(self) -> bool:
        """Whether its scores differ from the logits: a bias, a penalty or (when sampling) a warper."""
        p = self.params
        penalties = bool(p.logit_bias) or p.repetition_penalty not in (None, 1.0)
        penalties = penalties or bool(p.frequency_penalty or p.presence_penalty)
        warpers = p.temperature not in (None, 1.0) or bool(p.top_k) or p.top_p not in (None, 1.0)
        return penalties or (self.generator is not None and warpers)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits."""
        return self.generator is None and not self.processes

    def noise(self, vocab: int) -> torch.Tensor:
        """[vocab] exponential draws from its generator, what torch.multinomial draws for one sample: the token is
        argmax(probs / noise)."""
        return torch.empty(1, vocab).exponential_(generator=self.generator)[0]


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: float
    alternatives: list[tuple[int, float]]  # the top logprobs, if the request asked


def sample(rows: list, logits: torch.Tensor, choosable: int | None = None) -> list[Choice | Exception]:
    """The next token of each row (a Sequence: its chooser, parameters and tokens so far) from its logits,
    [len(rows), vocab], among the ids below `choosable` (all by default); a row whose choice fails gets the exception
    instead, the others are unaffected. Logprobs are the model's own (over its whole vocabulary; alternatives among
    the ids below `choosable`), or for a constrained row that asks for processed logprobs, those after its grammar's
    mask.

    Batched on the logits' device: the rows that only take the argmax take it together, the others (constrained,
    penalised, sampled) go through each processor once for all of them, and the step brings back one tensor (one
    sync): tokens, their logprobs and the top logprobs asked for. Semantics per row: transformers' processors in
    this order (logit bias, repetition penalty, OpenAI's frequency and presence penalties, temperature, top-k,
    top-p), the grammar's mask before them, then torch.multinomial's draw (argmax of probs over exponential noise
    from the row's seeded CPU generator)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # also for constrained rows
    scores = logits[:, :choosable].float()
    vocab = scores.shape[-1]
    masked = mask_constrained(rows, scores)  # constrained rows only
    failed: dict[int, Exception] = {row: exc for row, exc in masked.items() if isinstance(exc, Exception)}
    tokens = scores.argmax(dim=-1)
    special = [
        row for row, seq in enumerate(rows) if row not in failed and (row in masked or not seq.chooser.plain_greedy)
    ]
    if special:
        noise = {}
        for row in special:
            if rows[row].chooser.generator is not None:
                try:
                    noise[row] = rows[row].chooser.noise(vocab)
                except Exception as exc:  # noqa: BLE001 - this row's choice failed: handed to the caller
                    failed[row] = exc
        special = [row for row in special if row not in failed]
    if special:
        special, chosen = _choose_isolated(
            rows, special, [masked.get(r, scores[r : r + 1]) for r in special], noise, failed
        )
    if special:
        tokens = tokens.index_copy(0, torch.tensor(special, device=tokens.device), chosen)
    processed = [r for r, m in masked.items() if r not in failed and rows[r].request.params.processed_logprobs]
    if processed:  # over what the grammar allows
        own = torch.full((len(processed), logprobs.shape[-1]), -torch.inf, device=logprobs.device)
        own[:, :vocab] = torch.log_softmax(torch.cat([masked[r] for r in processed]), dim=-1)
        logprobs = logprobs.index_copy(0, torch.tensor(processed, device=logprobs.device), own)
    parts = [tokens.double(), logprobs.gather(1, tokens[:, None])[:, 0].double()]
    asked = [(row, seq.request.params.top_logprobs) for row, seq in enumerate(rows) if seq.request.params.top_logprobs]
    if asked:
        top = min(max(k for _, k in asked), vocab)
        index = torch.tensor([row for row, _ in asked], device=logprobs.device)
        values, ids = logprobs[:, :choosable].index_select(0, index).topk(top, dim=-1)
        parts += [ids.double().flatten(), values.double().flatten()]
    values = torch.cat(parts).tolist()  # the step's one sync
    count = len(rows)
    alternatives: dict[int, list[tuple[int, float]]] = {}
    if asked:
        ids_at, values_at = 2 * count, 2 * count + len(asked) * top
        for i, (row, k) in enumerate(asked):
            k = min(k, top)
            ids = values[ids_at + i * top : ids_at + i * top + k]
            pairs = zip((int(t) for t in ids), values[values_at + i * top : values_at + i * top + k])
            alternatives[row] = [(t, v) for t, v in pairs if v > -math.inf]  # never what the grammar forbids
    return [
        failed[row] if row in failed else Choice(int(values[row]), values[count + row], alternatives.get(row, []))
        for row in range(count)
    ]


def _choose_isolated(rows: list, special: list[int], logits: list[torch.Tensor], noise: dict, failed: dict):
    """_choose for the special rows together; if that raises, for each alone, so that only a row whose own choice
    fails gets the exception (in failed). Returns the rows chosen and their tokens."""
    try:
        return special, _choose([rows[r] for r in special], logits, noise, special)
    except Exception:  # noqa: BLE001 - whose fault is found by choosing each row alone
        chosen = {}
        for row, own in zip(special, logits, strict=True):
            try:
                chosen[row] = _choose([rows[row]], [own], noise, [row])
            except Exception as exc:  # noqa: BLE001 - this row's choice failed: handed to the caller
                failed[row] = exc
        return list(chosen), torch.cat(list(chosen.values())) if chosen else None


def _choose(seqs: list, logits: list[torch.Tensor], noise: dict[int, torch.Tensor], rows: list[int]) -> torch.Tensor:
    """The tokens of seqs (rows of the batch at `rows`) from their logits ([1, vocab] each, masked where
    constrained), processed as each one's parameters say; [len(seqs)] on the logits' device."""
    raw = torch.cat(logits)  # [n, vocab]
    device, vocab = raw.device, raw.shape[-1]
    params = [seq.chooser.params for seq in seqs]
    scores = raw

    def column(values, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device)[:, None]

    if any(p.logit_bias for p in params):
        at = [(i, token, bias) for i, p in enumerate(params) for token, bias in p.logit_bias.items()]
        index = torch.tensor([(i, token) for i, token, _ in at]).T.to(device)
        scores = scores.index_put((index[0], index[1]), column([b for _, _, b in at])[:, 0], accumulate=True)
    if any(p.repetition_penalty not in (None, 1.0) for p in params):
        # transformers': every token of the prompt and the output, score * penalty where negative, / where not
        penalty = column([p.repetition_penalty or 1.0 for p in params])
        seen = _token_mask([seq.request.prompt_ids + seq.tokens for seq in seqs], vocab, device)
        seen &= column([p.repetition_penalty not in (None, 1.0) for p in params], torch.bool)
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        generated = [(seq.request.prompt_ids + seq.tokens)[seq.chooser.prompt_length :] for seq in seqs]
        counts = _token_counts(generated, vocab, device)
        frequency, presence = (
            column([p.frequency_penalty for p in params]),
            column([p.presence_penalty for p in params]),
        )
        scores = scores - frequency * counts - presence * (counts > 0).to(scores.dtype)
    sampling = [seq.chooser.generator is not None for seq in seqs]
    if any(sampling):
        temperature = [
            p.temperature if s and p.temperature not in (None, 1.0) else None for p, s in zip(params, sampling)
        ]
        if any(t is not None for t in temperature):
            scores = scores / column([1.0 if t is None else t for t in temperature])
        top_k = [min(p.top_k, vocab) if s and p.top_k else 0 for p, s in zip(params, sampling)]
        if any(top_k):
            kth = scores.topk(max(top_k), dim=-1).values.gather(1, column([max(k, 1) - 1 for k in top_k], torch.long))
            kth = torch.where(column([k > 0 for k in top_k], torch.bool), kth, -torch.inf)
            scores = scores.masked_fill(scores < kth, -torch.inf)
        top_p = [p.top_p if s and p.top_p not in (None, 1.0) else None for p, s in zip(params, sampling)]
        if any(p is not None for p in top_p):
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            # 1 - top_p in double, rounded to float32 once, as transformers compares with a Python float
            remove = cumulative <= column([-1.0 if p is None else 1 - p for p in top_p])
            remove[:, -1] = False
            scores = scores.masked_fill(remove.scatter(1, order, remove), -torch.inf)
    if scores is not raw:  # extreme penalties can overflow; keep the order of what is finite, else the raw logits
        processes = column([seq.chooser.processes for seq in seqs], torch.bool)
        cleaned = torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.finfo(scores.dtype).max)
        cleaned = torch.where(cleaned.isfinite().any(dim=-1, keepdim=True), cleaned, raw)
        scores = torch.where(processes, cleaned, scores)
    tokens = scores.argmax(dim=-1)
    drawn = [i for i, row in enumerate(rows) if row in noise]
    if drawn:
        index = torch.tensor(drawn, device=device)
        probs = torch.softmax(scores.index_select(0, index), dim=-1)
        draws = torch.stack([noise[rows[i]] for i in drawn]).to(device)
        # a +max score beside others gives no finite probabilities: all mass on the largest
        sampled = torch.where(
            probs.isfinite().all(dim=-1), (probs / draws).argmax(dim=-1), tokens.index_select(0, index)
        )
        tokens = tokens.index_copy(0, index, sampled)
    return tokens


def _token_mask(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(ids), vocab] bool: True at each row's ids (those below vocab)."""
    width = max(len(row) for row in ids)
    padded = torch.tensor([row + row[:1] * (width - len(row)) for row in ids]).clamp(max=vocab).to(device)
    return torch.zeros(len(ids), vocab + 1, dtype=torch.bool, device=device).scatter_(1, padded, True)[:, :vocab]


def _token_counts(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(ids), vocab] float32: how often each row holds each id."""
    width = max(1, max(len(row) for row in ids))
    padded = torch.tensor([row + [0] * (width - len(row)) for row in ids]).to(device)
    ones = torch.tensor([[1.0] * len(row) + [0.0] * (width - len(row)) for row in ids]).to(device)
    return torch.zeros(len(ids), vocab, device=device).scatter_add_(1, padded, ones)
