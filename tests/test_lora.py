"""LoRA: exact no-op at init, merge = hand computation, frozen base, adapter save/load in the
PEFT layout, merging folders (API and CLI), dropout."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from internlm2.align import lora
from internlm2.align.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_adapter_folder,
    merge_lora,
    save_adapter,
    trainable_summary,
)
from internlm2.config import ModelConfig
from internlm2.hf import load_model, load_state_dict, save_model
from internlm2.model import build_model

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def perturb(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.copy_(std * torch.randn(m.lora_B.shape, generator=g))
    return model


def lora_model(config=None, seed=1):
    model = build_model(CFG, seed=0)
    apply_lora(model, config or LoRAConfig())
    return perturb(model, seed)


def test_fresh_adapter_is_exact_noop():
    base = build_model(CFG, seed=0)
    model = build_model(CFG, seed=0)
    names = apply_lora(model, LoRAConfig())
    assert len(names) == 2 * 5 and "model.layers.0.attention.wqkv" in names
    assert isinstance(model.model.layers[1].feed_forward.w2, LoRALinear)
    assert "model.layers.0.attention.wqkv.lora_A" in dict(model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))


def test_merge_matches_lora_and_hand_computation():
    model = lora_model()
    with torch.no_grad():
        want = model(IDS)
    layer = model.model.layers[0].attention.wo
    x = torch.randn(3, 64)
    w = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    assert layer.scaling == 2.0
    torch.testing.assert_close(layer(x), x @ w.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.merge().weight, w, atol=1e-6, rtol=0)

    plain_keys = set(build_model(CFG, seed=0).state_dict())
    merge_lora(model)
    assert set(model.state_dict()) == plain_keys
    assert not lora.lora_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), want, atol=1e-5, rtol=0)


def test_bf16_input_with_fp32_and_bf16_lora_weights():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48, dtype=torch.bfloat16)
    x = torch.randn(4, 32).to(torch.bfloat16)
    for dtype, want_dtype in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        layer = LoRALinear(lin, r=4, alpha=8, dtype=dtype)
        assert layer.lora_A.dtype == want_dtype
        with torch.no_grad():
            layer.lora_B.normal_()
            y = layer(x)
        assert y.dtype == torch.bfloat16
        w = lin.weight.float() + 2.0 * layer.lora_B.float() @ layer.lora_A.float()
        torch.testing.assert_close(y.float(), x.float() @ w.T + lin.bias.float(), atol=0.1, rtol=0.02)
        merged = layer.merge()
        assert merged.weight.dtype == torch.bfloat16 and merged.bias is lin.bias
        assert torch.equal(merged.weight, w.to(torch.bfloat16))


def test_only_lora_params_train():
    model = lora_model()
    model(IDS).float().logsumexp(-1).mean().backward()
    h, i = CFG.hidden_size, CFG.intermediate_size
    qkv = (CFG.num_attention_heads + 2 * CFG.num_key_value_heads) * CFG.head_dim
    r = 8
    per_layer = r * (h + qkv) + r * (h + h) + 2 * r * (h + i) + r * (i + h)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trainable) == CFG.num_hidden_layers * per_layer
    for n, p in model.named_parameters():
        is_lora = n.endswith((".lora_A", ".lora_B"))
        assert p.requires_grad == is_lora, n
        assert (p.grad is not None) == is_lora, n
    s = trainable_summary(model)
    assert s.startswith("trainable ") and "%" in s and " / " in s


def test_errors():
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_lora(build_model(CFG, seed=0), LoRAConfig(targets=("nope",)))
    with pytest.raises(ValueError, match="r must be"):
        LoRAConfig(r=0)
    model = lora_model()
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="use_dora"):
        LoRAConfig.from_dict({"r": 4, "use_dora": True})


def test_nested_model_and_config_dict():
    outer = nn.Sequential(nn.ModuleDict({"lm": build_model(CFG, seed=0)}))
    cfg = LoRAConfig(r=4, alpha=8, targets=["attention.wo"])
    names = apply_lora(outer, cfg)
    assert names == ["0.lm.model.layers.0.attention.wo", "0.lm.model.layers.1.attention.wo"]
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg
    peft = cfg.to_peft_dict("base")
    assert LoRAConfig.from_dict(peft) == cfg and peft["lora_alpha"] == 8


def test_adapter_round_trip_and_wrong_r(tmp_path):
    model = lora_model(LoRAConfig(r=4, alpha=16))
    save_adapter(model, LoRAConfig(r=4, alpha=16), tmp_path / "ad", base_model="base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temp folder left
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 16
    assert meta["base_model_name_or_path"] == "base"
    stored = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.attention.wqkv.lora_A.weight" in stored
    assert len(stored) == len(lora_state_dict(model)) == 2 * 2 * 5

    fresh = build_model(CFG, seed=0)
    cfg = load_adapter(fresh, tmp_path / "ad")
    assert cfg.r == 4 and fresh.model.layers[0].attention.wqkv.scaling == 4.0
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))

    other = build_model(CFG, seed=0)
    apply_lora(other, LoRAConfig(r=8))
    with pytest.raises(ValueError, match=r"shape mismatch .*lora_A \[4, 64\] \(model \[8, 64\]\)"):
        load_adapter(other, tmp_path / "ad")
    partial = build_model(CFG, seed=0)
    apply_lora(partial, LoRAConfig(r=4, targets=("wqkv",)))
    with pytest.raises(ValueError, match="unexpected tensor.*attention.wo.lora_A"):
        load_adapter(partial, tmp_path / "ad")


@pytest.fixture
def folders(tmp_path):
    base = build_model(CFG, seed=0)
    save_model(base, tmp_path / "base", dtype=torch.bfloat16)
    (tmp_path / "base" / "tokenizer.model").write_bytes(b"sp")
    (tmp_path / "base" / "tokenizer_config.json").write_text("{}")
    model = load_model(tmp_path / "base")  # fp32 copy of the bf16 weights
    apply_lora(model, LoRAConfig())
    perturb(model)
    save_adapter(model, LoRAConfig(), tmp_path / "ad")
    with torch.no_grad():
        want = model(IDS)
    return tmp_path, want


def test_merge_adapter_folder(folders):
    root, want = folders
    out = merge_adapter_folder(root / "base", root / "ad", root / "out")
    assert (out / "tokenizer.model").read_bytes() == b"sp"
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    sd = load_state_dict(out)
    assert set(sd) == set(build_model(CFG, seed=0).state_dict())
    assert all(t.dtype == torch.bfloat16 for t in sd.values())  # kept the base's dtype
    with torch.no_grad():
        got = load_model(out)(IDS)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)  # bf16 rounding of W + dW

    out32 = merge_adapter_folder(root / "base", root / "ad", root / "out32", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out32)(IDS), want, atol=1e-5, rtol=0)


def test_cli_merge(folders, capsys):
    root, want = folders
    p = argparse.ArgumentParser()
    lora.add_cli(p.add_subparsers())
    args = p.parse_args(["lora", "merge", "--base", str(root / "base"), "--adapter",
                         str(root / "ad"), "--out", str(root / "cli"), "--dtype", "float32"])
    assert args.func(args) == 0
    assert str(root / "cli") in capsys.readouterr().out
    assert (root / "cli" / "tokenizer.model").is_file()
    with torch.no_grad():
        torch.testing.assert_close(load_model(root / "cli")(IDS), want, atol=1e-5, rtol=0)


def test_dropout_only_in_train_mode():
    model = lora_model(LoRAConfig(dropout=0.5))
    model.train()
    with torch.no_grad():
        a, b = model(IDS), model(IDS)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        a, b = model(IDS), model(IDS)
        merged = merge_lora(model)(IDS)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, merged, atol=1e-5, rtol=0)
