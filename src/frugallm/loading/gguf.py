"""GGUF v3 files: model config, weights in the Hugging Face layout, tokenizer metadata.

Two ways to load the weights (``loading.choose_weights`` picks one):

* ``"stored"`` (the CPU default for ``dtype="auto"``): every 2-D weight of a type ``csrc/gguf_linear.cpp``
  runs (:data:`NATIVE_TYPES`) becomes a :class:`GGUFLinear` over zero-copy views of the file's memmap (fused
  qkv / gate_up as row segments, llama Q/K rows un-permuted), the token embedding a :class:`QuantEmbedding`
  on the same blocks (a tied head is that very table). Only the rest (norms, biases, types the kernel lacks)
  is dequantized to fp32, one tensor at a time. Pages of the file come in as they are touched; nothing is
  cached. :func:`tensor_plan` says which tensor goes which way (``frugallm info`` shows it).
* ``"dequantize"``: every tensor type ``gguf.quants.dequantize`` knows (F32, F16, BF16, Q4_0 ... Q8_0,
  K-quants, IQ-quants) is converted to the engine's dtype, one at a time (:func:`iter_gguf_state_dict`;
  the whole fp32 state dict never exists), and the result goes to the weights cache (``weight_cache.py``)
  so later loads skip conversion.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frugallm.config import SUPPORTED_ARCHS, ModelConfig, RopeScaling, as_int
from frugallm.errors import ModelLoadError
from frugallm.loading import gguf_index, weight_cache
from frugallm.loading.base import LoadedModel, ModelDescription, check_vocab, materialize
from frugallm.quant.gguf_linear import NATIVE_TYPES
from frugallm.tokenizer.tokenizer import Tokenizer, TokenizerMeta

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


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its converter interleaves rotary pairs per head)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permutes(cfg: ModelConfig) -> bool:
    return cfg.arch in ("llama", "mistral")  # qwen2/qwen3 GGUFs keep the HF (NeoX) layout


def linear_parts(cfg: ModelConfig) -> list[tuple[str, list[tuple[str, int | None]]]]:
    """Each linear of the model: ``(module path, [(GGUF tensor stem, heads to un-permute or None), ...])``,
    parts fused along the output dim in this order (the stem + ``.weight`` / ``.bias`` is the tensor)."""
    nq, nkv = (cfg.num_heads, cfg.num_kv_heads) if permutes(cfg) else (None, None)
    out: list[tuple[str, list[tuple[str, int | None]]]] = []
    for i in range(cfg.num_layers):
        p, o = f"blk.{i}.", f"layers.{i}."
        out += [
            (o + "attn.qkv_proj", [(p + "attn_q", nq), (p + "attn_k", nkv), (p + "attn_v", None)]),
            (o + "attn.o_proj", [(p + "attn_output", None)]),
            (o + "mlp.gate_up_proj", [(p + "ffn_gate", None), (p + "ffn_up", None)]),
            (o + "mlp.down_proj", [(p + "ffn_down", None)]),
        ]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head", [("output", None)]))
    return out


def tensor_plan(gf: GGUFModelFile, cfg: ModelConfig) -> dict[str, str]:
    """How an as-stored load runs each GGUF tensor: ``"stored"``, or ``"dequantized: <why>"`` (fp32 at load)."""
    plan: dict[str, str] = {}
    for name, t in gf.tensors.items():
        if len(t.shape) != 2 or name == "rope_freqs.weight":
            plan[name] = "dequantized: 1-D (norm, bias or rope factors)"
        elif t.tensor_type not in NATIVE_TYPES:
            plan[name] = f"dequantized: no as-stored kernel for {t.tensor_type.name}"
        else:
            plan[name] = "stored"
    for _, parts in linear_parts(cfg):  # one fused linear is stored whole or dequantized whole
        names = [stem + ".weight" for stem, _ in parts]
        odd = [n for n in names if plan.get(n, "stored") != "stored"]
        for n in names:
            if odd and plan.get(n) == "stored":
                plan[n] = f"dequantized: fused with {odd[0]} ({gf.tensors[odd[0]].tensor_type.name})"
    return plan


def plan_summary(gf: GGUFModelFile, plan: dict[str, str]) -> dict[str, dict[str, int]]:
    """``{"stored": {type: bytes}, "dequantized": {reason: tensors}}`` of a :func:`tensor_plan`."""
    stored: dict[str, int] = {}
    dequantized: dict[str, int] = {}
    for name, how in plan.items():
        t = gf.tensors[name]
        if how == "stored":
            stored[t.tensor_type.name] = stored.get(t.tensor_type.name, 0) + int(t.n_bytes)
        else:
            why = how.removeprefix("dequantized: ")
            dequantized[why] = dequantized.get(why, 0) + 1
    return {"stored": stored, "dequantized": dequantized}


def iter_gguf_state_dict(
    gf: GGUFModelFile, cfg: ModelConfig, dtype: torch.dtype, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` pairs in frugallm's parameter names, fused and in HF layout; names under a
    module path in ``skip`` (modules the as-stored load installs) are not read."""
    permute = permutes(cfg)

    def get(name: str, n_head: int | None = None) -> np.ndarray:
        arr = gf.tensor(name)
        return _unpermute(arr, n_head) if (permute and n_head) else arr

    def t(arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)

    def wanted(name: str) -> bool:
        return name.rsplit(".", 1)[0] not in skip

    if wanted("embed_tokens.weight"):
        yield "embed_tokens.weight", t(gf.tensor("token_embd.weight"))
    for i in range(cfg.num_layers):
        p, o = f"blk.{i}.", f"layers.{i}."
        yield o + "input_norm.weight", t(gf.tensor(p + "attn_norm.weight"))
        yield o + "post_attn_norm.weight", t(gf.tensor(p + "ffn_norm.weight"))
        if wanted(o + "attn.qkv_proj.weight"):
            qkv = [
                get(p + "attn_q.weight", cfg.num_heads),
                get(p + "attn_k.weight", cfg.num_kv_heads),
                get(p + "attn_v.weight"),
            ]
            yield o + "attn.qkv_proj.weight", t(np.concatenate(qkv, axis=0))
            if cfg.attention_bias:
                yield o + "attn.qkv_proj.bias", t(qkv_bias(gf, cfg, i))
        if cfg.qk_norm:
            yield o + "attn.q_norm.weight", t(gf.tensor(p + "attn_q_norm.weight"))
            yield o + "attn.k_norm.weight", t(gf.tensor(p + "attn_k_norm.weight"))
        if wanted(o + "attn.o_proj.weight"):
            yield o + "attn.o_proj.weight", t(gf.tensor(p + "attn_output.weight"))
        if wanted(o + "mlp.gate_up_proj.weight"):
            gate_up = [gf.tensor(p + "ffn_gate.weight"), gf.tensor(p + "ffn_up.weight")]
            yield o + "mlp.gate_up_proj.weight", t(np.concatenate(gate_up, axis=0))
        if wanted(o + "mlp.down_proj.weight"):
            yield o + "mlp.down_proj.weight", t(gf.tensor(p + "ffn_down.weight"))
    yield "norm.weight", t(gf.tensor("output_norm.weight"))
    if not cfg.tie_word_embeddings and wanted("lm_head.weight"):
        yield "lm_head.weight", t(gf.tensor("output.weight"))
    if "rope_freqs.weight" in gf.tensors:
        yield "rope_factors", torch.from_numpy(gf.tensor("rope_freqs.weight").reshape(-1).copy())


def qkv_bias(gf: GGUFModelFile, cfg: ModelConfig, layer: int) -> np.ndarray:
    """Layer ``layer``'s fused q/k/v bias ``[q + 2 * kv]`` fp32 (Q/K un-permuted like their rows)."""
    p = f"blk.{layer}."
    heads = (cfg.num_heads, cfg.num_kv_heads, None) if permutes(cfg) else (None, None, None)
    parts = [gf.tensor(p + f"attn_{x}.bias") for x in "qkv"]
    return np.concatenate([_unpermute(b, h) if h else b for b, h in zip(parts, heads, strict=True)])


def gguf_num_tensors(cfg: ModelConfig) -> int:
    per_layer = 6 + (1 if cfg.attention_bias else 0) + (2 if cfg.qk_norm else 0)
    return 2 + cfg.num_layers * per_layer + (0 if cfg.tie_word_embeddings else 1)


# ------------------------------------------------------------------------------------- describe / load


def describe(path: Path, *, use_cache: bool = True) -> ModelDescription:
    """Describe a GGUF file. With ``use_cache``, what a previous conversion stored in the weights cache
    is used instead of parsing the file's metadata (the file is hashed once, then the hash is memoized)."""
    check_file(path)  # before hashing
    meta = weight_cache.find_meta(weight_cache.file_hash(path)) if use_cache else None
    if meta is not None:
        tok_dict = meta["tokenizer"]
        info = meta["source_info"]
        return ModelDescription(
            format="gguf",
            path=path,
            config=ModelConfig.from_dict(meta["config"]),
            tensor_bytes=info.get("tensor_type_bytes", {}),
            chat_template=tok_dict.get("chat_template") is not None,
            source_info=info,
            make_tokenizer=lambda: Tokenizer.from_dict(tok_dict),
        )
    gf = GGUFModelFile(path)
    type_bytes = gf.tensor_type_bytes()
    cfg = gf.config()
    return ModelDescription(
        format="gguf",
        path=path,
        config=cfg,
        tensor_bytes=type_bytes,
        chat_template=gf.field("tokenizer.chat_template") is not None,
        source_info={
            "tensor_type_bytes": type_bytes,
            "file_bytes": path.stat().st_size,
            "as_stored": plan_summary(gf, tensor_plan(gf, cfg)),
        },
        make_tokenizer=lambda: Tokenizer.from_gguf_meta(gf.tokenizer_meta()),
        handle=gf,
    )


def _progress(total: int, description: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import Progress

    p = Progress(transient=True)
    p.start()
    p.add_task(description, total=total)
    return p


def load(
    desc: ModelDescription,
    dtype: torch.dtype,
    device: torch.device,
    *,
    use_cache: bool = True,
    progress: bool = False,
) -> LoadedModel:
    """Weights from the cache entry for ``dtype`` if there is one, else converted tensor by tensor (and cached).
    (Weights run as stored load through :func:`frugallm.loading.gguf_stored.load_stored`.)"""
    path, cfg = desc.path, desc.config
    entry = weight_cache.entry_dir(weight_cache.file_hash(path), dtype) if use_cache else None
    cached = weight_cache.load_entry(entry) if entry is not None else None
    if cached is not None:
        state, meta = cached
        try:
            m = materialize(cfg, state, device, where=str(path))
        except ModelLoadError as e:  # an entry that checks out but does not fit the model: rebuild it
            weight_cache.discard(entry, str(e))
        else:
            return LoadedModel(m, cfg, desc.tokenizer(), path, "gguf", True, 0.0, meta["source_info"])

    tok = desc.tokenizer()
    check_vocab(cfg, tok, path)
    gf = desc.handle if isinstance(desc.handle, GGUFModelFile) else GGUFModelFile(path)
    bar = _progress(gguf_num_tensors(cfg), f"converting {path.name}", progress)
    state: dict[str, torch.Tensor] = {}
    try:
        for name, t in iter_gguf_state_dict(gf, cfg, dtype):
            state[name] = t
            if bar is not None:
                bar.advance(bar.task_ids[0])
    finally:
        if bar is not None:
            bar.stop()
    info = {"tensor_type_bytes": gf.tensor_type_bytes(), "file_bytes": path.stat().st_size, "weights": "dequantize"}
    if entry is not None:
        weight_cache.save_entry(
            entry, state, {"config": cfg.to_dict(), "tokenizer": tok.to_dict(), "source_info": info}
        )
    m = materialize(cfg, state, device, where=str(path))
    return LoadedModel(m, cfg, tok, path, "gguf", False, 0.0, info)
