"""Text that needs no download: English documentation shipped with CPython (``pydoc_data.topics``)."""

from __future__ import annotations

from pathlib import Path

from frugallm.errors import FrugalError


def builtin_corpus() -> str:
    """All pydoc topics, sorted by name, joined by blank lines (~1 MB of English technical prose)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        raise FrugalError("this Python has no pydoc_data; pass a text file with --corpus") from None
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def load_corpus(path: str | Path | None = None) -> str:
    """``path`` to a UTF-8 text file, or the built-in corpus when None / "builtin"."""
    if path is None or str(path) == "builtin":
        return builtin_corpus()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FrugalError(f"cannot read corpus {p}: {e}") from None
    if not text.strip():
        raise FrugalError(f"corpus {p} is empty")
    return text
