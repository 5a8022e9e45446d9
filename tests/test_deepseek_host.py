"""DeepSeekMoE (model_type "deepseek", remote code only) loads exactly into Qwen2MoeForCausalLM.

A tiny checkpoint in the hub layout of deepseek-ai/deepseek-moe-16b-base (config field names,
weight keys, byte-level tokenizer declared as LlamaTokenizerFast) is loaded through
``load_model`` without remote code; its logits must equal a forward written here from the
DeepSeekMoE equations (arXiv 2401.06066 sec. 3; modeling_deepseek.py).
"""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hetmoe_core.hosts import host_for
from hetmoe_core.models import load_model

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# The real 16B config's fields (sizes shrunk): 64 -> 8 routed experts, top-6 -> top-3.
BASE = dict(
    architectures=["DeepseekForCausalLM"], model_type="deepseek",
    auto_map={"AutoConfig": "configuration_deepseek.DeepseekConfig",
              "AutoModel": "modeling_deepseek.DeepseekModel",
              "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
    attention_bias=False, attention_dropout=0.0, aux_loss_alpha=0.001, bos_token_id=260, eos_token_id=261,
    first_k_dense_replace=1, hidden_act="silu", hidden_size=32, initializer_range=0.02,
    intermediate_size=48, max_position_embeddings=64, moe_intermediate_size=8, moe_layer_freq=1,
    n_routed_experts=8, n_shared_experts=2, norm_topk_prob=False, num_attention_heads=4,
    num_experts_per_tok=3, num_hidden_layers=3, num_key_value_heads=4, pretraining_tp=1,
    rms_norm_eps=1e-6, rope_scaling=None, rope_theta=10000, scoring_func="softmax", seq_aux=True,
    tie_word_embeddings=False, torch_dtype="float32", use_cache=True, vocab_size=264)


def _is_moe(cfg, i):  # DeepseekDecoderLayer's rule
    return i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0


def _weights(cfg, seed=0):
    """Random weights under the DeepSeekMoE hub keys (shared experts: one MLP of width n*I)."""
    g = torch.Generator().manual_seed(seed)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    r = lambda *s, scale=0.2: torch.randn(*s, generator=g) * scale
    sd = {"model.embed_tokens.weight": r(V, H, scale=1.0), "model.norm.weight": 1 + r(H, scale=0.1),
          "lm_head.weight": r(V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n in "qkvo":
            sd[p + f"self_attn.{n}_proj.weight"] = r(H, H)
        sd[p + "input_layernorm.weight"] = 1 + r(H, scale=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + r(H, scale=0.1)
        mlps = {"mlp.": cfg["intermediate_size"]}
        if _is_moe(cfg, i):
            sd[p + "mlp.gate.weight"] = r(cfg["n_routed_experts"], H, scale=1.0)
            I = cfg["moe_intermediate_size"]
            mlps = {f"mlp.experts.{e}.": I for e in range(cfg["n_routed_experts"])}
            mlps["mlp.shared_experts."] = I * cfg["n_shared_experts"]
        for m, I in mlps.items():
            sd[p + m + "gate_proj.weight"], sd[p + m + "up_proj.weight"] = r(I, H), r(I, H)
            sd[p + m + "down_proj.weight"] = r(H, I)
    return sd


def _tokenizer_files(folder):
    """A byte-level BPE tokenizer.json declared as LlamaTokenizerFast, as DeepSeek ships it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("h", "e"), ("he", "l"), ("Ġ", "w"), ("Ġw", "o")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])  # ids 260, 261
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 260)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        add_bos_token=True, add_eos_token=False, bos_token=BOS, eos_token=EOS, pad_token=EOS,
        clean_up_tokenization_spaces=False, legacy=True, model_max_length=64,
        tokenizer_class="LlamaTokenizerFast")))
    return tok


def _checkpoint(tmp_path, **over):
    cfg = {**BASE, **over}
    save_file(_weights(cfg), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return cfg, _tokenizer_files(tmp_path)


def reference_logits(sd, cfg, ids):
    """DeepSeekMoE forward from its equations, float64. ids [B, T] -> logits [B, T, V]."""
    sd = {k: v.double() for k, v in sd.items()}
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    d, eps, k = H // nh, cfg["rms_norm_eps"], cfg["num_experts_per_tok"]
    factor = (cfg["rope_scaling"] or {}).get("factor", 1.0)  # linear RoPE scaling: positions / factor

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def swiglu(x, p):  # down(silu(gate x) * up x)
        g, u, dn = (sd[p + f"{n}_proj.weight"] for n in ("gate", "up", "down"))
        return (F.silu(x @ g.T) * (x @ u.T)) @ dn.T

    T = ids.shape[1]
    ang = (torch.arange(T, dtype=torch.float64) / factor)[:, None] \
        / cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # [T, d]

    def rope(x):  # [B, nh, T, d]; rotate_half pairs dim j with j + d/2
        return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin

    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q, kk, v = ((h @ sd[p + f"self_attn.{n}_proj.weight"].T).view(*ids.shape, nh, d).transpose(1, 2)
                    for n in "qkv")
        q, kk = rope(q), rope(kk)
        att = torch.softmax(q @ kk.transpose(-1, -2) / d ** 0.5 + causal, -1) @ v
        x = x + att.transpose(1, 2).reshape(*ids.shape, H) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        if not _is_moe(cfg, i):
            x = x + swiglu(h, p + "mlp.")
            continue
        s = torch.softmax(h @ sd[p + "mlp.gate.weight"].T, -1)  # affinities over all routed experts
        w, idx = s.topk(k, -1)
        if cfg["norm_topk_prob"] and k > 1:
            w = w / w.sum(-1, keepdim=True)
        routed = torch.zeros_like(h)
        for b in range(ids.shape[0]):
            for t in range(T):
                for j in range(k):
                    e = int(idx[b, t, j])
                    routed[b, t] += w[b, t, j] * swiglu(h[b, t], p + f"mlp.experts.{e}.")
        x = x + routed + swiglu(h, p + "mlp.shared_experts.")
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("variant", [
    {},  # the 16B layout: first layer dense, softmax top-k without renormalisation
    dict(num_hidden_layers=4, moe_layer_freq=2, norm_topk_prob=True,
         rope_scaling={"type": "linear", "factor": 2.0}),
])
def test_hosted_logits_match_deepseekmoe_equations(tmp_path, variant):
    cfg, tok = _checkpoint(tmp_path, **variant)
    lm = load_model(str(tmp_path))  # trust_remote_code stays False
    assert type(lm.model).__name__ == "Qwen2MoeForCausalLM"
    ids = torch.tensor([tok.encode("hello world, hello!").ids[:9], [260, 5, 77, 130, 9, 250, 3, 263, 41]])
    with torch.no_grad():
        got = lm.model(ids).logits
    want = reference_logits(_weights(cfg), cfg, ids)
    assert got.dtype == torch.float32 and want.abs().max() > 1.0
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    for i, layer in enumerate(lm.model.model.layers):  # the gate absent from the checkpoint is exactly 0
        if _is_moe(cfg, i):
            assert torch.count_nonzero(layer.mlp.shared_expert_gate.weight) == 0


def test_anatomy_and_tokenizer(tmp_path):
    cfg, tok = _checkpoint(tmp_path)
    lm = load_model(str(tmp_path))
    s = lm.anatomy.summary()
    assert s["family"] == "qwen2_moe" and s["host"] == "deepseek→qwen2_moe"
    assert s["moe_layers"] == [1, 2] and s["dense_mlp_layers"] == 1
    assert s["experts_per_layer"] == [8] and s["top_k"] == [3] and s["shared_experts_per_layer"] == 2
    assert s["expert_intermediate_size"] == 8 and s["hidden_size"] == 32
    assert lm.anatomy.modules["shared_experts"] == tuple(
        f"model.layers.{i}.mlp.{n}" for i in (1, 2) for n in ("shared_expert", "shared_expert_gate"))
    sd = _weights(cfg)
    m = lm.anatomy.moe_layers[1]  # fused expert views hold the checkpoint's per-expert weights
    assert torch.equal(m.gate(5), sd["model.layers.2.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(m.up(5), sd["model.layers.2.mlp.experts.5.up_proj.weight"])
    assert torch.equal(m.down(5), sd["model.layers.2.mlp.experts.5.down_proj.weight"])
    assert torch.equal(m.router_weight(), sd["model.layers.2.mlp.gate.weight"])
    # byte-level tokenizer kept (transformers 5's LlamaTokenizer would drop the spaces)
    text = "hello world, hello!"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) == 13 and lm.tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert lm.tokenizer(text)["input_ids"] == [260] + ids and lm.tokenizer.bos_token_id == cfg["bos_token_id"]
    assert lm.tokenizer.decode(lm.tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("bad, says", [
    (dict(scoring_func="sigmoid"), "scoring_func 'sigmoid'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling type 'dynamic'"),
    (dict(n_shared_experts=None), "n_shared_experts"),
])
def test_unsupported_variant_is_refused(bad, says):
    with pytest.raises(ValueError, match=f"cannot be hosted exactly.*{says}"):
        host_for({**BASE, **bad})
    assert host_for({**BASE, "model_type": "qwen2_moe"}) is None  # built-in types need no host


def test_refusal_reaches_load_model(tmp_path):
    _checkpoint(tmp_path, scoring_func="sigmoid")
    with pytest.raises(ValueError, match="Qwen2MoeForCausalLM: scoring_func 'sigmoid'"):
        load_model(str(tmp_path))


def test_weights_not_in_config_layout_are_refused(tmp_path):
    """A config that disagrees with the weights must not load with randomly initialised parts."""
    _checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "first_k_dense_replace": 2}))
    with pytest.raises(ValueError, match="not in the DeepSeekMoE layout .*model.layers.1.mlp"):
        load_model(str(tmp_path))
