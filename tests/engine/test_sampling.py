"""Each sampling parameter against a reference computation on the same logits."""

import math

import pytest
import torch

from herd.engine.sampling import SampleRow, SamplingParams, _filtered_probs, apply_penalties, sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, -0.5, -1.0, 3.0, 0.0, -2.0])


def _row(prompt=(), output=(), **params):
    return SampleRow(SamplingParams(**params), list(prompt), list(output))


def _empirical(params: SamplingParams, draws: int = 3000) -> torch.Tensor:
    counts = torch.zeros(len(LOGITS))
    for i in range(draws):
        p = SamplingParams(**{**params.__dict__, "seed": i})
        counts[sample(LOGITS[None].clone(), [SampleRow(p, [], [])])[0].token_id] += 1
    return counts / draws


def test_temperature_distribution_matches_softmax():
    expected = torch.softmax(LOGITS / 0.7, -1)
    assert torch.allclose(_filtered_probs(LOGITS.clone(), SamplingParams(temperature=0.7)), expected)
    observed = _empirical(SamplingParams(temperature=0.7))
    assert (observed - expected).abs().max() < 0.04  # ~4 sigma at 3000 draws


def test_greedy_is_argmax():
    assert sample(LOGITS[None].clone(), [_row(temperature=0)])[0].token_id == 5


def test_top_k():
    probs = _filtered_probs(LOGITS.clone(), SamplingParams(top_k=3))
    keep = torch.softmax(LOGITS, -1) * torch.tensor([1, 1, 0, 0, 0, 1, 0, 0.0])
    assert torch.allclose(probs, keep / keep.sum())


def test_top_p():
    full = torch.softmax(LOGITS, -1)
    order = torch.argsort(full, descending=True)
    # Smallest set whose mass reaches 0.8, computed by hand.
    mass, kept = 0.0, []
    for t in order.tolist():
        kept.append(t)
        mass += full[t].item()
        if mass >= 0.8:
            break
    mask = torch.zeros_like(full)
    mask[kept] = 1
    assert torch.allclose(_filtered_probs(LOGITS.clone(), SamplingParams(top_p=0.8)), full * mask / (full * mask).sum())


def test_min_p():
    full = torch.softmax(LOGITS, -1)
    mask = (full >= 0.2 * full.max()).float()
    assert torch.allclose(_filtered_probs(LOGITS.clone(), SamplingParams(min_p=0.2)), full * mask / (full * mask).sum())


def test_repetition_penalty_is_multiplicative_over_prompt_and_output():
    out = apply_penalties(LOGITS.clone(), _row(prompt=[0], output=[4], repetition_penalty=2.0))
    expected = LOGITS.clone()
    expected[0] = LOGITS[0] / 2.0  # positive logit: divided
    expected[4] = LOGITS[4] * 2.0  # negative logit: multiplied
    assert torch.equal(out, expected)


def test_presence_and_frequency_penalties_are_additive_over_output():
    out = apply_penalties(
        LOGITS.clone(), _row(prompt=[1], output=[0, 0, 3], presence_penalty=0.5, frequency_penalty=0.25)
    )
    expected = LOGITS.clone()
    expected[0] -= 0.5 + 2 * 0.25
    expected[3] -= 0.5 + 1 * 0.25
    assert torch.equal(out, expected)  # the prompt token 1 is untouched


def test_logit_bias():
    out = apply_penalties(LOGITS.clone(), _row(logit_bias={2: 10.0, 5: -100.0}))
    assert out[2] == LOGITS[2] + 10 and out[5] == LOGITS[5] - 100
    assert sample(LOGITS[None].clone(), [_row(temperature=0, logit_bias={7: 50})])[0].token_id == 7


def test_logprobs_are_raw_model_logprobs_with_sampled_included():
    result = sample(LOGITS[None].clone(), [_row(temperature=0, logit_bias={7: 50}, logprobs=2)])[0]
    reference = torch.log_softmax(LOGITS, -1)
    assert result.token_id == 7
    assert set(result.top_logprobs) == {5, 0, 7}
    for token, lp in result.top_logprobs.items():
        assert math.isclose(lp, reference[token].item(), rel_tol=1e-6)


def test_rows_use_their_own_parameters():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    out = sample(logits.clone(), [_row(temperature=0), _row(temperature=0, logit_bias={1: 100})])
    assert [o.token_id for o in out] == [5, 1]


def test_seed_depends_on_position_not_history():
    p = SamplingParams(temperature=1.0, seed=7)
    a = sample(LOGITS[None].clone(), [SampleRow(p, [], [1, 2, 3])])[0].token_id
    b = sample(LOGITS[None].clone(), [SampleRow(p, [9], [4, 5, 6])])[0].token_id
    assert a == b  # same seed, same output position, same logits


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=2),
        dict(repetition_penalty=0),
        dict(presence_penalty=3),
        dict(frequency_penalty=-3),
        dict(logprobs=21),
        dict(n=0),
        dict(max_tokens=0),
    ],
)
def test_out_of_range_values_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 1024, 1500, 49152, 50001])
def test_argmax_rows_is_torch_argmax_with_first_index_on_ties(dtype, vocab):
    from herd.engine.sampling import argmax_rows

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g).to(dtype)
    logits[1, :] = 0.0  # all tied: the first column
    logits[2, [3, vocab // 2, vocab - 1]] = 50.0  # ties across blocks
    logits[3, vocab - 1] = 50.0  # the max in the short last block
    logits[4, :] = float("-inf")
    logits[4, vocab // 3] = -1.0
    assert argmax_rows(logits).tolist() == torch.argmax(logits, dim=-1).tolist()
