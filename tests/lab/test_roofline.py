"""Roofline model: counts against hand-written formulas, known models, and hardware specs."""

from __future__ import annotations

import math

import pytest

from frugallm.config import ModelConfig
from frugallm.errors import FrugalError
from frugallm.lab.hardware import HardwareSpec
from frugallm.lab.hwspecs import DATASHEET_SPECS, load_hw_spec
from frugallm.lab.roofline import OP_NAMES, analyze
from frugallm.lab.roofline_chart import format_table, plot_roofline
from frugallm.lab.utilization import measured_utilization

TINY = ModelConfig(arch="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128, name="tiny")
LLAMA2_7B = ModelConfig(arch="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                        max_position_embeddings=4096, name="llama-2-7b")
H100 = DATASHEET_SPECS["h100-sxm"]
# Round numbers make the hand-computed times easy to check.
TOY_HW = HardwareSpec("toy", mem_bandwidth_gbs=100.0, peak_flops={"fp32": 1e12, "fp16": 4e12},
                      source="custom")


def test_tiny_counts_match_hand_formulas() -> None:
    B, P, G, L, h, inter, H, Hkv, d, V = 1, 8, 4, 2, 64, 128, 4, 2, 16, 100
    q, kv, a = H * d, Hkv * d, 2  # 16-bit: 2 bytes per weight / activation / KV element
    rep = analyze(TINY, TOY_HW, batch=B, prompt_len=P, gen_len=G)
    pre, dec = rep.prefill, rep.decode
    assert [r.name for r in pre.rows] == list(OP_NAMES)
    n = B * P

    qkv = pre.row("qkv_proj")
    assert qkv.layer_flops == 2 * B * P * h * (q + 2 * kv)
    assert qkv.layer_bytes == h * (q + 2 * kv) * a + n * (h + q + 2 * kv) * a
    assert qkv.flops == L * qkv.layer_flops and qkv.bytes == L * qkv.layer_bytes

    # Causal prefill: P(P+1)/2 query-key pairs per head; K read once and written once (fused attention).
    score = pre.row("attn_score")
    assert score.layer_flops == 2 * B * H * (P * (P + 1) / 2) * d
    assert score.layer_bytes == n * q * a + B * (P + P) * kv * a
    assert pre.row("attn_softmax").layer_flops == 5 * B * H * P * (P + 1) / 2
    assert pre.row("attn_softmax").bytes == 0
    assert pre.row("o_proj").layer_flops == 2 * n * q * h
    assert pre.row("gate_up_proj").layer_flops == 2 * n * h * 2 * inter
    assert pre.row("gate_up_proj").layer_bytes == 2 * h * inter * a + n * (h + 2 * inter) * a
    assert pre.row("act_mul").layer_bytes == 3 * n * inter * a
    assert pre.row("down_proj").layer_flops == 2 * n * inter * h
    norms = pre.row("norms")
    assert norms.layer_flops == 2 * 4 * n * h
    assert norms.flops == L * 2 * 4 * n * h + 4 * n * h  # + the final norm
    # Prefill computes the logits of the last prompt token only.
    lm = pre.row("lm_head")
    assert lm.flops == 2 * B * h * V
    assert lm.bytes == h * V * a + B * (h + V) * a

    # Decode step at context P + G/2 = 10: one new token, GQA K/V traffic uses kv heads.
    c = P + G / 2
    assert dec.context == c and dec.tokens == B
    assert dec.row("qkv_proj").layer_flops == 2 * B * h * (q + 2 * kv)
    assert dec.row("attn_score").layer_flops == 2 * B * H * c * d
    assert dec.row("attn_score").layer_bytes == B * q * a + B * (c + 1) * kv * a
    assert dec.row("attn_value").layer_bytes == B * (c + 1) * kv * a + B * q * a
    assert dec.row("lm_head").flops == 2 * B * h * V

    # Time of a row is its roofline: max(compute, memory).
    g = dec.row("gate_up_proj")
    assert g.time_s == pytest.approx(max(g.flops / 4e12, g.bytes / 100e9))
    assert g.bound == "memory"
    assert dec.row("attn_softmax").peak_dtype == "fp32" and g.peak_dtype == "fp16"

    assert pre.flops == pytest.approx(sum(r.flops for r in pre.rows))
    assert rep.decode_total_flops == pytest.approx(G * dec.flops)
    assert rep.decode_total_time_s == pytest.approx(G * dec.time_s)
    assert rep.ttft_s == pre.time_s and rep.tpot_s == dec.time_s
    assert rep.decode_tokens_per_s == pytest.approx(B / dec.time_s)
    assert rep.weight_bytes == TINY.num_params * 2
    assert rep.kv_cache_bytes == 2 * L * Hkv * d * (P + G) * B * 2
    assert rep.activation_peak_bytes > 0
    as_dict = rep.to_dict()
    assert as_dict["prefill"]["rows"][0]["name"] == "qkv_proj" and as_dict["tpot_s"] == rep.tpot_s


def test_bits_and_unfused_attention() -> None:
    B, P = 2, 8
    base = analyze(TINY, TOY_HW, B, P, 4)
    w4 = analyze(TINY, TOY_HW, B, P, 4, wbits=4)
    h, q, kv = 64, 64, 32
    assert base.prefill.row("qkv_proj").layer_bytes - w4.prefill.row("qkv_proj").layer_bytes == pytest.approx(
        h * (q + 2 * kv) * (2 - 0.5))
    assert w4.weight_bytes == TINY.num_params / 2
    assert analyze(TINY, TOY_HW, B, P, 4, kvbits=8).kv_cache_bytes == base.kv_cache_bytes / 2
    # W8A8 uses the int8 peak where the device has one, else the compute dtype.
    assert analyze(TINY, H100, B, P, 4, wbits=8, abits=8).matmul_dtype == "int8"
    assert analyze(TINY, TOY_HW, B, P, 4, wbits=8, abits=8).matmul_dtype == "fp16"
    # Unfused attention writes and re-reads the full P x P score and probability matrices.
    unfused = analyze(TINY, TOY_HW, B, P, 4, fused_attention=False)
    assert unfused.prefill.row("attn_softmax").layer_bytes == 2 * B * 4 * P * P * 2
    assert unfused.prefill.bytes > base.prefill.bytes


def test_llama2_7b_decode_flops_are_twice_the_params() -> None:
    assert LLAMA2_7B.num_params == pytest.approx(6.74e9, rel=0.01)
    rep = analyze(LLAMA2_7B, H100, batch=4, prompt_len=16, gen_len=16)
    per_token = rep.decode.flops / rep.batch
    assert per_token == pytest.approx(2 * 6.74e9, rel=0.05)


def test_h100_decode_memory_bound_and_prefill_compute_bound() -> None:
    small = analyze(LLAMA2_7B, H100, batch=1, prompt_len=128, gen_len=128)
    assert all(r.bound == "memory" for r in small.decode.rows if r.name != "attn_softmax")
    assert small.decode.intensity < H100.ridge_point("fp16")
    # Batch-1 decode is a read of the weights: TPOT ~ weight bytes / bandwidth (~4 ms at 3.35 TB/s).
    assert small.tpot_s == pytest.approx(small.weight_bytes / H100.mem_bandwidth, rel=0.1)
    big = analyze(LLAMA2_7B, H100, batch=16, prompt_len=2048, gen_len=128)
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        assert big.prefill.row(name).bound == "compute"
    assert big.prefill.intensity > H100.ridge_point("fp16")
    assert big.ttft_s > big.prefill.flops / H100.peak("fp16")  # never faster than the compute ceiling


def test_measured_utilization() -> None:
    rep = analyze(LLAMA2_7B, H100, 1, 128, 128)
    u = measured_utilization(LLAMA2_7B, H100, 1, 128, 128, tpot_s=rep.tpot_s, ttft_s=2 * rep.ttft_s,
                             wbits=16, abits=16, kvbits=16)
    assert u["decode_roofline_fraction"] == pytest.approx(1.0)
    assert 0.9 < u["decode_mbu"] <= 1.0 + 1e-9
    assert u["decode_mfu"] < 0.01
    assert u["prefill_roofline_fraction"] == pytest.approx(0.5)
    assert u["prefill_mfu"] == pytest.approx(rep.prefill.flops / (2 * rep.ttft_s) / H100.peak("fp16"))
    none = measured_utilization(LLAMA2_7B, H100, 1, 128, 128, tpot_s=0.01, ttft_s=None, wbits=16,
                                abits=16, kvbits=16)
    assert none["prefill_mbu"] is None and none["decode_mbu"] is not None
    with pytest.raises(FrugalError, match="positive"):
        measured_utilization(LLAMA2_7B, H100, 1, 128, 128, 0.0, None, 16, 16, 16)


def test_attainable_gemv_bandwidth_used_when_present() -> None:
    gemv = HardwareSpec("toy-gemv", 100.0, {"fp32": 1e12, "fp16": 4e12}, source="custom",
                        gemv_bandwidth_gbs={"fp32": 25.0, "fp16": 50.0})
    peak = analyze(TINY, TOY_HW, 1, 8, 4, wbits=32, abits=32, kvbits=32, compute_dtype="fp32")
    att = analyze(TINY, gemv, 1, 8, 4, wbits=32, abits=32, kvbits=32, compute_dtype="fp32")
    # Absent: the peak everywhere, both predictions equal.
    assert peak.weight_dtype == "fp32" and peak.weight_bandwidth_gbs == 100.0
    assert peak.tpot_peak_s == peak.tpot_s and peak.ttft_peak_s == peak.ttft_s
    # Present: weight matmuls stream at the fp32 GEMV bandwidth (4x slower), other ops at the peak.
    assert att.weight_bandwidth_gbs == 25.0
    assert att.tpot_peak_s == pytest.approx(peak.tpot_s) and att.ttft_peak_s == pytest.approx(peak.ttft_s)
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"):
        r = att.decode.row(name)
        assert r.bound == "memory" and r.time_s == pytest.approx(r.bytes / 25e9)
        assert r.bytes == peak.decode.row(name).bytes and r.flops == peak.decode.row(name).flops
    for name in ("attn_score", "attn_value", "norms"):
        assert att.decode.row(name).time_s == pytest.approx(peak.decode.row(name).time_s)
    assert att.tpot_s > 3 * peak.tpot_s
    # fp16 weights pick the fp16 entry; quantized weights (not probed) fall back to the peak.
    assert analyze(TINY, gemv, 1, 8, 4, compute_dtype="fp16").weight_bandwidth_gbs == 50.0
    assert analyze(TINY, gemv, 1, 8, 4, compute_dtype="fp32", weight_dtype="fp16").weight_dtype == "fp16"
    assert analyze(TINY, gemv, 1, 8, 4, wbits=4, compute_dtype="fp16").weight_bandwidth_gbs == 100.0
    with pytest.raises(FrugalError, match="weight_dtype"):
        analyze(TINY, gemv, 1, 8, 4, weight_dtype="int8")

    rep = att
    u = measured_utilization(TINY, gemv, 1, 8, 4, tpot_s=2 * rep.tpot_s, ttft_s=rep.ttft_s, wbits=32,
                             abits=32, kvbits=32, compute_dtype="fp32")
    assert u["predicted_tpot_s"] == rep.tpot_s and u["predicted_tpot_peak_s"] == rep.tpot_peak_s
    assert u["decode_roofline_fraction"] == pytest.approx(0.5)
    assert u["decode_roofline_fraction_peak"] == pytest.approx(rep.tpot_peak_s / (2 * rep.tpot_s))
    achieved = rep.decode.bytes / (2 * rep.tpot_s)
    assert u["decode_mbu"] == pytest.approx(achieved / 100e9)  # MBU stays against the peak
    assert u["decode_gemv_efficiency"] == pytest.approx(achieved / 25e9)
    assert u["prefill_roofline_fraction"] == pytest.approx(1.0)
    assert "GEMV bandwidth" in format_table(att) and "GEMV" not in format_table(peak)


def test_gemv_bandwidth_spec_validation(tmp_path) -> None:
    assert all(s.gemv_bandwidth_gbs is None for s in DATASHEET_SPECS.values())
    with pytest.raises(FrugalError, match="gemv_bandwidth_gbs"):
        HardwareSpec("x", 1.0, {"fp32": 1.0}, gemv_bandwidth_gbs={"int8": 1.0})
    with pytest.raises(FrugalError, match="positive"):
        HardwareSpec("x", 1.0, {"fp32": 1.0}, gemv_bandwidth_gbs={"fp32": 0.0})
    path = tmp_path / "cpu.toml"
    path.write_text('mem_bandwidth_gbs = 80.0\n[peak_flops]\nfp32 = 1e12\n[gemv_bandwidth_gbs]\nfp32 = 14.0\n')
    spec = load_hw_spec(path)
    assert spec.gemv_bandwidth_gbs == {"fp32": 14.0} and spec.gemv_bandwidth(None) == 80e9
    assert HardwareSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch": 0}, "batch"),
        ({"prompt_len": 0}, "prompt_len"),
        ({"gen_len": -1}, "gen_len"),
        ({"wbits": 5}, "wbits=5.*2, 3, 4, 6, 8, 16, 32"),
        ({"abits": 1}, "abits"),
        ({"kvbits": 12}, "kvbits"),
        ({"compute_dtype": "fp64"}, "compute_dtype"),
    ],
)
def test_invalid_inputs(kwargs: dict, match: str) -> None:
    args = {"batch": 1, "prompt_len": 8, "gen_len": 4, **kwargs}
    with pytest.raises(FrugalError, match=match):
        analyze(TINY, TOY_HW, **args)


def test_missing_compute_dtype_peak_lists_available() -> None:
    with pytest.raises(FrugalError, match="available: fp32, fp16"):
        analyze(TINY, TOY_HW, 1, 8, 4, compute_dtype="bf16")


def test_datasheet_specs_and_aliases() -> None:
    for name in ("h100-sxm", "h200", "a100-80gb-sxm", "l4", "rtx-4090"):
        spec = load_hw_spec(name)
        assert spec.source == "datasheet"
        assert set(spec.peak_flops) == {"fp32", "bf16", "fp16", "int8"}
        assert spec.peak("int8") > spec.peak("fp16") > spec.peak("fp32")
    assert load_hw_spec("H100") is DATASHEET_SPECS["h100-sxm"]
    assert load_hw_spec("h200").mem_bandwidth_gbs > load_hw_spec("h100").mem_bandwidth_gbs


def test_unknown_spec_lists_valid_names() -> None:
    with pytest.raises(FrugalError, match=r"unknown hardware spec 'tpu-v9'.*h100-sxm.*l4.*rtx-4090"):
        load_hw_spec("tpu-v9")


def test_custom_toml_spec(tmp_path) -> None:
    path = tmp_path / "mygpu.toml"
    path.write_text('name = "my-gpu"\nmem_bandwidth_gbs = 936.0\nmem_bytes = 25769803776\n'
                    "[peak_flops]\nfp32 = 35.6e12\nfp16 = 142e12\n")
    spec = load_hw_spec(str(path))
    assert spec == HardwareSpec("my-gpu", 936.0, {"fp32": 35.6e12, "fp16": 142e12}, 25769803776, "custom")
    assert analyze(TINY, spec, 1, 8, 4).hardware == "my-gpu"
    bad = tmp_path / "bad.toml"
    bad.write_text("mem_bandwidth_gbs = 1.0\n[peak_flops]\nfp64 = 1e12\n")
    with pytest.raises(FrugalError, match="unknown dtype 'fp64'"):
        load_hw_spec(bad)
    with pytest.raises(FrugalError, match="not found"):
        load_hw_spec(tmp_path / "missing.toml")


def test_format_table_lists_every_op() -> None:
    text = format_table(analyze(TINY, H100, 1, 8, 4))
    for name in OP_NAMES:
        assert name in text
    assert "TTFT" in text and "TPOT" in text and "\x1b[" not in text


def test_plot_writes_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    rep = analyze(LLAMA2_7B, H100, 4, 256, 64)
    out = plot_roofline(rep, H100, tmp_path / "plots" / "roof.png",
                        measured_points=[("decode measured", 1.0, 1e12)])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not math.isinf(rep.prefill.row("qkv_proj").intensity)
