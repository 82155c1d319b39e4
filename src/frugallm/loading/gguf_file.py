"""An opened GGUF v3 file: the header checked before anything reads the rest, metadata fields, the model config and
the tokenizer metadata; tensors stay in the file's memmap until a loader (``gguf.py``, ``gguf_stored.py``) asks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from frugallm.config import SUPPORTED_ARCHS, ModelConfig, RopeScaling, as_int
from frugallm.errors import ModelLoadError
from frugallm.loading import gguf_index
from frugallm.tokenizer.tokenizer import TokenizerMeta

_GGUF_MAGIC = b"GGUF"


def check_file(path: Path) -> None:
    """A regular file that starts with the GGUF magic, checked before anything reads (or hashes) the rest:
    a device (``/dev/zero``) or a FIFO would never end, a large file of another kind would be hashed whole."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError:
        raise ModelLoadError(f"model file not found: {path}") from None
    if not stat.S_ISREG(mode):
        raise ModelLoadError(f"{path} is not a regular file; pass a .gguf file or a model folder")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic {magic!r}, expected b'GGUF')")


def _open_reader(path: Path) -> Any:
    from gguf import GGUFReader

    check_file(path)
    size = path.stat().st_size
    indexed = gguf_index.cached(path)  # parsed and validated before, and unchanged since
    if indexed is not None:
        return indexed
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on corrupt headers
        name = _failing_tensor(e)
        where = f"tensor {name!r}: " if name else "corrupt or truncated GGUF header "
        raise ModelLoadError(f"{path}: {where}({type(e).__name__}: {e})") from None
    # Each tensor's bytes (from its type and shape) must fit before the next tensor starts: a header whose
    # shape or type disagrees with the bytes written would otherwise feed a neighbour's bytes to a kernel.
    by_offset = sorted(reader.tensors, key=lambda t: int(t.data_offset))
    for t, nxt in zip(by_offset, [*by_offset[1:], None], strict=True):
        end = int(t.data_offset) + int(t.n_bytes)
        limit = size if nxt is None else int(nxt.data_offset)
        if end > limit:
            what = "the file has" if nxt is None else f"tensor {nxt.name!r} starts at"
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} ({t.tensor_type.name}, shape {[int(d) for d in t.shape]}) needs bytes "
                f"up to offset {end} but {what} {limit} (its bytes do not match its type and shape, or the "
                "file is truncated)"
            )
    gguf_index.remember(path, reader)
    return reader


def _failing_tensor(e: BaseException) -> str | None:
    """The tensor ``GGUFReader`` was building when it raised (its row size does not fit its type's blocks):
    gguf's message does not name it, the reader's frame does."""
    tb, name = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_build_tensors":
            name = tb.tb_frame.f_locals.get("tensor_name")
        tb = tb.tb_next
    return name


class GGUFModelFile:
    """An opened GGUF file (memory-mapped; nothing is read until asked)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.reader = _open_reader(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise ModelLoadError(f"{self.path}: cannot read metadata {key!r}: {e}") from None

    @property
    def arch(self) -> str:
        arch = self.field("general.architecture")
        if arch is None:
            raise ModelLoadError(f"{self.path}: GGUF has no general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"{self.path}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        return arch

    def config(self) -> ModelConfig:
        try:
            return self._config()
        except (TypeError, ValueError) as e:  # ModelLoadError too: name the file; sizes are checked before any build
            if isinstance(e, ModelLoadError) and str(e).startswith(str(self.path)):
                raise
            raise ModelLoadError(f"{self.path}: invalid metadata: {e}") from None

    def _config(self) -> ModelConfig:
        a = self.arch

        def req(key: str) -> Any:
            v = self.field(f"{a}.{key}")
            if v is None:
                raise ModelLoadError(f"{self.path}: missing GGUF metadata {a}.{key}")
            return v

        def num(key: str, default: Any = None) -> int:
            v = req(key) if default is None else self.field(f"{a}.{key}", default)
            return as_int(v, f"{a}.{key}")

        hidden, heads = num("embedding_length"), num("attention.head_count")
        kv_heads = self.field(f"{a}.attention.head_count_kv", heads)
        if isinstance(kv_heads, list) and kv_heads:  # per-layer lists exist in some files; all equal here
            kv_heads = kv_heads[0]
        head_dim = num("attention.key_length", hidden // heads if heads > 0 else 0)
        vocab = self.field(f"{a}.vocab_size")
        if vocab is None:
            emb = self.tensors.get("token_embd.weight")
            if emb is None:
                raise ModelLoadError(f"{self.path}: no token_embd.weight tensor")
            vocab = int(emb.shape[1])
        scaling = None
        if self.field(f"{a}.rope.scaling.type") == "linear":
            scaling = RopeScaling(rope_type="linear", factor=float(self.field(f"{a}.rope.scaling.factor", 1.0)))
        return ModelConfig(
            arch=a,
            vocab_size=as_int(vocab, f"{a}.vocab_size"),
            hidden_size=hidden,
            intermediate_size=num("feed_forward_length"),
            num_layers=num("block_count"),
            num_heads=heads,
            num_kv_heads=as_int(kv_heads, f"{a}.attention.head_count_kv"),
            head_dim=head_dim,
            max_position_embeddings=num("context_length", 2048),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in self.tensors,
            attention_bias="blk.0.attn_q.bias" in self.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in self.tensors,
            name=str(self.field("general.name", "")),
        )

    def tensor(self, name: str) -> np.ndarray:
        """Dequantize one tensor to float32, numpy shape ``[rows, cols]`` (torch Linear layout)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: missing tensor {name!r}")
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        try:
            if t.tensor_type == GGMLQuantizationType.F32:
                arr = np.array(t.data, dtype=np.float32)  # copy: the memmap is read-only
            else:
                arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        return np.asarray(arr, dtype=np.float32).reshape(shape)

    def tensor_type_bytes(self) -> dict[str, int]:
        """Bytes per GGML tensor type (for ``frugallm info``)."""
        out: dict[str, int] = {}
        for t in self.reader.tensors:
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + int(t.n_bytes)
        return out

    def tokenizer_meta(self) -> TokenizerMeta:
        def opt_int(key: str) -> int | None:
            v = self.field(key)
            return None if v is None else int(v)

        tokens = self.field("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(f"{self.path}: GGUF has no tokenizer (tokenizer.ggml.tokens)")
        return TokenizerMeta(
            model=str(self.field("tokenizer.ggml.model", "gpt2")),
            pre=str(self.field("tokenizer.ggml.pre", "default")),
            tokens=list(tokens),
            token_types=list(self.field("tokenizer.ggml.token_type", [1] * len(tokens))),
            merges=list(self.field("tokenizer.ggml.merges", [])),
            scores=list(self.field("tokenizer.ggml.scores", [])),
            bos_id=opt_int("tokenizer.ggml.bos_token_id"),
            eos_id=opt_int("tokenizer.ggml.eos_token_id"),
            eot_id=opt_int("tokenizer.ggml.eot_token_id"),
            pad_id=opt_int("tokenizer.ggml.padding_token_id"),
            unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
            add_bos=bool(self.field("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(self.field("tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=bool(self.field("tokenizer.ggml.add_space_prefix", True)),
            chat_template=self.field("tokenizer.chat_template"),
        )
