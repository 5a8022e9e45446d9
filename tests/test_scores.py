"""MaxNNScore / Router Norm: in-memory vs an independent per-expert loop, streaming vs in-memory."""
import os
import time
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hetmoe_core.models import TINY_FAMILIES, anatomy_of, tiny_model
from hetmoe_core.scores import expert_scores, random_scores, stream_scores, strategy_scores


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f, seed=1) for f in TINY_FAMILIES}


def _loop_maxnn(m, e):
    """Independent reference: copy each projection of expert e, take neuron norms one by one."""
    gate, up, down = m.gate(e), m.up(e).detach().clone(), m.down(e).detach().clone()
    projs = {"up": [float(up[i].norm()) for i in range(up.shape[0])],
             "down": [float(down[:, i].norm()) for i in range(down.shape[1])]}
    if gate is not None:
        gate = gate.detach().clone()
        projs["gate"] = [float(gate[i].norm()) for i in range(gate.shape[0])]
    return projs, float(np.prod([max(v) for v in projs.values()]))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_maxnn_equals_per_expert_loop(models, family):
    a = anatomy_of(models[family])
    s = expert_scores(a)
    assert len(s.layers) == len(a.moe_layers)
    for m, ls in zip(a.moe_layers, s.layers):
        assert ls.layer == m.layer and ls.maxnn.shape == (m.num_experts,)
        for e in range(m.num_experts):
            projs, ref = _loop_maxnn(m, e)
            assert set(projs) == set(ls.neuron_norms) == ({"gate", "up", "down"} if m.gated else {"up", "down"})
            for p, v in projs.items():
                np.testing.assert_allclose(ls.neuron_norms[p][e], v, rtol=1e-5)
                assert ls.proj_max[p][e] == pytest.approx(max(v), rel=1e-5)
            assert ls.maxnn[e] == pytest.approx(ref, rel=1e-5)
        rows = m.router_weight().detach().clone()
        np.testing.assert_allclose(ls.router_norm, [float(r.norm()) for r in rows], rtol=1e-5)
        # experts were drawn with different scales, so the scores must differ
        assert ls.maxnn.max() > 1.5 * ls.maxnn.min()


def test_gpt_oss_uses_interleaved_transposed_layout(models):
    m = anatomy_of(models["gpt_oss"]).moe_layers[0]
    ls = expert_scores(anatomy_of(models["gpt_oss"])).layers[0]
    raw = m.experts.gate_up_proj.detach()            # [E, H, 2I], gate = even columns
    np.testing.assert_allclose(ls.neuron_norms["gate"], raw[:, :, ::2].norm(dim=1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ls.neuron_norms["up"], raw[:, :, 1::2].norm(dim=1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ls.neuron_norms["down"], m.experts.down_proj.detach().norm(dim=2).numpy(), rtol=1e-6)


def _assert_same(a, b):
    assert [x.layer for x in a.layers] == [y.layer for y in b.layers]
    for x, y in zip(a.layers, b.layers):
        assert set(x.neuron_norms) == set(y.neuron_norms)
        for p in x.neuron_norms:
            np.testing.assert_allclose(x.neuron_norms[p], y.neuron_norms[p], rtol=1e-6)
        np.testing.assert_allclose(x.maxnn, y.maxnn, rtol=1e-5)
        np.testing.assert_allclose(x.router_norm, y.router_norm, rtol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_streaming_equals_in_memory_hub_layout(models, family, tmp_path):
    """save_pretrained writes each family's hub layout (OLMoE per-expert, Mixtral w1/w3/w2, Granite, GPT-OSS)."""
    models[family].save_pretrained(tmp_path)
    _assert_same(stream_scores(tmp_path), expert_scores(anatomy_of(models[family])))


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_streaming_equals_in_memory_fused_layout(models, family, tmp_path):
    """transformers-5 fused keys (...mlp.experts.gate_up_proj), split over two shards, small expert chunks."""
    model = models[family]
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, str(tmp_path / "a.safetensors"))
    save_file({k: sd[k] for k in keys[1::2]}, str(tmp_path / "b.safetensors"))
    model.config.to_json_file(str(tmp_path / "config.json"))
    seen = []
    s = stream_scores(tmp_path, chunk_bytes=1000, progress=lambda d, t: seen.append((d, t)))
    _assert_same(s, expert_scores(anatomy_of(model)))
    assert seen[-1][0] == seen[-1][1] and len(seen) >= 3


def test_streaming_per_expert_bf16(tmp_path):
    """bf16 checkpoint in the OLMoE hub layout, written by hand: norms accumulate in float32."""
    g = torch.Generator().manual_seed(0)
    E, I, H = 3, 5, 7
    w = {"gate": torch.randn(E, I, H, generator=g), "up": torch.randn(E, I, H, generator=g),
         "down": torch.randn(E, H, I, generator=g) * 3}
    sd = {f"model.layers.1.mlp.experts.{e}.{p}_proj.weight": w[p][e].bfloat16() for e in range(E) for p in w}
    sd["model.layers.1.mlp.gate.weight"] = torch.randn(E, H, generator=g).bfloat16()
    sd["model.layers.0.mlp.gate_proj.weight"] = torch.randn(I, H, generator=g).bfloat16()   # dense layer: ignored
    save_file(sd, str(tmp_path / "model.safetensors"))
    s = stream_scores(tmp_path)
    assert len(s.layers) == 1 and s.layers[0].layer == 1 and s.layers[0].moe_index == 0
    ref = np.prod([w[p].bfloat16().float().norm(dim=2 if p != "down" else 1).max(dim=1).values.numpy()
                   for p in w], axis=0)
    np.testing.assert_allclose(s.layers[0].maxnn, ref, rtol=1e-5)


def test_streaming_errors(tmp_path):
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        stream_scores(tmp_path)
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no routed-expert tensors"):
        stream_scores(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        stream_scores(tmp_path / "model.safetensors")


def test_strategy_scores_and_random():
    a = random_scores([4, 4], seed=3)
    b = random_scores([4, 4], seed=3)
    assert all((x == y).all() for x, y in zip(a, b)) and not (a[0] == random_scores([4, 4], seed=4)[0]).all()
    with pytest.raises(ValueError, match="unknown strategy"):
        strategy_scores("norm", num_experts=[4])
    with pytest.raises(ValueError, match="needs activation statistics"):
        strategy_scores("frequency", num_experts=[4])
    with pytest.raises(ValueError, match="needs expert scores"):
        strategy_scores("maxnn", num_experts=[4])


def test_streaming_fused_ungated(tmp_path):
    """An ungated fused layout (experts.up_proj [E, I, H]) gives up and down maxima only."""
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(4, 6, 5, generator=g), torch.randn(4, 5, 6, generator=g)
    save_file({"model.layers.0.mlp.experts.up_proj": up, "model.layers.0.mlp.experts.down_proj": down,
               "model.layers.0.mlp.gate.weight": torch.randn(4, 5, generator=g)}, str(tmp_path / "m.safetensors"))
    ls = stream_scores(tmp_path).layers[0]
    assert set(ls.neuron_norms) == {"up", "down"}
    np.testing.assert_allclose(ls.maxnn, (up.norm(dim=2).amax(1) * down.norm(dim=1).amax(1)).numpy(), rtol=1e-6)


def test_cli_scores(capsys, tmp_path):
    import json
    from hetmoe_core.cli import main
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "The cat sat on the mat.", "domain": "prose"}\n'
                     '{"text": "x = 1 + 2", "domain": "code"}\n')
    assert main(["scores", "tiny:olmoe", "--json", "--calib", str(calib), "--cache-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = expert_scores(anatomy_of(tiny_model("olmoe")))
    assert out["source"] == "tiny:olmoe" and out["calibration"]["domains"] == ["prose", "code"]
    assert len(out["layers"]) == 2
    for lo, ls in zip(out["layers"], ref.layers):
        np.testing.assert_allclose(lo["maxnn"], ls.maxnn, rtol=1e-6)
        np.testing.assert_allclose(lo["proj_max"]["down"], ls.proj_max["down"], rtol=1e-6)
        np.testing.assert_allclose(lo["router_norm"], ls.router_norm, rtol=1e-6)
        assert sum(lo["frequency"]) == pytest.approx(2.0) and len(lo["weight"]) == 8
    tiny_model("olmoe").save_pretrained(tmp_path / "ckpt")
    assert main(["scores", str(tmp_path / "ckpt"), "--stream", "--json"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(streamed["layers"][1]["maxnn"], ref.layers[1].maxnn, rtol=1e-5)
    assert main(["scores", "tiny:olmoe", "--calib", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: calibration file") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_streaming_threads_give_the_same_bits(models, family, tmp_path):
    """Worker threads only change who reduces which tensor: 1 and 3 threads agree bit for bit, per-expert and
    fused layouts (fused: slices of one expert, so several jobs per tensor)."""
    models[family].save_pretrained(tmp_path / "hub")
    sd = {k: v.detach().clone().contiguous() for k, v in models[family].state_dict().items()}
    (tmp_path / "fused").mkdir()
    save_file(sd, str(tmp_path / "fused" / "model.safetensors"))
    models[family].config.to_json_file(str(tmp_path / "fused" / "config.json"))
    for folder, chunk in (("hub", 64 << 20), ("fused", 1000)):
        one, three = (stream_scores(tmp_path / folder, threads=n, chunk_bytes=chunk) for n in (1, 3))
        for x, y in zip(one.layers, three.layers):
            assert x.layer == y.layer and set(x.neuron_norms) == set(y.neuron_norms)
            for p in x.neuron_norms:
                assert np.array_equal(x.neuron_norms[p], y.neuron_norms[p])
            assert np.array_equal(x.router_norm, y.router_norm)
        _assert_same(three, expert_scores(anatomy_of(models[family])))


def test_streaming_equals_in_memory_bit_for_bit_at_real_widths(tmp_path):
    """bf16 OLMoE with rows of 512 and 256 (blocks above torch's parallel grain, so the in-memory reduction runs
    on 2 threads while streaming workers run 1): per-expert and fused files give exactly the in-memory numbers,
    which match float64 norms of the bf16 weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("olmoe", vocab_size=64, hidden_size=512, intermediate_size=256, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 + 0.02 * torch.rand(p.shape[:1], generator=g)
                                                          ).view(-1, *[1] * (p.dim() - 1)))
    model.save_pretrained(tmp_path / "hub")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "fused.safetensors"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = expert_scores(anatomy_of(model)).layers[0]
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused.safetensors").rename(tmp_path / "fused" / "model.safetensors")
    for s in (stream_scores(tmp_path / "hub", threads=2), stream_scores(tmp_path / "fused", threads=3,
                                                                          chunk_bytes=300_000)):
        got = s.layers[0]
        for p in ("gate", "up", "down"):
            assert np.array_equal(got.neuron_norms[p], ref.neuron_norms[p]), p
        assert np.array_equal(got.router_norm, ref.router_norm) and np.array_equal(got.maxnn, ref.maxnn)
    seen = []                                                        # the workers' setting did not leak into
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))   # threads started later
    t.start(), t.join()
    assert seen == [threads]
    m = anatomy_of(model).moe_layers[0]
    down = m.experts.down_proj.detach().double()                     # [E, H, I]: a neuron's output is a column
    np.testing.assert_allclose(ref.neuron_norms["down"], down.norm(dim=1).numpy(), rtol=1e-6)
    assert ref.maxnn.max() > 1.2 * ref.maxnn.min()


def _linux_at_least(major: int, minor: int) -> bool:
    try:
        return os.uname().sysname == "Linux" and tuple(map(int, os.uname().release.split(".")[:2])) >= (major, minor)
    except ValueError:
        return False


@pytest.mark.skipif(not _linux_at_least(6, 5), reason="cachestat(2) is Linux 6.5+")
def test_streaming_read_ahead_hands_cached_jobs_to_no_reader(tmp_path):
    """A warm rerun (every page of every job in the page cache, per cachestat) starts no read-ahead thread; a job
    whose pages were evicted reads as not cached while its neighbours still do."""
    from hetmoe_core.shards import _Files, _cached, _jobs, _plan, _shards
    g = torch.Generator().manual_seed(4)
    sd = {f"model.layers.0.mlp.experts.{e}.{n}.weight": torch.randn(512, 512, generator=g).to(torch.bfloat16)
          for e in range(4) for n in ("gate_proj", "up_proj", "down_proj")}
    sd["model.layers.0.mlp.gate.weight"] = torch.randn(4, 512, generator=g).to(torch.bfloat16)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    assert len(path.read_bytes()) > 6 << 20                       # every page in the page cache
    jobs = _jobs(_plan(_shards(tmp_path)), 1 << 20)
    files = _Files(jobs)
    try:
        assert len(jobs) >= 6 and all(_cached(files.fd(j.file), j.start, j.nbytes) for j in jobs)
        files.advise(0)
        assert files.next == len(jobs) and files.ahead is None
    finally:
        files.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        j = jobs[3]
        for _ in range(20):    # eviction is the kernel's best effort (writeback still running): ask again
            os.fsync(fd)
            os.posix_fadvise(fd, j.start, j.nbytes, os.POSIX_FADV_DONTNEED)
            if not _cached(fd, j.start, j.nbytes):
                break
            time.sleep(0.1)
        assert not _cached(fd, j.start, j.nbytes) and _cached(fd, jobs[0].start, jobs[0].nbytes)
    finally:
        os.close(fd)


@pytest.mark.skipif(not (hasattr(os, "posix_fadvise") and hasattr(os, "RWF_NOWAIT")), reason="Linux page cache API")
def test_streaming_read_ahead_brings_evicted_jobs_into_the_page_cache(tmp_path):
    """The read-ahead thread (faults through MADV_HUGEPAGE mappings, never posix_fadvise: its 4 KiB folios made warm
    reruns slower) reads every queued job of a file evicted from the page cache; reading it changes no number."""
    from hetmoe_core.shards import _Files, _cached, _jobs, _plan, _shards
    g = torch.Generator().manual_seed(3)
    sd = {"model.layers.0.mlp.gate.weight": torch.randn(4, 512, generator=g).to(torch.bfloat16)}
    for e in range(4):
        for n, shape in (("gate_proj", (1024, 512)), ("up_proj", (1024, 512)), ("down_proj", (512, 1024))):
            sd[f"model.layers.0.mlp.experts.{e}.{n}.weight"] = torch.randn(*shape, generator=g).to(torch.bfloat16)
    save_file(sd, str(tmp_path / "model.safetensors"))
    jobs = _jobs(_plan(_shards(tmp_path)), 2 << 20)
    fd = os.open(tmp_path / "model.safetensors", os.O_RDONLY)
    probe = bytearray(1)

    def cached(at):
        if _linux_at_least(6, 5):    # cachestat: a preadv(RWF_NOWAIT) probe starts a read-ahead that may finish
            return _cached(fd, at, 1)  # before the next probe (this test failed ~1 run in 13 that way)
        try:
            return os.preadv(fd, [probe], at, os.RWF_NOWAIT) == 1
        except BlockingIOError:
            return False
    try:
        middles = [j.start + j.nbytes // 2 for j in jobs]
        for _ in range(20):    # eviction is the kernel's best effort (writeback still running): ask again
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not cached(middles[-1]):
                break
            time.sleep(0.1)
        assert len(jobs) >= 6 and not cached(middles[-1])      # evicted
        files = _Files(jobs, window=64 << 20)
        files.advise(0)
        files.ahead.shutdown(wait=True)                        # all jobs were handed over before job 0 was queued
        files.close()
        assert all(cached(m) for m in middles)
    finally:
        os.close(fd)
    ref = stream_scores(tmp_path, threads=1, chunk_bytes=64 << 20).layers[0]
    got = stream_scores(tmp_path, threads=2, chunk_bytes=2 << 20).layers[0]
    for p in ("gate", "up", "down"):
        assert np.array_equal(got.neuron_norms[p], ref.neuron_norms[p])
    w = sd["model.layers.0.mlp.experts.2.down_proj.weight"].double()
    np.testing.assert_allclose(got.neuron_norms["down"][2], w.norm(dim=0).numpy(), rtol=1e-6)
