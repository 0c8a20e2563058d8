"""sampling.sample() as a pure function: per-row seeds independent of the rest of the batch, top-p, greedy rows."""

from __future__ import annotations

import torch
from gptd_runtime.sampling import RequestSampling, new_request_sampling, sample


def _rs(seed: int | None = None, temperature: float = 1.0, top_p: float = 1.0, logprobs: int | None = None,
        ) -> RequestSampling:
    return new_request_sampling(temperature=temperature, top_p=top_p, presence_penalty=0.0, frequency_penalty=0.0,
                                logprobs=logprobs, seed=seed, constraint=None, vocab_size=50, device="cpu")


def test_seeded_row_ignores_its_neighbours() -> None:
    torch.manual_seed(0)
    row = torch.randn(50)
    alone_rs, batched_rs = _rs(seed=42), _rs(seed=42)
    alone = [int(sample(row[None].clone(), [alone_rs])[0]) for _ in range(20)]
    batched = []
    for step in range(20):  # different neighbours, different positions, every step
        others = torch.randn(step % 3 + 1, 50)
        rows = [_rs(), _rs(temperature=0.0), _rs(seed=step)][: others.shape[0]]
        pos = step % (others.shape[0] + 1)
        logits = torch.cat([others[:pos], row[None], others[pos:]]).clone()
        batched.append(int(sample(logits, [*rows[:pos], batched_rs, *rows[pos:]])[pos]))
    assert batched == alone
    assert len(set(alone)) > 3  # really sampled


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    seen = {int(sample(logits[None].clone(), [_rs(seed=s, top_p=0.8)])[0]) for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8: the tail is never drawn
    seen = {int(sample(logits[None].clone(), [_rs(seed=s, top_p=0.81)])[0]) for s in range(400)}
    assert seen == {0, 1, 2}


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    draws = torch.tensor([int(sample(probs.log()[None].clone(), [_rs(seed=s)])[0]) for s in range(3000)])
    freq = torch.bincount(draws, minlength=3).float() / 3000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_greedy_and_unknown_rows_take_the_argmax() -> None:
    logits = torch.randn(3, 50)
    want = logits.argmax(-1)
    got = sample(logits.clone(), [_rs(temperature=0.0), None, _rs(temperature=0.0, logprobs=2)])
    assert got.tolist() == want.tolist()


def test_top_p_per_row_in_one_batch() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    seen: list[set[int]] = [set(), set()]
    for s in range(300):
        rows = [_rs(seed=s, top_p=0.8), _rs(seed=s, top_p=0.81)]
        got = sample(torch.stack([logits, logits]).clone(), rows).tolist()
        seen[0].add(got[0])
        seen[1].add(got[1])
    assert seen == [{0, 1}, {0, 1, 2}]


def test_top_p_zero_is_the_argmax_at_any_temperature() -> None:
    """top_p 0 keeps only the most likely token: exactly the greedy choice, ties included (argmax takes the first
    index; a descending sort may put the other tied token first), whatever the seed, temperature or neighbours."""
    torch.manual_seed(1)
    logits = torch.randn(4, 1000)
    logits[:, 7] = logits[:, 993] = float(logits.max()) + 1.0
    want = logits.argmax(-1).tolist()
    assert want == [7] * 4
    for s in range(20):
        rows = [_rs(seed=s, top_p=0.0), _rs(top_p=0.0, temperature=1.7), _rs(seed=s, top_p=0.0, temperature=0.3,
                                                                            logprobs=2), _rs(seed=s, top_p=0.9)]
        got = sample(logits.clone(), rows).tolist()
        assert got[:3] == want[:3], s
        assert sample(logits[:1].clone(), [_rs(seed=s, top_p=0.0, temperature=0.6)]).tolist() == want[:1]
    # Two logits one float32 step apart that dividing by 0.3 rounds to one value: the argmax is still the larger.
    near = torch.zeros(2, 1000)
    near[:, 7], near[:, 993] = 10.000001907348633, 10.00000286102295
    assert (near[0, 7] / 0.3) == (near[0, 993] / 0.3) and near[0].argmax() == 993
    # Plain rows (argmax fast path), an all-greedy batch that is not plain (seeded: the greedy branch), a mix.
    for rows in ([_rs(top_p=0.0, temperature=0.3)] * 2, [_rs(seed=1, top_p=0.0, temperature=0.3)] * 2,
                 [_rs(top_p=0.0, temperature=0.3), _rs(seed=1)]):
        assert sample(near.clone(), rows).tolist()[0] == 993


def test_grammar_mask_and_its_end(models: dict) -> None:  # type: ignore[type-arg]
    from gptd_runtime.constraints import Grammars
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["plain"])
    grammars = Grammars(tok, len(tok))
    c = grammars.compile("json_schema", {"enum": ["yes"]})
    allowed = c.allowed(len(tok), "cpu")
    assert 0 < int(allowed.sum()) < len(tok) and not allowed[tok.eos_token_id]  # JSON first, EOS not yet
    for t in tok('"yes"').input_ids:
        assert c.allowed(len(tok), "cpu")[t]
        c.advance(t)
    done = c.allowed(len(tok), "cpu")
    assert done[tok.eos_token_id] and int(done.sum()) == 1  # complete: only EOS
    c.advance(tok("x").input_ids[0])  # a token the grammar forbids: the matcher is now in its error state
    assert c.error
    after = c.allowed(len(tok), "cpu")  # nothing is allowed any more, so EOS ends the request
    assert after[tok.eos_token_id] and int(after.sum()) == 1
