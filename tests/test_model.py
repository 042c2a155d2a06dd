"""Model internals: layout, rotary, KV cache, padding, packing, construction."""

import math

import pytest
import torch
import torch.nn.functional as F

from internlm2.config import ConfigError, ModelConfig
from internlm2.model import (InternLM2ForCausalLM, build_model, flops_per_token,
                             positions_from_doc_ids, rope_theta)


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(small_config(), seed=0).eval()


def reference_forward(model: InternLM2ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """An independent, literal transcription of REFERENCE.md section 1 (no SDPA, no GQA tricks)."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    d, g, nkv = cfg.head_dim, cfg.q_per_kv, cfg.num_key_value_heads
    t = ids.shape[1]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).double() / d))
    ang = torch.arange(t).double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # x [T, D]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    h = sd["model.tok_embeddings.weight"][ids[0]]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        n = rms(h, sd[p + "attention_norm.weight"])
        w = sd[p + "attention.wqkv.weight"].view(nkv, g + 2, d, cfg.hidden_size)
        heads = []
        for qh in range(cfg.num_attention_heads):
            grp, slot = divmod(qh, g)
            q = rope(n @ w[grp, slot].T)
            k = rope(n @ w[grp, g].T)
            v = n @ w[grp, g + 1].T
            s = (q @ k.T) / math.sqrt(d)
            s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
            heads.append(torch.softmax(s, -1) @ v)
        h = h + torch.cat(heads, -1) @ sd[p + "attention.wo.weight"].T
        n = rms(h, sd[p + "ffn_norm.weight"])
        ff = F.silu(n @ sd[p + "feed_forward.w1.weight"].T) * (n @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    h = rms(h, sd["model.norm.weight"])
    return (h @ sd["output.weight"].T)[None].float()


def test_matches_literal_reference(model):
    ids = torch.randint(0, 211, (1, 23))
    got = model(ids)
    assert got.dtype == torch.float32 and got.shape == (1, 23, 211)
    torch.testing.assert_close(got, reference_forward(model, ids), atol=1e-4, rtol=1e-4)


def test_parameter_names_are_official():
    m = build_model(small_config(num_hidden_layers=1), seed=0)
    names = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert names == {
        "model.tok_embeddings.weight": (211, 64),
        "model.layers.0.attention_norm.weight": (64,),
        "model.layers.0.attention.wqkv.weight": ((4 + 2 * 2) * 16, 64),
        "model.layers.0.attention.wo.weight": (64, 64),
        "model.layers.0.ffn_norm.weight": (64,),
        "model.layers.0.feed_forward.w1.weight": (96, 64),
        "model.layers.0.feed_forward.w3.weight": (96, 64),
        "model.layers.0.feed_forward.w2.weight": (64, 96),
        "model.norm.weight": (64,),
        "output.weight": (211, 64),
    }
    assert small_config(num_hidden_layers=1).num_params() == m.num_params()


def test_bias_only_on_wqkv_and_wo():
    m = build_model(small_config(bias=True, num_hidden_layers=1), seed=0)
    biased = sorted(k for k in m.state_dict() if k.endswith(".bias"))
    assert biased == ["model.layers.0.attention.wo.bias", "model.layers.0.attention.wqkv.bias"]
    assert small_config(bias=True, num_hidden_layers=1).num_params() == m.num_params()


def test_meta_construction_and_init():
    cfg = small_config()
    m = build_model(cfg, seed=1)
    assert all(p.device.type == "cpu" for p in m.parameters())
    w = m.model.layers[0].attention.wqkv.weight
    assert abs(w.std().item() - cfg.initializer_range) < 0.003
    assert torch.equal(m.model.norm.weight, torch.ones(64))
    m2 = build_model(cfg, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def test_presets_have_official_shapes():
    for name, (h, layers, heads, kv, inter) in {
            "1_8b": (2048, 24, 16, 8, 8192), "7b": (4096, 32, 32, 8, 14336),
            "20b": (6144, 48, 48, 8, 16384)}.items():
        c = ModelConfig.preset(name)
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                c.num_key_value_heads, c.intermediate_size) == (h, layers, heads, kv, inter)
        assert c.vocab_size == 92544 and c.head_dim == 128 and c.max_position_embeddings == 32768
    assert 7.0e9 < ModelConfig.preset("7b").num_params() < 8.0e9
    assert 1.7e9 < ModelConfig.preset("1.8b").num_params() < 2.0e9
    tiny = ModelConfig.preset("tiny").num_params()
    assert 1e6 < tiny < 1e7
    with torch.device("meta"):  # 7B builds on meta without allocating
        big = InternLM2ForCausalLM(ModelConfig.preset("7b"))
    assert big.num_params() == ModelConfig.preset("7b").num_params()


def test_dynamic_ntk_theta_matches_reference_value():
    cfg = ModelConfig.preset("7b", rope_scaling={"type": "dynamic", "factor": 2.0})
    assert rope_theta(cfg, 32768) == 1e6  # unchanged at max_position_embeddings
    assert rope_theta(cfg, 65536) == pytest.approx(3.05e6, rel=0.01)
    assert rope_theta(ModelConfig.preset("7b"), 65536) == 1e6


def test_bad_config_values_are_named():
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        small_config(rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(ConfigError, match="factor"):
        small_config(rope_scaling={"type": "linear"})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        small_config(num_key_value_heads=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("3b")


def test_hf_dict_round_trip_and_ignored_keys():
    cfg = small_config(rope_scaling={"type": "dynamic", "factor": 2.0})
    d = cfg.to_hf_dict()
    assert d["architectures"] == ["InternLM2ForCausalLM"] and d["model_type"] == "internlm2"
    assert d["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert "AutoModelForCausalLM" in d["auto_map"]
    back = ModelConfig.from_hf_dict({**d, "attn_implementation": "flash_attention_2",
                                     "pretraining_tp": 1, "transformers_version": "4.41.0"})
    assert back == cfg
    assert ModelConfig.from_hf_dict({**d, "rope_scaling": None}).rope_scaling is None


def test_kv_cache_incremental_equals_full(model):
    ids = torch.randint(0, 211, (2, 30))
    full = model(ids)
    cache = model.new_cache(2, 40)
    parts = [model(ids[:, :7], cache=cache), model(ids[:, 7:19], cache=cache)]
    parts += [model(ids[:, i:i + 1], cache=cache) for i in range(19, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        model(ids[:, :11], cache=cache)


def test_left_padding_equals_unpadded(model):
    a, b = torch.randint(3, 211, (1, 12)), torch.randint(3, 211, (1, 5))
    ids = torch.cat([a, torch.cat([torch.full((1, 7), 2), b], 1)])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :7] = 0
    cache = model.new_cache(2, 16)
    out = model(ids, attention_mask=mask, cache=cache)
    torch.testing.assert_close(out[0], model(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 7:], model(b)[0], atol=1e-5, rtol=1e-5)
    nxt = torch.tensor([[17], [19]])
    step = model(nxt, cache=cache)
    torch.testing.assert_close(step[1, -1], model(torch.cat([b, nxt[1:]], 1))[0, -1],
                               atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_packed_documents_do_not_attend_across(model):
    lens = [5, 11, 1, 7]
    docs = [torch.randint(0, 211, (1, n)) for n in lens]
    ids = torch.cat(docs, 1)
    doc_ids = torch.repeat_interleave(torch.arange(4), torch.tensor(lens))[None]
    packed = model(ids, doc_ids=doc_ids)
    alone = torch.cat([model(d) for d in docs], 1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    cu = torch.tensor([0, 5, 16, 17, 24], dtype=torch.int32)
    torch.testing.assert_close(model(ids, cu_seqlens=cu), alone, atol=1e-5, rtol=1e-5)
    assert positions_from_doc_ids(doc_ids)[0].tolist() == \
        list(range(5)) + list(range(11)) + [0] + list(range(7))


def test_packed_gradients_match_separate_documents():
    m = build_model(small_config(), seed=3)
    lens = [6, 10]
    docs = [torch.randint(0, 211, (1, n)) for n in lens]
    doc_ids = torch.repeat_interleave(torch.arange(2), torch.tensor(lens))[None]
    m(torch.cat(docs, 1), doc_ids=doc_ids).sum().backward()
    g_packed = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    sum(m(d).sum() for d in docs).backward()
    for a, p in zip(g_packed, m.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-4, rtol=1e-4)


def test_linear_rope_scaling_divides_positions():
    base = build_model(small_config(), seed=5)
    lin = build_model(small_config(rope_scaling={"type": "linear", "factor": 4.0}), seed=5)
    ids = torch.randint(0, 211, (1, 12))
    pos = torch.arange(12)[None] * 4
    torch.testing.assert_close(lin(ids, position_ids=pos), base(ids), atol=1e-5, rtol=1e-5)


def test_dynamic_rope_is_identity_below_max_and_changes_above():
    base = build_model(small_config(), seed=6)
    dyn = build_model(small_config(rope_scaling={"type": "dynamic", "factor": 2.0}), seed=6)
    short = torch.randint(0, 211, (1, 64))
    torch.testing.assert_close(dyn(short), base(short))
    long = torch.randint(0, 211, (1, 100))
    assert (dyn(long) - base(long)).abs().max() > 1e-3
    # the first tokens of a long input see the rescaled base too (theta follows total length)
    assert (dyn(long)[:, :10] - base(long)[:, :10]).abs().max() > 1e-4


def test_chunked_prefill_with_fixed_rope_length_equals_one_shot():
    m = build_model(small_config(rope_scaling={"type": "dynamic", "factor": 2.0}), seed=7)
    ids = torch.randint(0, 211, (1, 150))
    full = m(ids)
    cache = m.new_cache(1, 150)
    parts = [m(ids[:, i:i + 40], cache=cache, rope_seq_len=150) for i in range(0, 150, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_logits_to_keep_and_hidden(model):
    ids = torch.randint(0, 211, (2, 9))
    full = model(ids)
    torch.testing.assert_close(model(ids, logits_to_keep=1), full[:, -1:])
    h = model(ids, return_hidden=True)
    assert h.shape == (2, 9, 64)
    torch.testing.assert_close(model.output(h).float(), full)


def test_bf16_forward_returns_fp32_logits():
    m = build_model(small_config(), dtype=torch.bfloat16, seed=0)
    out = m(torch.randint(0, 211, (1, 8)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = build_model(small_config(), seed=0)
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    ids = torch.randint(0, 211, (1, 8))
    assert (m(ids) - ref(ids)).abs().max() < 0.1


def test_flops_per_token_counts_matmuls():
    cfg = ModelConfig.preset("7b")
    f = flops_per_token(cfg, 4096)
    assert 6 * 6.5e9 < f < 6 * 8.5e9
