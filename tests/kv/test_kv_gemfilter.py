"""GemFilter's filter pass: it stops inside the filter layer and scores with the last window's queries."""

from __future__ import annotations

import math

import pytest
import torch

from frugallm.kv import select_prompt_tokens
from frugallm.model.kv_cache import ContiguousKVCache
from frugallm.model.llama import Transformer
from kv_inputs import make_model


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model(std=0.2, num_layers=4)


def test_filter_pass_runs_only_up_to_the_filter_layers_keys(model):
    calls: list[str] = []
    hooks = [mod.register_forward_hook(lambda *_, name=name: calls.append(name))
             for i, block in enumerate(model.layers)
             for name, mod in ((f"qkv{i}", block.attn.qkv_proj), (f"o{i}", block.attn.o_proj), (f"mlp{i}", block.mlp))]
    try:
        select_prompt_tokens("gemfilter:budget=0.25,layer=1", model, list(range(3, 67)))
    finally:
        for h in hooks:
            h.remove()
    # Layer 0 runs whole; layer 1 only projects q/k/v (its attention output and MLP are never needed).
    assert calls == ["qkv0", "o0", "mlp0", "qkv1"]


class _Recorder(ContiguousKVCache):
    def __init__(self, model: Transformer, n: int, layer: int) -> None:
        cfg = model.config
        super().__init__(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, n, torch.float32, "cpu")
        self.layer, self.qk = layer, None

    def update(self, layer, k, v, *, q=None, x=None, positions=None):  # noqa: ANN001, ANN201
        if layer == self.layer:
            self.qk = (q.float(), k.float())
        return super().update(layer, k, v, q=q, x=x, positions=positions)


@pytest.mark.parametrize("window", [1, 4])
def test_selection_is_the_top_attention_of_the_last_window_queries(model, window):
    ids = [int(i) for i in torch.randint(3, 97, (80,), generator=torch.Generator().manual_seed(1))]
    n, layer, keep = len(ids), 2, 20
    rec = _Recorder(model, n, layer)
    with torch.inference_mode():
        model(torch.tensor([ids]), torch.arange(n)[None], rec, "last")
    q, k = rec.qk  # [1, 4, T, 16], [1, 2, T, 16]
    k = k.repeat_interleave(2, dim=1)  # each KV head serves two query heads
    logits = q[0, :, n - window:] @ k[0].transpose(-1, -2) / math.sqrt(16)  # [heads, window, T]
    causal = torch.arange(n)[None, :] <= torch.arange(n - window, n)[:, None]
    scores = logits.masked_fill(~causal, float("-inf")).softmax(-1).sum((0, 1))
    scores[n - window:] = float("inf")
    expected = [ids[i] for i in scores.topk(keep).indices.sort().values.tolist()]
    got = select_prompt_tokens(f"gemfilter:budget=0.25,layer={layer},window={window}", model, ids)
    assert got == expected and got[-window:] == ids[-window:]


def test_runs_on_a_gguf_run_as_stored(tiny_models):
    from frugallm import LLM, SamplingParams

    llm = LLM(str(tiny_models.gguf("llama", "Q8_0")), kv="gemfilter:budget=0.5")
    assert llm.weights == "stored"  # its embedding is quantized blocks, without a .weight
    out = llm.generate(list(range(3, 40)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
