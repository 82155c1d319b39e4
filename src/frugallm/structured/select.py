"""Which grammar backend serves a tokenizer: built once per tokenizer and logits width, then shared."""

from __future__ import annotations

import threading
import weakref

from frugallm.errors import FrugalError
from frugallm.structured.backend import BACKENDS, GrammarBackend
from frugallm.tokenizer.tokenizer import Tokenizer

_cache: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[str, int], GrammarBackend]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def backend_for(tokenizer: Tokenizer, vocab_size: int, name: str = "llguidance") -> GrammarBackend:
    """The backend for a tokenizer and a ``vocab_size``-wide logits row, built once per tokenizer (building
    reads the whole vocabulary: ~0.5 s for 49k tokens)."""
    with _lock:
        per_tok = _cache.setdefault(tokenizer, {})
        if (name, vocab_size) not in per_tok:
            try:
                from frugallm.structured import llguidance_backend  # noqa: F401  (registers it)

                per_tok[(name, vocab_size)] = BACKENDS.get(name)(tokenizer, vocab_size)
            except ImportError as e:
                raise FrugalError(f"structured output needs the {name!r} package ({e}); "
                                  "pip install 'frugallm[serve]'") from None
        return per_tok[(name, vocab_size)]


