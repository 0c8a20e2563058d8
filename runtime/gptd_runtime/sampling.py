"""Per-request token selection for one forward pass of a continuous batch.

transformers' batching samples every row the same way (one engine-wide `do_sample`, one global RNG, only
temperature/top-k/top-p per request). gptd replaces that last step (see `_cb_internals.install_sampler`) with
`sample()` here, which honours each request's own `SamplingParams`:

* `seed`: the request draws its randomness from its own `torch.Generator`, and nothing it draws depends on the
  other rows, so the same seed, prompt and parameters give the same tokens alone or in any batch.
  Sampling is the exponential race (argmax of p / E with E ~ Exp(1)), equivalent to drawing from p and
  vectorisable across rows with different generators.
* `presence_penalty` / `frequency_penalty` (OpenAI's definition): logit[t] -= count[t] * frequency
  + (count[t] > 0) * presence, counting tokens this request generated.
* `response_format`: a grammar (constraints.py) masks tokens the JSON grammar does not allow next.
* `logprobs`: log-softmax after penalties, grammar mask and temperature (temperature 0 reports the
  temperature-1 distribution), before top-p, as OpenAI reports; plus the k most likely alternatives.

Order per row: penalties -> grammar mask -> temperature -> (logprobs) -> top-p -> sample / argmax. Greedy rows
(temperature 0, or top_p 0: a nucleus of the top token alone) take the argmax of the logits before temperature.
A grammar that raises fails its own request only (`RequestSampling.failed`; its row is masked to EOS): an
exception out of `sample()` would stop transformers' batching loop and fail every request in flight.
A batch where every row is plain greedy is one argmax, and plain sampling rows skip every optional step, so a
feature costs nothing to requests that don't use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .constraints import Constraint


@dataclass
class TokenChoice:
    """What the sampler recorded for one generated token of a request that asked for logprobs."""

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class RequestSampling:
    """One request's sampling state, owned by the engine thread while the request runs."""

    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    generator: torch.Generator | None = None
    constraint: Constraint | None = None
    # Appended on the engine thread, read (by index, never beyond the delivered tokens) on the event loop.
    choices: list[TokenChoice] = field(default_factory=list)
    counts: torch.Tensor | None = None  # generated-token counts, only for penalised requests
    # Set on the engine thread when this request's grammar raised: the request must end with this error.
    failed: str | None = None
    failure_reported: bool = False  # the engine has handed `failed` to the request's stream

    @property
    def greedy(self) -> bool:
        """The argmax of the processed logits. top_p 0 is a nucleus of one token: the same argmax, taken here
        rather than from top-p's sort, whose order among tied tokens need not be argmax's (the first index)."""
        return self.temperature <= 0 or self.top_p <= 0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def plain(self) -> bool:
        """Nothing beyond temperature/top-p: the row can take the batch's fast path."""
        return (self.generator is None and self.constraint is None and self.logprobs is None
                and not self.penalised)


def new_request_sampling(
    *, temperature: float, top_p: float, presence_penalty: float, frequency_penalty: float,
    logprobs: int | None, seed: int | None, constraint: Constraint | None, vocab_size: int, device: Any,
) -> RequestSampling:
    import torch

    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    rs = RequestSampling(temperature=temperature, top_p=top_p, presence_penalty=presence_penalty,
                         frequency_penalty=frequency_penalty, logprobs=logprobs, generator=generator,
                         constraint=constraint)
    if rs.penalised:
        rs.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    return rs


_GREEDY_DEFAULT = RequestSampling(temperature=0.0)


def sample(logits: torch.Tensor, rows: list[RequestSampling | None], eos_token_id: int | None = None,
           ) -> torch.Tensor:
    """Next token per row. ``logits``: [rows, vocab] float32 (may be modified in place); ``rows[i]`` the sampling
    state of row i (None: a request the engine does not know, decoded greedily). Returns int64 [rows].
    A row whose grammar raises (now or in an earlier pass) gets ``failed`` set and only ``eos_token_id`` allowed;
    the other rows are sampled as if it were not there."""
    import torch

    states = [r if r is not None else _GREEDY_DEFAULT for r in rows]
    if all(r.greedy and r.plain for r in states):
        return logits.argmax(-1)
    n, vocab = logits.shape
    device = logits.device
    x = logits

    penalised = [i for i, r in enumerate(states) if r.penalised]
    if penalised:
        counts = torch.stack([states[i].counts for i in penalised])  # type: ignore[misc]
        freq = torch.tensor([states[i].frequency_penalty for i in penalised], device=device)[:, None]
        pres = torch.tensor([states[i].presence_penalty for i in penalised], device=device)[:, None]
        idx = torch.tensor(penalised, device=device)
        x[idx] = x[idx] - counts * freq - (counts > 0).float() * pres

    constrained = [i for i, r in enumerate(states) if r.constraint is not None]
    for i in constrained:
        allowed = None
        if states[i].failed is None:
            try:
                allowed = states[i].constraint.allowed(vocab, device)  # type: ignore[union-attr]
            except Exception as e:
                _fail(states[i], "computing the allowed tokens", e)
        if allowed is None:  # failed: end the row (the engine also cancels the request)
            if eos_token_id is None or not 0 <= eos_token_id < vocab:
                continue
            allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
            allowed[eos_token_id] = True
        x[i].masked_fill_(~allowed, float("-inf"))

    # Greedy rows take the argmax before temperature: the same token at any temperature, alone or in any batch
    # (dividing by a temperature may round two nearly tied logits to one value).
    unscaled = x
    temps = [r.temperature if r.temperature > 0 else 1.0 for r in states]
    if any(t != 1.0 for t in temps):
        x = x / torch.tensor(temps, device=device, dtype=x.dtype)[:, None]

    want_logprobs = [i for i, r in enumerate(states) if r.logprobs is not None]
    logp = torch.log_softmax(x[want_logprobs], dim=-1) if want_logprobs else None

    greedy = [r.greedy for r in states]
    if all(greedy):
        tokens = unscaled.argmax(-1)
    else:
        probs = torch.softmax(x, dim=-1)
        nucleus = [i for i, r in enumerate(states) if r.top_p < 1.0 and not r.greedy]
        if nucleus:  # one batched sort for every top-p row
            idx = torch.tensor(nucleus, device=device)
            top_p = torch.tensor([states[i].top_p for i in nucleus], device=device, dtype=probs.dtype)
            probs[idx] = _top_p(probs[idx], top_p)
        noise = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(states) if r.generator is not None and not r.greedy]
        if len(seeded) < n:
            noise.exponential_()
        for i in seeded:
            noise[i].exponential_(generator=states[i].generator)
        sampled = (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)
        if any(greedy):
            sampled = torch.where(torch.tensor(greedy, device=device), unscaled.argmax(-1), sampled)
        tokens = sampled

    if penalised or constrained or want_logprobs:
        _record(states, tokens, logp, want_logprobs, penalised, constrained)
    return tokens


def _fail(state: RequestSampling, what: str, e: Exception) -> None:
    # The request's own error (its client sees it); the exception text comes from the grammar engine, not the prompt.
    state.failed = f"response_format constraint failed while {what}: {type(e).__name__}: {e}"


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, zero the tail outside the smallest set of tokens whose probability reaches top_p (the top token
    always stays). probs: [rows, vocab]; top_p: [rows]."""
    import torch

    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
    drop = before >= top_p[:, None]
    drop[:, 0] = False
    return probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))


def _record(states: list[RequestSampling], tokens: torch.Tensor, logp: torch.Tensor | None,
            want_logprobs: list[int], penalised: list[int], constrained: list[int]) -> None:
    """After the choice: count it for penalties, advance the grammar, keep the logprobs."""
    import torch

    chosen = tokens.tolist()
    for i in penalised:
        states[i].counts[chosen[i]] += 1  # type: ignore[index]
    for i in constrained:
        if states[i].failed is None:
            try:
                states[i].constraint.advance(chosen[i])  # type: ignore[union-attr]
            except Exception as e:
                _fail(states[i], "advancing past the chosen token", e)
    if logp is None:
        return
    k = max(states[i].logprobs or 0 for i in want_logprobs)
    rows = torch.tensor([chosen[i] for i in want_logprobs], device=logp.device)
    own = logp.gather(1, rows[:, None])[:, 0].tolist()
    top_v, top_i = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(want_logprobs):
        ki = states[i].logprobs or 0
        # Tokens a grammar forbids have logprob -inf: they are not alternatives (and JSON has no -inf).
        top = [(t, v) for t, v in zip(top_i[j][:ki], top_v[j][:ki], strict=True) if v != float("-inf")]
        states[i].choices.append(TokenChoice(chosen[i], own[j], [t for t, _ in top], [v for _, v in top]))
