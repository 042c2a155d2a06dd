"""Hugging Face folders: save/load, sharding, .bin, bad input, atomic save, LLaMA conversion
and logits parity with transformers' LlamaForCausalLM."""

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import internlm2.hf as hf
from internlm2.config import ConfigError, ModelConfig
from internlm2.hf import (CheckpointError, convert_checkpoint, from_llama_state_dict,
                          generation_config_dict, llama_config_dict, load_config,
                          load_model, load_state_dict, model_info, parse_size, save_model,
                          to_llama_state_dict)
from internlm2.model import build_model, rope_theta


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rope_theta=10000.0)
    return ModelConfig(**{**base, **kw})


def same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def randomize_norms(model, seed=1):
    """Norm weights and biases start as ones/zeros: make them random so layouts matter, and
    sharpen attention (init std 0.02 makes it near uniform, hiding rotary differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("wqkv.weight"):
                p.mul_(10)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build_model(cfg(), seed=0)
    path = tmp_path_factory.mktemp("m") / "ours"
    save_model(model, path)
    return model, path


# -- save / load -------------------------------------------------------------------------------

def test_save_load_round_trip_fp32(saved):
    model, path = saved
    names = sorted(os.listdir(path))
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    c = json.loads((path / "config.json").read_text())
    assert c["architectures"] == ["InternLM2ForCausalLM"] and c["torch_dtype"] == "float32"
    loaded = load_model(path)
    assert loaded.config == model.config
    same_state(model.state_dict(), loaded.state_dict())
    same_state(model.state_dict(), load_state_dict(path))
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(model(ids), loaded(ids))


def test_sharded_bf16_round_trip(tmp_path):
    model = build_model(cfg(num_hidden_layers=3), seed=1).to(torch.bfloat16)
    save_model(model, tmp_path / "m", max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path / "m"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    sd = model.state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(shards)
    for s in shards:  # every shard but a lone big tensor stays under the limit
        part = load_file(str(tmp_path / "m" / s))
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 40_000 or len(part) == 1
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    same_state(sd, load_state_dict(tmp_path / "m"))
    loaded = load_model(tmp_path / "m", dtype=torch.bfloat16)
    same_state(sd, loaded.state_dict())
    # Casting on save and on load.
    save_model(model, tmp_path / "f32", dtype=torch.float32)
    assert load_state_dict(tmp_path / "f32")["output.weight"].dtype == torch.float32
    assert load_model(tmp_path / "m").output.weight.dtype == torch.float32


def test_shared_and_non_contiguous_tensors_save(tmp_path):
    model = build_model(cfg(), seed=2)
    with torch.no_grad():  # a transposed view (non-contiguous) and a tied pair (shared storage)
        w = model.model.layers[0].feed_forward.w2.weight
        w.data = w.data.t().contiguous().t()
        assert not w.is_contiguous()
        model.output.weight = model.model.tok_embeddings.weight
    save_model(model, tmp_path / "m", max_shard_size="1GB")
    same_state(model.state_dict(), load_state_dict(tmp_path / "m"))


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("500MB") == 500 * 10**6 and parse_size("2GB") == 2 * 10**9
    assert parse_size("1GiB") == 2**30 and parse_size("5gb") == 5 * 10**9
    with pytest.raises(ValueError):
        parse_size("lots")


def test_bin_folder_loads_and_pickles_are_refused(tmp_path, saved):
    model, _ = saved
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    same_state(sd, load_model(tmp_path / "bin").state_dict())

    # Sharded .bin with an index.
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    names = list(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    wm = {}
    for i, part in enumerate(halves, 1):
        fname = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, tmp_path / "bins" / fname)
        wm.update({k: fname for k in part})
    (tmp_path / "bins" / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    same_state(sd, load_state_dict(tmp_path / "bins"))

    # A pickle that would run code on load: weights_only refuses it, nothing runs.
    marker = tmp_path / "pwned"
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    torch.save({**sd, "x": _Evil(str(marker))}, tmp_path / "evil" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*weights_only"):
        load_model(tmp_path / "evil")
    assert not marker.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_safetensors_preferred_over_bin(tmp_path, saved):
    model, path = saved
    import shutil
    shutil.copytree(path, tmp_path / "both")
    torch.save({"junk": torch.zeros(1)}, tmp_path / "both" / "pytorch_model.bin")
    same_state(model.state_dict(), load_model(tmp_path / "both").state_dict())


# -- bad input ----------------------------------------------------------------------------------

def _folder_with(tmp_path, model, sd, name="bad"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    hf.save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_missing_tensor(tmp_path, saved):
    model, _ = saved
    sd = dict(model.state_dict())
    del sd["model.layers.1.attention.wo.weight"]
    folder = _folder_with(tmp_path, model, sd)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor\(s\) "
                                               r"model\.layers\.1\.attention\.wo\.weight"):
        load_model(folder)


def test_unexpected_tensor(tmp_path, saved):
    model, _ = saved
    sd = dict(model.state_dict())
    sd["model.layers.0.attention.wqkv_typo.weight"] = sd.pop("model.layers.0.attention.wqkv.weight")
    folder = _folder_with(tmp_path, model, sd)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor "
                                               r"'model\.layers\.0\.attention\.wqkv_typo\.weight'"):
        load_model(folder)


def test_wrong_shape(tmp_path, saved):
    model, _ = saved
    sd = dict(model.state_dict())
    sd["model.norm.weight"] = torch.ones(63)
    folder = _folder_with(tmp_path, model, sd)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = str(e.value)
    assert "model.safetensors" in msg and "'model.norm.weight'" in msg
    assert "[63]" in msg and "expected [64]" in msg


def test_integer_tensor_refused(tmp_path, saved):
    model, _ = saved
    sd = dict(model.state_dict())
    sd["model.norm.weight"] = torch.ones(64, dtype=torch.int8)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has dtype int8"):
        load_model(_folder_with(tmp_path, model, sd))
    with pytest.raises(ValueError, match="floating"):
        load_model(tmp_path / "bad", dtype=torch.int64)


def test_unknown_rope_scaling(tmp_path, saved):
    model, path = saved
    import shutil
    shutil.copytree(path, tmp_path / "rope")
    c = json.loads((tmp_path / "rope" / "config.json").read_text())
    c["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (tmp_path / "rope" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match=r"rope/config\.json.*'yarn'"):
        load_model(tmp_path / "rope")


def test_bad_config_json(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(CheckpointError, match=r"c/config\.json: file not found"):
        load_config(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text('{"hidden_size": 64,\n oops}')
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON at line 2"):
        load_config(tmp_path / "c")
    with pytest.raises(CheckpointError, match="nowhere: not a checkpoint folder"):
        load_model(tmp_path / "nowhere")


def test_truncated_safetensors(tmp_path, saved):
    model, path = saved
    import shutil
    shutil.copytree(path, tmp_path / "trunc")
    f = tmp_path / "trunc" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc/model\.safetensors: .*truncated or corrupt"):
        load_model(tmp_path / "trunc")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        model_info(tmp_path / "trunc")


def test_shard_missing_from_index(tmp_path, saved):
    model, _ = saved
    save_model(model, tmp_path / "sh", max_shard_size="30KB")
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "sh" / victim).unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "sh")
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and victim in msg and "does not exist" in msg
    first = next(k for k, v in index["weight_map"].items() if v == victim)
    assert repr(first) in msg


def test_index_names_tensor_absent_from_shard(tmp_path, saved):
    model, _ = saved
    save_model(model, tmp_path / "sh", max_shard_size="30KB")
    ipath = tmp_path / "sh" / "model.safetensors.index.json"
    index = json.loads(ipath.read_text())
    index["weight_map"]["model.extra.weight"] = next(iter(index["weight_map"].values()))
    ipath.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lacks tensor 'model\.extra\.weight'"):
        load_model(tmp_path / "sh")


# -- atomic save --------------------------------------------------------------------------------

def test_failed_save_leaves_existing_folder_untouched(tmp_path, saved, monkeypatch):
    model, _ = saved
    target = tmp_path / "out"
    save_model(model, target)
    (target / "tokenizer.model").write_bytes(b"tok")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    real = hf.save_file
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(hf, "save_file", failing)
    other = build_model(cfg(), seed=5)
    with pytest.raises(OSError, match="disk full"):
        save_model(other, target, max_shard_size="30KB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp folder left behind

    # A successful save replaces the weights and keeps the unrelated tokenizer file.
    monkeypatch.setattr(hf, "save_file", real)
    save_model(other, target, max_shard_size="30KB")
    assert (target / "tokenizer.model").read_bytes() == b"tok"
    assert not (target / "model.safetensors").exists()
    same_state(other.state_dict(), load_model(target).state_dict())
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_save_refuses_a_file_path(tmp_path, saved):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        save_model(saved[0], tmp_path / "f")


# -- generation config and tokenizer --------------------------------------------------------------

def test_generation_config():
    official = ModelConfig.preset("1.8b")
    g = generation_config_dict(official)
    assert g["eos_token_id"] == [2, 92542] and g["bos_token_id"] == 1 and g["pad_token_id"] == 2
    assert g["do_sample"] is True and g["temperature"] == 0.8 and g["top_p"] == 0.8
    assert g["max_new_tokens"] == 1024
    assert generation_config_dict(cfg())["eos_token_id"] == [2]  # tiny vocab: no <|im_end|>
    assert generation_config_dict(official, overrides={"temperature": 0.2})["temperature"] == 0.2


class _FakeTokenizer:
    bos_id, eos_id, pad_id, im_end_id = 1, 2, 2, 250

    def save(self, directory):
        Path(directory, "tokenizer.model").write_bytes(b"sp")
        Path(directory, "tokenizer_config.json").write_text("{}")


def test_save_with_tokenizer_and_info(tmp_path, saved):
    model, _ = saved
    save_model(model, tmp_path / "t", tokenizer=_FakeTokenizer())
    g = json.loads((tmp_path / "t" / "generation_config.json").read_text())
    assert g["eos_token_id"] == [2, 250]
    assert (tmp_path / "t" / "tokenizer.model").read_bytes() == b"sp"
    info = model_info(tmp_path / "t")
    assert info["num_params"] == model.num_params() == info["num_params_config"]
    assert info["layout"] == "internlm2" and info["dtype"] == "float32"
    assert [f["name"] for f in info["files"]] == ["model.safetensors"]
    json.dumps(info)


def test_cli(tmp_path, saved, capsys):
    import argparse
    _, path = saved
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    hf.add_cli(sub)
    args = parser.parse_args(["convert", str(path), str(tmp_path / "l"), "--to", "llama",
                              "--max-shard-size", "50KB"])
    assert args.func(args) == 0
    args = parser.parse_args(["info", "--model", str(tmp_path / "l"), "--json"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{"):])
    assert info["layout"] == "llama" and len(info["files"]) >= 3
    args = parser.parse_args(["info", "--model", str(path)])
    assert args.func(args) == 0
    assert "parameters" in capsys.readouterr().out


# -- LLaMA layout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(num_attention_heads=8, num_key_value_heads=2),
                                dict(bias=True), dict(num_key_value_heads=4)])
def test_llama_state_dict_round_trip(kw):
    config = cfg(**kw)
    model = randomize_norms(build_model(config, seed=3))
    sd = model.state_dict()
    llama = to_llama_state_dict(sd, config)
    nh, nkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    assert llama["model.layers.0.self_attn.q_proj.weight"].shape == (nh * d, 64)
    assert llama["model.layers.0.self_attn.k_proj.weight"].shape == (nkv * d, 64)
    assert ("model.layers.0.self_attn.v_proj.bias" in llama) == config.bias
    # Query head h of the LLaMA layout is slot h % g of KV group h // g in wqkv.
    g = config.q_per_kv
    wqkv = sd["model.layers.1.attention.wqkv.weight"].view(nkv, g + 2, d, 64)
    q = llama["model.layers.1.self_attn.q_proj.weight"].view(nh, d, 64)
    k = llama["model.layers.1.self_attn.k_proj.weight"].view(nkv, d, 64)
    assert torch.equal(q[nh - 1], wqkv[nkv - 1, g - 1]) and torch.equal(k[1], wqkv[1, g])
    same_state(sd, from_llama_state_dict(llama, config))


def test_dynamic_theta_check_value():
    c = ModelConfig.preset("7b", rope_scaling={"type": "dynamic", "factor": 2.0})
    assert c.head_dim == 128
    assert rope_theta(c, 65536) == pytest.approx(3.05e6, rel=5e-3)
    assert rope_theta(c, 32768) == 1e6


def _hf_logits(folder, ids_list):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = ({"dtype": torch.float32} if int(transformers.__version__.split(".")[0]) >= 5
              else {"torch_dtype": torch.float32})
        ref = transformers.LlamaForCausalLM.from_pretrained(folder, **kw).eval()
    with torch.no_grad():
        return [ref(ids).logits.float() for ids in ids_list]


@pytest.mark.parametrize("kw,seq_lens", [
    (dict(), [40, 150]),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), [40, 150]),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), [40, 150]),
    (dict(num_attention_heads=8, num_key_value_heads=2, bias=True,
          rope_scaling={"type": "dynamic", "factor": 3.0}), [40, 150]),
])
def test_parity_with_transformers_llama(tmp_path, kw, seq_lens):
    """Ours -> save -> convert to LLaMA -> transformers' LlamaForCausalLM: same logits."""
    config = cfg(num_hidden_layers=3, **kw)
    model = randomize_norms(build_model(config, seed=7)).eval()
    save_model(model, tmp_path / "ours")
    convert_checkpoint(tmp_path / "ours", tmp_path / "llama", to="llama")
    lc = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert lc["model_type"] == "llama" and lc["head_dim"] == config.head_dim
    assert (tmp_path / "llama" / "generation_config.json").exists()
    g = torch.Generator().manual_seed(0)
    ids_list = [torch.randint(0, config.vocab_size, (1, t), generator=g) for t in seq_lens]
    theirs = _hf_logits(tmp_path / "llama", ids_list)
    with torch.no_grad():
        for ids, ref in zip(ids_list, theirs):
            ours = model(ids)
            assert (ours - ref).abs().max().item() < 1e-4, ids.shape
    if kw.get("rope_scaling", {}).get("type") == "dynamic":
        # Above max_position_embeddings the scaling must have changed the logits.
        plain = randomize_norms(build_model(cfg(num_hidden_layers=3, **{**kw, "rope_scaling": None}),
                                            seed=7)).eval()
        with torch.no_grad():
            assert torch.allclose(plain(ids_list[0]), model(ids_list[0]), atol=1e-5)
            assert not torch.allclose(plain(ids_list[1]), model(ids_list[1]), atol=1e-3)

    # Back to InternLM2: bit-exact, and it loads as the same config.
    convert_checkpoint(tmp_path / "llama", tmp_path / "back", to="internlm2", max_shard_size="60KB")
    same_state(model.state_dict(), load_state_dict(tmp_path / "back"))
    assert load_config(tmp_path / "back") == config
    assert load_config(tmp_path / "llama") == config
    # And load_model reads the LLaMA folder directly.
    same_state(model.state_dict(), load_model(tmp_path / "llama").state_dict())


def test_llama_config_accepted_by_transformers():
    transformers = pytest.importorskip("transformers")
    config = cfg(rope_scaling={"type": "dynamic", "factor": 2.0}, bias=True)
    lc = transformers.LlamaConfig.from_dict(llama_config_dict(config))
    assert lc.rope_parameters["rope_type"] == "dynamic" and lc.rope_parameters["factor"] == 2.0
    assert lc.rope_parameters["rope_theta"] == 10000.0 and lc.attention_bias is True
    assert lc.head_dim == 16 and lc.num_key_value_heads == 2


def test_load_folder_saved_by_transformers(tmp_path):
    """A LLaMA folder written by transformers' save_pretrained loads and gives its logits."""
    transformers = pytest.importorskip("transformers")
    config = cfg(num_attention_heads=8, num_key_value_heads=2,
                 rope_scaling={"type": "dynamic", "factor": 2.0})
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(llama_config_dict(config)))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    ref.eval().save_pretrained(tmp_path / "t")
    ours = load_model(tmp_path / "t")
    assert ours.config == config
    ids = torch.randint(0, 256, (1, 100))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < 1e-4


def test_transformers5_style_config_reads(tmp_path):
    """A config.json as transformers 5 writes it: theta inside rope_parameters."""
    d = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64,
         "head_dim": 16, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
         "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
         "dtype": "bfloat16", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = load_config(tmp_path)
    assert c.rope_theta == 5e5 and c.rope_scaling == {"type": "linear", "factor": 4.0}
    assert c.extra == {}
    d["head_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="head_dim"):
        load_config(tmp_path)


def test_convert_copies_tokenizer_files_and_checks_layout(tmp_path, saved):
    model, path = saved
    import shutil
    shutil.copytree(path, tmp_path / "src")
    (tmp_path / "src" / "tokenizer.model").write_bytes(b"sp")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "src" / "notes.txt").write_text("x")
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", to="llama")
    names = set(os.listdir(tmp_path / "dst"))
    assert {"tokenizer.model", "tokenizer_config.json", "generation_config.json",
            "config.json", "model.safetensors"} <= names and "notes.txt" not in names
    # A LLaMA folder lacking a k_proj is reported with the LLaMA name and the file.
    sd = load_state_dict(tmp_path / "dst")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    (tmp_path / "bad").mkdir()
    shutil.copy(tmp_path / "dst" / "config.json", tmp_path / "bad")
    hf.save_file(sd, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor\(s\) "
                                               r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(tmp_path / "bad")
    with pytest.raises(ValueError, match="to must be"):
        convert_checkpoint(tmp_path / "src", tmp_path / "x", to="gguf")
