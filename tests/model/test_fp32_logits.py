"""Generation-path logits are fp32: a half-precision head ties near-equal logits and greedy took the lower id."""

from __future__ import annotations

import pytest
import torch

from frugallm import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [5, 9, 12]


def _logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return llm.model(torch.tensor([ids]), torch.arange(len(ids))[None], llm.make_cache(1, len(ids)))[0]


def _make_tie(llm: LLM, ids: list[int]) -> tuple[int, int]:
    """Give two head rows ``a < b`` equal logits for ``ids`` in the weights' half dtype, ``b`` higher in fp32:
    the rows differ by one weight ulp in the channel where the final hidden state is largest."""
    model, dt = llm.model, llm.dtype
    seen: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].float()))
    _logits(llm, ids)
    hook.remove()
    h = seen[-1].reshape(-1)
    w = model.lm_head.weight.detach().clone() * 0.01  # every other logit small
    a, b, j = 3, 7, int(h.abs().argmax())
    row = (8 * h / h.norm() ** 2).to(dt)  # logit ~8, where a half output's rounding step is 1/16 or 1/128
    w[a] = w[b] = row
    # One ulp away from zero in channel j; raising |w[b, j]| raises b's logit iff w[b, j] and h[j] agree in sign.
    up = (row[j].float() * (1 + torch.finfo(dt).eps)).to(dt)
    down = (row[j].float() * (1 - torch.finfo(dt).eps / 2)).to(dt)
    w[b, j] = up if bool(torch.sign(h[j]) == torch.sign(row[j].float())) else down
    model.lm_head.weight = torch.nn.Parameter(w, requires_grad=False)  # untied, repacked at the next call
    model._plan = None
    return a, b


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_greedy_takes_the_fp32_argmax_of_a_half_tie(tiny_models, dtype) -> None:
    llm = LLM(str(tiny_models.hf("llama")), dtype=dtype, device="cpu")
    a, b = _make_tie(llm, PROMPT)
    greedy = SamplingParams(max_tokens=1, temperature=0)
    llm.model.fp32_logits = False  # the previous head: half output
    old = _logits(llm, PROMPT)
    assert old[a] == old[b] == old.max()  # the tie
    assert llm.generate([PROMPT], greedy)[0].token_ids == [a]  # the lower id won
    llm.model.fp32_logits = True
    new = _logits(llm, PROMPT)
    assert new.dtype == torch.float32 and new[b] > new[a] and int(new.argmax()) == b
    assert llm.generate([PROMPT], greedy)[0].token_ids == [b]
    assert int(llm.score(PROMPT)[-1].argmax()) == b  # what quality measures agrees
    # Logits outside the refined candidates keep the half head's values (at most one half rounding step off).
    torch.testing.assert_close(new, old.float(), atol=float(old.abs().max()) * torch.finfo(llm.dtype).eps, rtol=0)


@pytest.mark.parametrize("rows", [1, 8, 70])  # decode, a batching engine's rows, a scored window (weight cast)
def test_logits_match_an_fp32_head(tiny_models, rows) -> None:
    llm = LLM(str(tiny_models.hf("llama")), dtype="bfloat16", device="cpu")
    model = llm.model
    x = torch.randn(rows, llm.config.hidden_size, generator=torch.Generator().manual_seed(rows)).bfloat16()
    with torch.inference_mode():
        got = model.logits(x)
        h = model.norm(x.float())
        want = h @ model.lm_head.weight.float().T
    assert got.dtype == torch.float32
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    top = want.argmax(-1, keepdim=True)
    torch.testing.assert_close(got.gather(1, top), want.gather(1, top), rtol=1e-5, atol=1e-5)  # the max is exact
    step = float(want.abs().max()) * torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(got, want, rtol=0, atol=step)  # the rest within one bf16 step (exact at 70 rows)
