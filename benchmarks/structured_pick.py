"""Pick the constrained-decoding library: xgrammar vs llguidance on the default model's vocabulary.

Measures, in one run: the tokenizer setup, compiling each schema of ``structured_schemas.SCHEMAS`` (first use:
nothing cached), and the per-step token-mask time while feeding a valid instance's tokens (a generation's
steps). Prints medians, the CPU and the load average.

    .venv/bin/python benchmarks/structured_pick.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))

from frugallm.cpu import model_name  # noqa: E402
from frugallm.loading import describe  # noqa: E402
from structured_schemas import SCHEMAS  # noqa: E402


def ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1e3:.3f} ms, max {max(xs) * 1e3:.3f} ms"


def main() -> None:
    tok = describe("default").tokenizer()
    vocab = tok.vocab_size
    print(f"# CPU: {model_name()}; load average {os.getloadavg()}; vocab {vocab}; {len(SCHEMAS)} schemas")
    instances = [(schema, tok.encode(json.dumps(example))) for schema, example in SCHEMAS]
    stop = sorted(tok.eos_ids)

    # -- llguidance
    import llguidance
    import llguidance.torch as lgt

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokenizer.json"
        path.write_text(tok._tok.to_str())
        ll_tok = llguidance.LLTokenizer(str(path), n_vocab=vocab, eos_token=stop)
    print(f"llguidance  tokenizer setup {time.perf_counter() - t:.3f} s")
    compile_s, step_s = [], []
    mask = lgt.allocate_token_bitmask(1, vocab)
    for schema, ids in instances:
        t = time.perf_counter()
        m = llguidance.LLMatcher(ll_tok, llguidance.LLMatcher.grammar_from_json_schema(schema))
        compile_s.append(time.perf_counter() - t)
        assert not m.is_error(), m.get_error()
        for i in ids:
            t = time.perf_counter()
            lgt.fill_next_token_bitmask(m, mask, 0)
            step_s.append(time.perf_counter() - t)
            assert m.consume_token(i), m.get_error()
    print(f"llguidance  compile: {ms(compile_s)}; mask per step: {ms(step_s)} ({len(step_s)} steps); "
          f"all masks + compiles {(sum(compile_s) + sum(step_s)) * 1e3:.1f} ms")

    # -- xgrammar
    import xgrammar

    t = time.perf_counter()
    encoded = [tok._tok.id_to_token(i) or "" for i in range(vocab)]
    info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=stop)
    compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    print(f"xgrammar    tokenizer setup {time.perf_counter() - t:.3f} s")
    compile_s, step_s = [], []
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    for schema, ids in instances:
        t = time.perf_counter()
        cg = compiler.compile_json_schema(json.dumps(schema), strict_mode=True)
        compile_s.append(time.perf_counter() - t)
        m = xgrammar.GrammarMatcher(cg)
        for i in ids:
            t = time.perf_counter()
            m.fill_next_token_bitmask(mask, 0)
            step_s.append(time.perf_counter() - t)
            assert m.accept_token(i)
    print(f"xgrammar    compile: {ms(compile_s)}; mask per step: {ms(step_s)} ({len(step_s)} steps); "
          f"all masks + compiles {(sum(compile_s) + sum(step_s)) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
