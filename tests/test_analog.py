"""Analog backends on real tiny transformers models with real aihwkit noise models:
exact restore, coverage, determinism, dtypes, and fast-vs-aihwkit equivalence per MoE layer."""
import pytest
import torch

from hetmoe_core.analog import analog, estimate_bytes, split_sizes
from hetmoe_core.models import TINY_FAMILIES, anatomy_of, tiny_model
from hetmoe_core.noise import PRESETS, get_preset
from hetmoe_core.placement import DensePolicy, Placement, digital_share, place

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on the shared 2-core machine tiny models run faster and steadier."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ALL_ANALOG_DENSE = DensePolicy(attention=False, lm_head=False, shared_experts=False, router=False, dense_mlp=False)


def _ids(n=2, t=16, seed=0):
    return torch.randint(4, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, ref):
    return all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def test_ideal_is_bit_exact_with_everything_analog():
    model = tiny_model("olmoe")
    a, ids = anatomy_of(model), _ids()
    ref = _logits(model, ids)
    with analog(model, a, Placement.all_analog(a, ALL_ANALOG_DENSE), get_preset("ideal"), seed=0) as rep:
        assert torch.equal(_logits(model, ids), ref)
    assert rep.analog_params == digital_share(Placement.all_analog(a, ALL_ANALOG_DENSE), a)["analog_params"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_noisy_then_restored_exactly_with_full_coverage(family):
    model = tiny_model(family)
    a, ids = anatomy_of(model), _ids()
    before, ref = _state(model), _logits(model, ids)
    pl = Placement.all_analog(a, ALL_ANALOG_DENSE)
    with analog(model, a, pl, get_preset("aihwkit-pcm-drift"), seed=3) as rep:
        noisy = _logits(model, ids)
    assert _same_state(model, before)
    assert torch.equal(_logits(model, ids), ref)
    err = ((noisy - ref).norm() / ref.norm()).item()
    assert 1e-3 < err < 1.0                                   # noise acted, model still sane
    share = digital_share(pl, a)
    assert rep.analog_params == share["analog_params"] == rep.expected_analog_params
    assert rep.total_params == a.total_params
    names = {m.name for m in rep.modules}
    for m in a.moe_layers:
        assert all(f"{m.experts_name}[{e}]" in names for e in range(m.num_experts))
    assert {m.state for m in rep.modules if m.kind == "embeddings"} <= {"digital"}
    assert rep.tiles > 0 and rep.clean_copy_bytes > 0


def test_partial_placement_touches_only_analog_experts_and_reports_them():
    model = tiny_model("qwen2_moe")
    a = anatomy_of(model)
    pl = place(a, "maxnn", 0.25)                               # 2 of 8 experts digital per MoE layer
    m = a.moe_layers[0]
    dig, an = pl.digital[0][0], pl.analog_experts(0)[0]
    clean_dig, clean_an = m.down(dig).clone(), m.down(an).clone()
    with analog(model, a, pl, get_preset("paper-pcm-c2.5"), seed=0) as rep:
        assert torch.equal(m.down(dig), clean_dig)
        assert not torch.equal(m.down(an), clean_an)
        rows = {r.name: r for r in rep.modules}
        assert rows[f"{m.experts_name}[{dig}]"].state == "digital"
        assert rows[f"{m.experts_name}[{an}]"].state == "analog"
        assert rows[a.modules["attention"][0] + ".q_proj"].state == "digital"
    assert torch.equal(m.down(an), clean_an)
    assert rep.analog_params == digital_share(pl, a)["analog_params"]
    assert rep.summary()["analog_modules"] == sum(len(pl.analog_experts(i)) for i in range(len(a.moe_layers)))


def test_same_seed_same_outputs_other_seed_other_noise_global_rng_untouched():
    model = tiny_model("mixtral")
    a, ids = anatomy_of(model), _ids()
    pl = Placement.all_analog(a, DensePolicy(attention=False))
    cfg = get_preset("paper-pcm-c1.5", out_noise=0.02)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    outs = []
    for seed in (7, 7, 8):
        with analog(model, a, pl, cfg, seed=seed) as rep:
            outs.append(_logits(model, ids))
        assert rep.seed == seed and rep.noise == cfg.to_dict()
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    for _ in range(2):  # the reference backend is deterministic too
        with analog(model, a, Placement.all_analog(a), cfg, seed=7, backend="aihwkit"):
            outs.append(_logits(model, ids))
    assert torch.equal(outs[3], outs[4]) and torch.equal(torch.get_rng_state(), rng)


def test_restore_after_exception_and_no_nesting():
    model = tiny_model("olmoe")
    a = anatomy_of(model)
    before = _state(model)
    pl = Placement.all_analog(a)
    with pytest.raises(ZeroDivisionError):
        with analog(model, a, pl, get_preset("aihwkit-hermes"), seed=0):
            1 / 0
    assert _same_state(model, before)
    with pytest.raises(RuntimeError, match="nested"):
        with analog(model, a, pl, get_preset("paper-dac-adc-8bit"), seed=0):
            with analog(model, a, pl, get_preset("paper-dac-adc-8bit"), seed=1):
                pass
    assert _same_state(model, before)
    assert model.config._experts_implementation != "hetmoe_analog"


def test_bad_inputs_give_clear_errors():
    model = tiny_model("olmoe")
    a = anatomy_of(model)
    pl = Placement.all_analog(a)
    other = Placement.all_analog(anatomy_of(tiny_model("mixtral")))
    cases = [(dict(backend="gpu"), "unknown analog backend"), (dict(seed=-1), "seed"),
             (dict(placement=other), "place again"), (dict(noise="paper-pcm-c1.5"), "NoiseConfig"),
             (dict(placement=Placement.all_analog(a, DensePolicy(router=False)), backend="aihwkit"), "not a plain nn.Linear"),
             (dict(memory_limit=1024), None)]
    for kw, msg in cases:
        args = dict(model=model, anatomy=a, placement=pl, noise=get_preset("paper-pcm-c1.5"), seed=0)
        args.update(kw)
        err = MemoryError if msg is None else ValueError
        with pytest.raises(err, match=msg or "GiB"):
            with analog(**args):
                pass
    assert estimate_bytes(model, a, pl, get_preset("paper-pcm-c1.5"))["clean_copies"] == \
        sum(p.numel() * 4 for m in a.moe_layers for p in (m.experts.gate_up_proj, m.experts.down_proj))


def test_kept_coverage_rows_split_sizes_and_memory_reading_equal_fresh_ones():
    """The coverage rows kept per dense policy (coverage._rows walks the model once; each new placement lists only
    its experts) equal a fresh walk's for new placements and another dense policy; tile splits kept per size are
    aihwkit's, a new list each call; a CPU memory reading stands for small estimates only (analog._fits): one
    beyond half of it reads afresh and is refused when it does not fit, and an explicit limit is the limit."""
    from hetmoe_core import analog as an
    from hetmoe_core.coverage import _coverage, _dense_analog_units, _rows
    model = tiny_model("olmoe")
    a = anatomy_of(model)
    noise = get_preset("paper-pcm-c1.5")
    pls = [place(a, "random", 0.25, seed=s) for s in range(3)] + [Placement.all_analog(a, ALL_ANALOG_DENSE)]
    kept = [_rows(model, a, pl, noise, _dense_analog_units(model, a, pl)) for pl in pls]
    assert len(a.__dict__["_coverage_rest"]) == 2   # the model walked once per dense policy
    for pl, rows in zip(pls, kept):
        units = _dense_analog_units(model, a, pl)
        a.__dict__.pop("_coverage_rest")
        assert rows == _rows(model, a, pl, noise, units) and len(rows[0]) > sum(m.num_experts for m in a.moe_layers)
        rep = _coverage(model, a, pl, noise, 0, "fast", units)   # from the kept rows and sums
        assert rep.modules == list(rows[0]) and rep.analog_params == rows[1] == rep.expected_analog_params
        assert rep.noise == noise.to_dict() and rep.total_params == a.total_params
    assert split_sizes(700, 512) == [350, 350] and split_sizes(700, 512) is not split_sizes(700, 512)
    cpu = torch.device("cpu")
    an._available_kept.clear()
    ok, avail = an._fits(1, cpu, None)
    stamp = an._available_kept["cpu"][0]
    assert ok and avail > 0 and an._available_kept["cpu"][1] == avail
    assert an._fits(avail // 4, cpu, None) == (True, avail) and an._available_kept["cpu"][0] == stamp   # kept
    assert an._fits(100 * avail, cpu, None)[0] is False and an._available_kept["cpu"][0] > stamp   # read afresh
    assert an._fits(2048, cpu, 1024) == (False, 1024) and an._fits(1024, cpu, 1024) == (True, 1024)


@pytest.mark.parametrize("backend", ["fast", "aihwkit"])
def test_bfloat16_models_run_analog(backend):
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    a, ids = anatomy_of(model), _ids()
    before, ref = _state(model), _logits(model, ids)
    with analog(model, a, Placement.all_analog(a, DensePolicy(attention=False)), get_preset("paper-pcm-c1.5"), 0,
                backend=backend):
        out = _logits(model, ids)
    with analog(model, a, Placement.all_analog(a), get_preset("aihwkit-pcm-drift"), 0, backend=backend):
        out2 = _logits(model, ids)
    assert out.dtype == out2.dtype == torch.bfloat16 and torch.isfinite(out).all() and torch.isfinite(out2).all()
    assert not torch.equal(out2, ref) and _same_state(model, before)


def test_tile_split_follows_aihwkit():
    assert split_sizes(700, 512) == [350, 350] and split_sizes(512, 512) == [512] and split_sizes(1100, 512) == [367, 367, 366]


# ------------------------------------------------------------------ fast vs aihwkit, per MoE layer

def _layer_inputs(model, a, ids):
    caught = {}
    hooks = [m.experts.register_forward_pre_hook(lambda mod, args, i=m.index: caught.__setitem__(i, args))
             for m in a.moe_layers]
    ref = {}
    hooks += [m.experts.register_forward_hook(lambda mod, args, out, i=m.index: ref.__setitem__(i, out.detach()))
              for m in a.moe_layers]
    _logits(model, ids)
    for h in hooks:
        h.remove()
    return caught, ref


@torch.no_grad()
def _layer_errors(model, a, pl, cfg, backend, inputs, ref, seeds):
    errs = {i: [] for i in ref}
    for s in seeds:
        with analog(model, a, pl, cfg, s, backend=backend):
            for i, m in enumerate(a.moe_layers):
                y = m.experts(*inputs[i])
                errs[i].append((y - ref[i]).norm(dim=-1) / ref[i].norm(dim=-1))
    return {i: torch.cat(v) for i, v in errs.items()}


@pytest.fixture(scope="module")
def equiv_setup():
    """A small OLMoE (H=128, I=64, 4 experts, 2 layers): matrices large enough that 5 seeds x 256
    tokens pin the error distribution down to a few percent."""
    from transformers import AutoModelForCausalLM
    from hetmoe_core.models import tiny_config
    cfg = tiny_config("olmoe")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_experts = 128, 64, 4
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    a = anatomy_of(model)
    inputs, ref = _layer_inputs(model, a, _ids(4, 64, seed=1))
    return model, a, inputs, ref


@pytest.mark.parametrize("preset", list(PRESETS))
def test_fast_and_aihwkit_agree_in_distribution(equiv_setup, preset):
    model, a, inputs, ref = equiv_setup
    pl = Placement.all_analog(a)
    cfg = get_preset(preset)
    seeds = range(8)  # >= 5 seeds; 8 keeps the std estimate's own sampling error well under 10%
    fast = _layer_errors(model, a, pl, cfg, "fast", inputs, ref, seeds)
    ref_b = _layer_errors(model, a, pl, cfg, "aihwkit", inputs, ref, seeds)
    for i in ref:
        mf, ma = fast[i].mean().item(), ref_b[i].mean().item()
        sf, sa = fast[i].std().item(), ref_b[i].std().item()
        if preset == "ideal":
            assert mf == 0.0 and ma < 1e-5
            continue
        assert ma > 1e-3
        assert abs(mf - ma) <= 0.1 * ma, (preset, i, mf, ma)
        assert abs(sf - sa) <= 0.1 * sa, (preset, i, sf, sa)


def test_small_tiles_match_aihwkit_tile_arrays(equiv_setup):
    """Tile size 32 splits H=128 / I=64 into 4 / 2 input tiles: per-tile DAC ranges, ADC and drift
    compensation match aihwkit's TileModuleArray, with analog and digital experts in one layer."""
    model, a, inputs, ref = equiv_setup
    cfg = get_preset("paper-dac-adc-8bit", tile_size=32, out_bound=4.0)
    pl = place(a, "maxnn", 0.5)                     # mixed layers: 2 analog + 2 digital experts each
    f = _layer_errors(model, a, pl, cfg, "fast", inputs, ref, [0])
    r = _layer_errors(model, a, pl, cfg, "aihwkit", inputs, ref, [0])
    for i in ref:
        assert f[i].mean().item() > 1e-3
        assert f[i].mean().item() == pytest.approx(r[i].mean().item(), rel=0.02)
    cfg = get_preset("aihwkit-pcm-drift", tile_size=32)
    f = _layer_errors(model, a, pl, cfg, "fast", inputs, ref, range(5))
    r = _layer_errors(model, a, pl, cfg, "aihwkit", inputs, ref, range(5))
    for i in ref:
        assert f[i].mean().item() == pytest.approx(r[i].mean().item(), rel=0.1)


def test_calibrated_adc_bounds_used_by_both_backends(equiv_setup):
    from hetmoe_core.analog import Calibration, calibrate
    model, a, inputs, ref = equiv_setup
    cfg = get_preset("paper-dac-adc-8bit")
    ids = _ids(2, 32, seed=5)
    lo, hi = calibrate(model, a, ids, cfg, quantile=0.9), calibrate(model, a, ids, cfg, quantile=1.0)
    assert set(hi.bounds) == {(m.index, k) for m in a.moe_layers for k in ("in", "down")}
    assert all(0 < lo.bounds[k] < hi.bounds[k] for k in hi.bounds) and lo.key != hi.key
    pl = Placement.all_analog(a)
    fixed = _layer_errors(model, a, pl, cfg, "fast", inputs, ref, [0])
    errs = {}
    for backend in ("fast", "aihwkit"):
        errs[backend] = {}
        for i in ref:
            with analog(model, a, pl, cfg, 0, backend=backend, calibration=hi):
                m = a.moe_layers[i]
                y = m.experts(*inputs[i])
            errs[backend][i] = ((y - ref[i]).norm(dim=-1) / ref[i].norm(dim=-1)).mean().item()
    for i in ref:
        assert errs["fast"][i] == pytest.approx(errs["aihwkit"][i], rel=0.02)
        assert errs["fast"][i] != pytest.approx(fixed[i].mean().item(), rel=1e-3)   # the bound changed the ADC grid
    with pytest.raises(ValueError, match="calibrate this model"):
        with analog(model, a, pl, cfg, 0, calibration=Calibration(quantile=0.9, bounds={})):
            pass


@torch.no_grad()
def test_bfloat16_fast_path_matches_float32_within_bf16_rounding(equiv_setup, monkeypatch):
    """The bf16 experts forward keeps whole tensors in bf16 (float32 only for [S, 1] factors and the DAC's
    bounded block of rows) and gives the float32 path's outputs on the same bf16-representable weights up to
    bf16 rounding. The ADC reads the bf16 matmul output, so ADC codes of magnitude >= 32 can differ by one step
    from float32's: measured 0.33x the analog noise itself (programming noise c=1.5 + 8-bit DAC/ADC); a lost
    scale, tile or expert would be of the noise's order or larger."""
    import copy
    from torch.utils._python_dispatch import TorchDispatchMode
    from hetmoe_core import fast_backend
    monkeypatch.setattr(fast_backend, "_BLOCK_ELEMS", 1024)   # DAC float32 work space: 1024 values at a time
    model, a, inputs, _ = equiv_setup
    m32 = copy.deepcopy(model)
    for p in m32.parameters():
        p.copy_(p.bfloat16().float())
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    a32, a16 = anatomy_of(m32), anatomy_of(m16)
    in16 = {i: tuple(x.bfloat16() if x.is_floating_point() else x for x in v) for i, v in inputs.items()}

    class Float32Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.largest = max(self.largest, t.numel())
            return out
    cfg = get_preset("paper-pcm-c1.5", tile_size=32)      # 4 / 2 input tiles per projection
    for pl32, pl16 in ((Placement.all_analog(a32), Placement.all_analog(a16)),
                       (place(a32, "maxnn", 0.5), place(a16, "maxnn", 0.5))):   # mixed rows: the masked path
        clean = {i: m.experts(*inputs[i]) for i, m in enumerate(a32.moe_layers)}
        with analog(m32, a32, pl32, cfg, 3):
            y32 = {i: m.experts(*inputs[i]) for i, m in enumerate(a32.moe_layers)}
        with analog(m16, a16, pl16, cfg, 3):
            sizes = Float32Sizes()
            with sizes:
                y16 = {i: m.experts(*in16[i]) for i, m in enumerate(a16.moe_layers)}
        for i in y32:
            S = in16[i][1].numel()                               # rows: tokens x top-k
            assert y16[i].dtype == torch.bfloat16
            noise = ((y32[i] - clean[i]).norm() / clean[i].norm()).item()
            err = ((y16[i].float() - y32[i]).norm() / y32[i].norm()).item()
            assert noise > 0.02 and err < 0.5 * noise, (i, err, noise)
        assert sizes.largest <= max(S, 1024), sizes.largest     # float32: [S, 1] factors, one DAC block


def test_each_expert_is_its_own_draw_programmed_once_per_seed():
    """An analog expert's programmed weights do not depend on which other experts are analog (its own seed, the one
    the sensitivity measurement uses); a second placement at the same seed programs only the experts not seen yet
    (tiles.ProgrammedCache) and gets the bits that programming afresh gives; editing a weight drops the cache."""
    from hetmoe_core.tiles import ProgrammedCache
    model = tiny_model("qwen2_moe")                            # 8 routed experts per MoE layer
    a = anatomy_of(model)
    m, cfg = a.moe_layers[0], get_preset("paper-pcm-c2.5")
    half, full = place(a, "maxnn", 0.5), Placement.all_analog(a)
    e = half.analog_experts(0)[0]
    n_half = 2 * sum(len(half.analog_experts(i)) for i in range(len(a.moe_layers)))   # gate_up + down per expert
    n_all = 2 * sum(len(full.analog_experts(i)) for i in range(len(a.moe_layers)))
    cache = ProgrammedCache.of(model)
    cache.clear()
    h0, m0 = cache.hits, cache.misses
    with analog(model, a, half, cfg, seed=3):
        w_half = m.down(e).clone()
    with analog(model, a, full, cfg, seed=3):
        w_full = m.down(e).clone()
    assert torch.equal(w_half, w_full)
    assert (cache.hits - h0, cache.misses - m0) == (n_half, n_all)
    cache.clear()
    with analog(model, a, full, cfg, seed=3):
        assert torch.equal(m.down(e), w_full)                  # a cache hit is the fresh draw, bit for bit
    with analog(model, a, full, cfg, seed=4):
        assert not torch.equal(m.down(e), w_full)
    clean = m.experts.down_proj.detach().clone()
    with torch.no_grad():                                      # an edited weight: programmed afresh
        m.experts.down_proj.add_(0.01 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)))
    m1 = cache.misses
    with analog(model, a, half, cfg, seed=3):
        assert not torch.equal(m.down(e), w_half)
    assert cache.misses - m1 == n_half
    with torch.no_grad():
        m.experts.down_proj.copy_(clean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_placement_from_a_warm_cache_is_the_cold_one_bit_for_bit(dtype):
    """A placement run after others at the same and other seeds and presets (programmed experts taken from the
    cache in the form the forward reads, the fused tensors swapped in and updated only where an expert changed
    state) gives the logits of the same placement programmed afresh with an empty cache, and of the path that
    writes the slices in place (a model whose fused tensors do not fit the cache); two presets alternating at one
    seed each keep their own fused tensor, with the ADC factors of every expert analog there so far (each written
    once); every parameter is restored."""
    from hetmoe_core.tiles import ProgrammedCache
    model = tiny_model("olmoe").to(dtype)
    a, ids = anatomy_of(model), _ids()
    before = _state(model)
    cfg, other = get_preset("paper-pcm-c1.5", tile_size=32), get_preset("aihwkit-pcm-drift")
    p = place(a, "maxnn", 0.25)
    cache = ProgrammedCache.of(model)

    def run(pl, noise, seed):
        with torch.no_grad(), analog(model, a, pl, noise, seed=seed):
            return _logits(model, ids)
    cache.clear()
    cold = run(p, cfg, 5)
    for pl, noise, seed in ((place(a, "random", 0.5, seed=1), cfg, 5), (Placement.all_analog(a), other, 5),
                            (place(a, "maxnn", 0.5), cfg, 6), (place(a, "random", 0.125, seed=2), cfg, 5)):
        assert not torch.equal(run(pl, noise, seed), cold)
    assert any(k[0] == "fused" for k in cache.entries)        # the swapped-in path ran
    assert torch.equal(run(p, cfg, 5), cold)                   # warm: updated from another placement's tensors
    run(Placement.all_analog(a), other, 5)                     # two presets alternate: each keeps its own tensor
    fused = [v for k, v in cache.entries.items() if k[0] == "fused"]
    assert fused and all(len(v) == 10 and {v[1][1], v[6][1]} == {cfg, other} for v in fused)
    for v in fused:   # ADC factors kept with the tensor: the current analog experts' and those of earlier placements
        buf, tag, analog_ids, g_out, g_have = next(e for e in (v[:5], v[5:]) if e[1][1] == cfg)
        assert g_out is not None and analog_ids < g_have and len(g_have) == g_out.shape[1]
    assert torch.equal(run(p, cfg, 5), cold)                   # from its own tensor, kept as the spare
    assert _same_state(model, before)
    cache.max_bytes = 0                                        # nothing kept: slices written in place, restored
    cache.clear()
    assert torch.equal(run(p, cfg, 5), cold)
    assert not cache.entries and _same_state(model, before)
    del model._hetmoe_programmed
