import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from hetmoe_core.models import (FAMILIES, KINDS, TINY_FAMILIES, _tiny_tokenizer, anatomy_of,
                                load_model, tiny_model)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_views_share_storage_and_counts_add_up(family):
    model = tiny_model(family)
    a = anatomy_of(model)
    assert a.family == family and a.moe_layers
    assert sum(a.param_counts.values()) == sum(p.numel() for p in model.parameters())
    assert set(a.param_counts) == set(KINDS)
    routed = 0
    for m in a.moe_layers:
        ex = m.experts
        fused = ex.gate_up_proj if m.gated else ex.up_proj
        I, H = m.intermediate_size, m.hidden_size
        assert m.router_weight().shape == (m.num_experts, H)
        for e in range(m.num_experts):
            g, u, d = m.gate(e), m.up(e), m.down(e)
            assert u.shape == (I, H) and d.shape == (H, I) and g.shape == (I, H)
            assert u.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
            assert d.untyped_storage().data_ptr() == ex.down_proj.untyped_storage().data_ptr()
            # the views equal the slices the family's own forward uses
            gu = fused[e].T if m.transposed else fused[e]
            ref_g, ref_u = (gu[0::2], gu[1::2]) if m.interleaved else (gu[:I], gu[I:])
            assert torch.equal(g, ref_g) and torch.equal(u, ref_u)
            assert torch.equal(d, ex.down_proj[e].T if m.transposed else ex.down_proj[e])
        routed += sum(p.numel() for p in ex.parameters())
    assert a.param_counts["routed_experts"] == routed
    assert a.param_counts["embeddings"] == model.get_input_embeddings().weight.numel()


def test_views_write_through():
    model = tiny_model("olmoe")
    m = anatomy_of(model).moe_layers[1]
    with torch.no_grad():
        m.up(3)[2, 5] = 7.0
    I = m.intermediate_size
    assert model.model.layers[1].mlp.experts.gate_up_proj[3, I + 2, 5].item() == 7.0


def test_gpt_oss_gate_matches_its_forward():
    """The interleaved gate/up split must be the one GptOssExperts applies."""
    model = tiny_model("gpt_oss")
    m = anatomy_of(model).moe_layers[0]
    x = torch.randn(3, m.hidden_size)
    gate_up = x @ m.experts.gate_up_proj[1] + m.experts.gate_up_proj_bias[1]
    assert torch.allclose(gate_up[:, ::2], x @ m.gate(1).T + m.experts.gate_up_proj_bias[1][::2])
    assert torch.allclose(gate_up[:, 1::2], x @ m.up(1).T + m.experts.gate_up_proj_bias[1][1::2])


def test_shared_and_dense_modules_found():
    a = anatomy_of(tiny_model("qwen2_moe"))
    assert a.modules["dense_mlp"] == ("model.layers.0.mlp",)
    assert "model.layers.1.mlp.shared_expert" in a.modules["shared_experts"]
    assert [m.layer for m in a.moe_layers] == [1, 2]
    a = anatomy_of(tiny_model("granitemoeshared"))
    assert a.modules["shared_experts"] == ("model.layers.0.shared_mlp", "model.layers.1.shared_mlp")
    a = anatomy_of(tiny_model("deepseek_v3"))
    assert a.shared_experts_per_layer == 1 and a.modules["dense_mlp"] == ("model.layers.0.mlp",)


def test_dense_model_gets_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*supported MoE families: .*olmoe"):
        anatomy_of(dense)


def _save(model, folder):
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)


def test_save_and_reload_folder(tmp_path):
    model = tiny_model("mixtral", seed=3)
    _save(model, tmp_path)
    lm = load_model(str(tmp_path))
    for (n, p), (_, q) in zip(model.named_parameters(), lm.model.named_parameters()):
        assert torch.equal(p, q), n
    assert lm.fingerprint.startswith("sha256:") and lm.anatomy.family == "mixtral"


def test_old_per_expert_layout_loads(tmp_path):
    """OLMoE-1B-7B on the hub stores one tensor per expert; loading must fuse them."""
    ref = tiny_model("olmoe", seed=1)
    a = anatomy_of(ref)
    sd = {}
    for n, p in ref.state_dict().items():
        if ".experts." not in n:
            sd[n] = p.contiguous()
    for m in a.moe_layers:
        for e in range(m.num_experts):
            k = f"{m.experts_name}.{e}"
            sd[f"{k}.gate_proj.weight"] = m.gate(e).contiguous()
            sd[f"{k}.up_proj.weight"] = m.up(e).contiguous()
            sd[f"{k}.down_proj.weight"] = m.down(e).contiguous()
    assert "model.layers.0.mlp.experts.5.gate_proj.weight" in sd
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ref.config.save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(lm.model(x).logits, ref(x).logits)
    assert torch.equal(lm.anatomy.moe_layers[1].down(7), a.moe_layers[1].down(7))


@pytest.mark.parametrize("source, msg", [
    ("", "empty model source"),
    ("./no/such/folder", "not a folder with a model"),
    ("a/b/c", "neither a local folder nor a hub id"),
])
def test_bad_sources(source, msg):
    with pytest.raises(ValueError, match=msg):
        load_model(source)


def test_folder_without_safetensors_is_refused(tmp_path):
    tiny_model("olmoe").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="not a folder with a model"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="not a folder with a model"):
        load_model(str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny:olmoe", dtype="int8")


def test_every_family_is_in_the_table():
    assert set(TINY_FAMILIES) <= set(FAMILIES)


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "hetmoe_core", *args], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def test_cli_info_json():
    rc, out, _ = _cli("info", "tiny:deepseek_v2", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["family"] == "deepseek_v2" and info["moe_layers"] == [1, 2]
    assert info["experts_per_layer"] == [8] and info["top_k"] == [2] and info["dense_mlp_layers"] == 1
    assert sum(info["param_counts"].values()) == info["total_params"]


def test_cli_bad_source_is_one_line():
    rc, out, err = _cli("info", "/no/such/dir")
    assert rc == 2 and err.startswith("error:") and "Traceback" not in err


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="hub is unreachable offline"):
        load_model("allenai/OLMoE-1B-7B-0924")


def test_damaged_weights_and_bad_device_are_clear_errors(tmp_path):
    tiny_model("olmoe").config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="safetensors file is damaged"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="not a torch device"):
        load_model("tiny:olmoe", device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            load_model("tiny:olmoe", device="cuda")
