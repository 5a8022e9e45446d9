"""The fast analog backend: programmed weights in the fused expert tensors, converters inside a vectorised experts forward.

Per seed, the analog experts of the fused expert tensors (``experts.gate_up_proj`` / ``down_proj``) and the analog
dense weights are programmed through aihwkit's noise-model functions, tile by tile (``tiles.program_weights``); each
routed expert is its own draw, kept across placements in the form the forward reads (``tiles.ProgrammedCache``).
While the placement runs, each fused parameter points at a tensor of the cache holding its analog experts' draws and
its other experts clean, updated from the previous placement only where an expert changed state, and back at its own
untouched tensor on exit; a model whose fused tensors exceed half the cache instead gets the analog slices written in
place, restored from clean copies. Analog dense weights are written in place and restored from clean copies.
DAC/ADC quantization (aihwkit ``UniformQuantize``) and output noise act inside an experts forward registered in
transformers' ``ExpertsInterface`` (``moe_dispatch``; only analog experts' rows), and through forward hooks on analog
dense modules.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .backend import AnalogBackend
from .moe_dispatch import apply_gate, grouped_matmul, set_state
from .noise import NoiseConfig
from .tiles import (ProgrammedCache, _channel_absmax, _cumstarts, _derive_seed, _quantize, _w_in,
                    program_weights, split_sizes)


@functools.lru_cache(maxsize=256)
def _io_res(noise: NoiseConfig):
    """(``inp_res``, ``out_res``) of ``noise.io_parameters()`` as a namespace, kept per (frozen, hashable) noise
    config: building aihwkit's IOParameters took ~25 us per MoE layer and placement (measured), and the experts'
    state reads only these two fields."""
    from types import SimpleNamespace
    io = noise.io_parameters()
    return SimpleNamespace(inp_res=io.inp_res, out_res=io.out_res)


class _FastExperts:
    """Per-MoE-layer state of the fast backend.

    With ADC or output noise, each analog expert's tile weights are stored pre-divided by
    ``scale * step_out / step_in`` (scale: the tile's per-channel abs-max x drift compensation),
    so a grouped matmul of the DAC's integer codes gives the ADC input directly in ADC steps;
    ``g_out [T, E, O] = scale * step_out`` maps the ADC codes back. This saves every per-row
    gather of scales in the forward pass (speed); the restore copies the clean slices back.
    """

    def __init__(self, layer, noise: NoiseConfig, analog_ids: list[int], gen: torch.Generator, adc_bounds=None):
        self.layer, self.noise, self.gen = layer, noise, gen
        self.recorder = adc_bounds if adc_bounds is not None and adc_bounds.recording else None
        E = layer.num_experts
        dev = layer.experts.down_proj.device
        on = set(analog_ids)
        self.analog_list = [e in on for e in range(E)]
        self.analog = torch.tensor(self.analog_list, dtype=torch.bool, device=dev)
        self.all_analog = all(self.analog_list)
        self.in_sizes: dict[str, list[int]] = {}
        self.g_out: dict[str, torch.Tensor] = {}
        io = _io_res(noise)
        # converter grids (aihwkit UniformQuantize: step = 2 * bound * res; the DAC's bound is 1 range)
        self.step_in = 2.0 * io.inp_res if noise.dac_bits else None
        self.step_out = self.levels = None
        if noise.adc_bits:  # one grid per projection: the calibrated bound, else noise.out_bound
            self.step_out, self.levels = {}, 1.0 / (2.0 * io.out_res)
            for key in ("in", "down"):
                b = adc_bounds.bounds[(layer.index, key)] if adc_bounds is not None and not self.recorder \
                    else noise.out_bound
                self.step_out[key] = 2.0 * io.out_res * b
        self.io_out = noise.adc_bits is not None or noise.out_noise > 0 or self.recorder is not None

    def s_out(self, key) -> float:
        return self.step_out[key] if self.step_out else 1.0

    def fold(self, key) -> float:
        """Factor stored weights are multiplied by, per unit of 1 / scale (see class doc)."""
        return (self.step_in or 1.0) / self.s_out(key) if self.io_out else 1.0

    def proj(self, x, w, rows, offs, key, defer_row_scale=False):
        """One grouped projection of expert-sorted rows ``x [S, I]`` -> ``[S, O]`` (x's dtype).

        Analog rows: the DAC maps each tile's input to integer codes round(x / (a * step_in)),
        a = the row's abs-max over the tile (aihwkit NoiseManagementType.ABS_MAX); the tile's
        normalised output gets output noise and the ADC (round to step_out, clip at ±out_bound,
        aihwkit UniformQuantize grid); the digital periphery rescales by scale * a. Digital
        rows: a plain matmul. ``rows``: the forward's ``_Rows`` (which rows are analog, of which expert).
        Every step is one whole-tensor operation (no loop over experts): on a shared CPU each
        parallel op costs a thread hand-over, and a loop over 16 experts' rows multiplied them.
        float32: every element gets the same operations as in a per-expert loop (bit for bit).
        bfloat16 / float16: whole tensors stay in the model's dtype; DAC codes come from a float32
        quotient a bounded block of rows at a time (``_codes_in_blocks``); the ADC rounds the matmul
        output, which is in the model's dtype (CPU grouped_mm has no float32 output), so ADC codes of
        magnitude >= 32 can differ by one step from float32's (bf16 holds 8 significant bits).
        Returns (y, row_scale): with ``defer_row_scale`` (all rows analog, one input tile) the
        per-row factor is left to the caller (folded into the routing weights), else None.
        """
        nz = self.noise
        tr = self.layer.transposed
        sizes = self.in_sizes[key]
        noise_scale = nz.out_noise / self.s_out(key) if nz.out_noise > 0 else 0.0
        out, i0 = None, 0
        for t, ni in enumerate(sizes):
            xt = x[:, i0:i0 + ni] if len(sizes) > 1 else x
            wt = (w[:, i0:i0 + ni] if tr else w[..., i0:i0 + ni]) if len(sizes) > 1 else w
            xin, a = self._dac(xt, rows, w.dtype) if self.step_in is not None else (xt, None)
            y = grouped_matmul(xin, wt, offs, tr)
            if self.recorder is not None:
                self._record(y, key)
            y, row_scale = self._readout(y, a, rows, key, t, noise_scale, defer_row_scale and len(sizes) == 1)
            if row_scale is not None:
                return y, row_scale
            out = y if out is None else out + y
            i0 += ni
        return out, None

    def _dac(self, xt, rows, dtype):
        """DAC codes of one input tile's rows (x's dtype) and their ranges ``a [S, 1]`` float32 (per-token abs-max)."""
        a = _row_absmax(xt).float().clamp_(min=torch.finfo(torch.float32).tiny)
        d = a * self.step_in   # [S, 1] range of one DAC step
        # x is this forward's own gathered copy: its rows are coded in place (fresh large CPU
        # tensors cost page faults); digital rows keep their values
        if xt.dtype != torch.float32:
            xin = _codes_in_blocks(xt, d, rows.analog)
        elif rows.analog is None:
            xin = xt.div_(d).round_()
        else:
            xin = torch.where(rows.analog, torch.div(xt, d).round_(), xt)
        return (xin if xin.dtype == dtype else xin.to(dtype)), a

    def _record(self, y, key) -> None:
        """ADC-bound calibration: keep the largest batch quantile of |normalised tile output|."""
        v = y.abs().flatten().float()
        v = v[torch.randperm(v.numel(), generator=self.gen)[:1 << 22]] if v.numel() > 1 << 22 else v
        q = torch.quantile(v, self.recorder.quantile).item() if v.numel() else 0.0
        k = (self.layer.index, key)
        self.recorder.bounds[k] = max(self.recorder.bounds.get(k, 0.0), q)

    def _readout(self, y, a, rows, key, t, noise_scale, defer):
        """Output noise, ADC and digital rescale of one tile's output ``y`` (in place where all rows are analog).

        Returns (y, row_scale): row_scale is the per-row factor left to the caller when ``defer``, else None."""
        dt = y.dtype
        if self.io_out:
            z = y if rows.analog is None else y.clone()
            if noise_scale:
                if rows.analog is None:
                    z += noise_scale * torch.randn(z.shape, generator=self.gen, device=z.device, dtype=dt)
                else:  # one draw per analog expert's rows, in expert order
                    for _, s0, s1 in rows.segs:
                        z[s0:s1] += noise_scale * torch.randn(z[s0:s1].shape, generator=self.gen,
                                                              device=z.device, dtype=dt)
            if self.levels is not None:
                z.round_().clamp_(-self.levels, self.levels)
            z *= rows.expand(self.g_out[key][t], dt)
            if rows.analog is not None:
                if a is not None:
                    z *= a.to(dt)
                return torch.where(rows.analog, z, y), None
            if a is not None:
                if defer:
                    return z, a
                z *= a.to(dt)
            return z, None
        if a is None:
            return y, None
        if rows.analog is None:  # DAC only: codes back to input units
            if defer:
                return y, a * self.step_in
            y *= (a * self.step_in).to(dt)
        else:  # digital rows times exactly 1
            y *= (a * self.step_in).masked_fill_(~rows.analog, 1.0).to(dt)
        return y, None

    def forward(self, mod, hidden_states, top_k_index, top_k_weights):
        """Experts forward (same contract as transformers' ``grouped_mm_experts_forward``)."""
        K = top_k_index.size(-1)
        N, H = hidden_states.shape
        eids = top_k_index.reshape(-1)
        eids_g, perm = torch.sort(eids)  # as transformers: deterministic on a given device
        x = hidden_states[perm // K]
        w_route = top_k_weights.reshape(-1)[perm]
        counts = torch.bincount(eids_g, minlength=self.layer.num_experts)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        rows = _Rows(self, eids_g, counts, offs)
        gated = getattr(mod, "has_gate", True)
        h, _ = self.proj(x, mod.gate_up_proj if gated else mod.up_proj, rows, offs, "in")
        if getattr(mod, "has_bias", False):
            h = h + (mod.gate_up_proj_bias if gated else mod.up_proj_bias)[eids_g]
        h = apply_gate(mod, h) if gated else mod.act_fn(h)
        plain = not (getattr(mod, "has_bias", False) or getattr(mod, "has_post_expert_norm", False))
        y, row_scale = self.proj(h, mod.down_proj, rows, offs, "down", defer_row_scale=plain)
        if getattr(mod, "has_bias", False):
            y = y + mod.down_proj_bias[eids_g]
        if getattr(mod, "has_post_expert_norm", False):
            y = mod.post_expert_norm(y)
        w_route = w_route.unsqueeze(-1)
        if row_scale is not None:
            w_route = w_route * row_scale if y.dtype == torch.float32 else (w_route * row_scale).to(y.dtype)
        y = y * w_route
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return y[inv].view(N, K, H).sum(1).to(hidden_states.dtype)



def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` bit for bit (same shape and dtype, both contiguous), on CPU as one single-threaded memcpy
    of their bytes (NumPy) instead of torch's parallel copy: a parallel op waits for every OpenMP thread to be
    scheduled, which on a loaded shared CPU took ~150 us per expert slice of the default model (256 KiB) against
    ~10 us serial (``bench/bench_overhead.py``'s steady state; programming a placement copies tens of them). The
    global thread count is left alone: another thread's forward must keep its own (its sums depend on it)."""
    if dst.device.type == "cpu" and dst.is_contiguous() and src.is_contiguous():
        dst.detach().view(torch.uint8).numpy()[...] = src.detach().view(torch.uint8).numpy()
    else:
        dst.copy_(src)


def _copy_rows(dst: torch.Tensor, rows: list) -> None:
    """``dst[i] = src[j]`` bit for bit for each ``(i, src, j)`` of ``rows`` (``src`` shaped as ``dst``'s rows), as
    :func:`_copy`, with the byte view of ``dst`` made once."""
    if not rows:
        return
    if dst.device.type != "cpu" or not dst.is_contiguous():
        for i, src, j in rows:
            _copy(dst[i], src[j])
        return
    to = dst.detach().view(torch.uint8).numpy()
    for i, src, j in rows:
        if src.is_contiguous() and src.device.type == "cpu":
            to[i] = src.detach().view(torch.uint8).numpy()[j]
        else:
            dst[i].copy_(src[j])


_BLOCK_ELEMS = 1 << 20   # float32 work space of the low-precision DAC: 4 MiB, whatever the batch


def _codes_in_blocks(x: torch.Tensor, d: torch.Tensor, analog: torch.Tensor | None) -> torch.Tensor:
    """DAC codes round(x / d) of a bfloat16 / float16 ``x [S, I]``, written into x (``d [S, 1]`` float32).

    The quotient is formed in float32, a block of rows at a time: bf16's 8-bit mantissa holds a code of 8-bit
    DAC (up to 127) but not the quotient to half a step, so rounding a bf16 quotient would shift ~10% of the
    codes by one (measured); blocks bound the float32 work space to ``_BLOCK_ELEMS`` (no float32 copy of the
    whole tensor). ``analog [S, 1]``: rows to code (None: all); other rows keep their values."""
    step = max(1, _BLOCK_ELEMS // max(1, x.shape[-1]))
    for r0 in range(0, x.shape[0], step):
        xb = x[r0:r0 + step]
        q = xb.float().div_(d[r0:r0 + step]).round_()
        xb.copy_(q if analog is None else torch.where(analog[r0:r0 + step], q, xb.float()))
    return x


def _row_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-row abs-max ``[S, I]`` -> ``[S, 1]`` in x's dtype, exact (a max is exact in any float format).

    float32: max(max, -min), two vectorised reductions and no |x| copy. 2-byte floats: the max of the bit
    patterns with the sign bit cleared (an IEEE float's magnitude orders as those bits), as CPU reductions of
    bfloat16 / float16 are not vectorised (measured 8x faster than amax + amin)."""
    if x.element_size() == 2:
        return (x.view(torch.int16) & 0x7FFF).amax(-1, keepdim=True).view(x.dtype)
    return torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_())


class _Rows:
    """Which expert-sorted rows of one experts forward are analog: ``analog [S, 1]`` bool (None when all are),
    ``segs`` [(expert, start, end)] of the analog experts' rows, and per-row copies of per-expert factors."""

    def __init__(self, state, eids_g, counts, offs):
        self.eids_g = eids_g
        self.analog = None if state.all_analog else state.analog[eids_g].unsqueeze(-1)
        self._segs = (state.analog_list, counts, offs)

    @property
    def segs(self):
        analog, counts, offs = self._segs
        return [(e, s1 - c, s1) for e, (c, s1) in enumerate(zip(counts.tolist(), offs.tolist())) if c and analog[e]]

    def expand(self, per_expert: torch.Tensor, dtype) -> torch.Tensor:
        """``[E, O]`` factors -> ``[S, O]``, row s holding its expert's factors (in ``dtype``)."""
        return per_expert.to(dtype).index_select(0, self.eids_g)


class _DenseUnit:
    """One analog dense MVM (nn.Linear or router weight) in the fast backend."""

    def __init__(self, name, module, noise: NoiseConfig, tied: bool, gen: torch.Generator):
        self.name, self.module, self.noise, self.tied, self.gen = name, module, noise, tied, gen
        self.weight = module.weight
        self.bias = getattr(module, "bias", None) if isinstance(module, nn.Linear) else None
        O, I = self.weight.shape
        self.in_sizes = split_sizes(I, noise.tile_size)
        self.out_sizes = split_sizes(O, noise.tile_size)
        self.scales = None          # [O, T]
        self.noisy = None           # noisy weight copy when tied (shared with embeddings)
        self.clean = None
        io = noise.io_parameters()
        self.inp_res = io.inp_res if noise.dac_bits else None
        self.out_res = io.out_res if noise.adc_bits else None
        self._a = None

    def hooks_needed(self) -> bool:
        return self.tied or self.noise.io_active

    def pre_hook(self, module, args):
        """DAC: quantize the input to the per-token, per-tile range (fake-quantized, same units)."""
        if self.inp_res is None or not args:
            self._a = None
            return None
        x = args[0]
        parts, avals, i0 = [], [], 0
        for ni in self.in_sizes:
            xt = x[..., i0:i0 + ni].float()
            a = xt.abs().amax(-1, keepdim=True)
            a = torch.where(a > 0, a, torch.ones_like(a))
            parts.append(_quantize(xt / a, self.inp_res, 1.0) * a)
            avals.append(a)
            i0 += ni
        self._a = avals
        return (torch.cat(parts, -1).to(x.dtype),) + tuple(args[1:])

    def post_hook(self, module, args, output):
        """ADC and output noise per tile; tied weights compute with their noisy copy."""
        if not isinstance(output, torch.Tensor):
            return None  # routers: logits consumed inside (top-k); only DAC + weight noise simulated
        x = args[0]
        w = self.noisy if self.tied else self.weight
        nz = self.noise
        io = self.out_res is not None or nz.out_noise > 0
        if not io and not self.tied:
            return None
        if not io:
            return nn.functional.linear(x, w, self.bias)
        out, i0 = None, 0
        for t, ni in enumerate(self.in_sizes):
            if len(self.in_sizes) == 1 and not self.tied:
                yt = output - self.bias if self.bias is not None else output
            else:
                yt = nn.functional.linear(x[..., i0:i0 + ni], w[:, i0:i0 + ni])
            sc = self.scales[:, t]
            if self._a is not None:
                sc = sc * self._a[t]
            yn = yt.float() / sc
            if nz.out_noise > 0:
                yn = yn + nz.out_noise * torch.randn(yn.shape, generator=self.gen, device=yn.device)
            if self.out_res is not None:
                yn = _quantize(yn, self.out_res, nz.out_bound)
            yt = (yn * sc).to(output.dtype)
            out = yt if out is None else out + yt
            i0 += ni
        return out + self.bias if self.bias is not None else out


class FastBackend(AnalogBackend):
    """Programs analog weights in place (clean copies kept for restore) and installs the forward state."""
    name = "fast"

    def __init__(self, model, anatomy, noise, seed, device, adc_bounds=None):
        super().__init__(model, anatomy, noise, seed, device, adc_bounds)
        self.nm = noise.build_noise_model() if noise.weight_noise else None
        self.tied = anatomy.__dict__.get("_tied_ids")
        if self.tied is None:   # the model's structure, walked once per anatomy
            self.tied = anatomy.__dict__["_tied_ids"] = _tied_ids(model)
        self.fused_bytes = sum(p.numel() * p.element_size() for m in anatomy.moe_layers
                               for p in (_w_in(m), m.experts.down_proj))

    def experts(self, stack, m, ids) -> int:
        noise, seed, device, adc_bounds, nm = self.noise, self.seed, self.device, self.adc_bounds, self.nm
        kept = 0
        gen = torch.Generator(device=device).manual_seed(_derive_seed(seed, m.experts_name + ":out"))
        state = _FastExperts(m, noise, ids, gen, adc_bounds)
        cache = ProgrammedCache.of(self.model)
        pairs = (("in", _w_in(m)), ("down", m.experts.down_proj))
        cache.check_clean([p for _, p in pairs])
        for key, p in pairs:
            logical = p.data.transpose(1, 2) if m.transposed else p.data  # [E, O, I]
            O, I = logical.shape[1:]
            sizes = state.in_sizes[key] = split_sizes(I, noise.tile_size)
            if nm is None and not state.io_out:
                continue  # DAC alone needs no weight change
            nz = noise if not (nm is not None and adc_bounds and noise.adc_bits and not state.recorder) else \
                noise.replace(out_bound=adc_bounds.bounds[(m.index, key)])  # drift readout's ADC
            # what the written form depends on besides the draw: converter grids, dtype, layout
            form = (state.io_out, state.fold(key), state.s_out(key), p.dtype, m.transposed)
            group = cache.group((seed if nm is not None else None, nz, m.experts_name, key, form))
            ready = cache.kept(group, ids)
            if ready is None:   # some to program: a check between them
                ready = []
                for e in ids:
                    self.check()
                    ready.append(cache.expert((group, e),
                                              lambda e=e: self._ready(m, key, logical, nz, state, sizes, e)))
            tag = (seed if nm is not None else None, nz, form)
            if cache.fits_fused(self.fused_bytes):
                kept += self._swap(stack, cache, m, key, p, ids, ready, tag, state, (len(sizes), m.num_experts, O),
                                   spare=cache.fits_fused(2 * self.fused_bytes))
                continue
            if state.io_out:
                g_out = torch.ones(len(sizes), m.num_experts, O, dtype=torch.float32, device=device)
                g_out[:, ids] = torch.cat([g for _, g in ready]).permute(2, 0, 1)
                state.g_out[key] = g_out
                kept += g_out.numel() * 4
            kept += self._in_place(stack, cache, m, key, p, ids, [w for w, _ in ready], tag)
        if noise.io_active or state.recorder is not None:  # programmed weights alone need no special forward
            set_state(m.experts, state)
        return kept

    def _ready(self, m, key, logical, nz, state, sizes, e):
        """Expert ``e`` of one projection as the forward reads it: (``[1, ...]`` its slice of the fused tensor,
        in the tensor's layout and dtype, ``g [1, O, T]`` float32 or None; see ``tiles.ProgrammedCache``).

        With weight noise, its own draw (seed ``<experts>.<proj>:e-e``, ``program_weights``); without, its clean
        weights and their per-channel abs-max. With converters the weights are divided by the tile scale x ADC
        step per DAC step (``_FastExperts``) and ``g = scale * step_out`` maps ADC codes back."""
        O, I = logical.shape[1:]
        if self.nm is not None:
            name = f"{m.experts_name}.{key}:{e}-{e}"
            w, sc = program_weights(logical[e:e + 1], nz, self.nm, sizes, split_sizes(O, nz.tile_size),
                                    _derive_seed(self.seed, name), self.device)
        else:
            w, sc = logical[[e]].float(), _channel_absmax(logical[[e]], sizes)
        g = None
        if state.io_out:  # store in ADC steps per unit DAC code (see _FastExperts)
            fold = state.fold(key)
            w = w * (fold / sc if len(sizes) == 1 else
                     torch.repeat_interleave(fold / sc, torch.tensor(sizes, device=self.device), dim=-1))
            g = sc * state.s_out(key)
        return (w.transpose(1, 2) if m.transposed else w).to(logical.dtype).contiguous(), g

    @staticmethod
    def _in_place(stack, cache, m, key, p, ids, ws, tag) -> int:
        """Write the analog experts' slices into the fused tensor ``p``; their clean copies restore it on exit."""
        idx = torch.tensor(ids, dtype=torch.long, device=p.device)
        clean = p.data.index_select(0, idx)
        stack.callback(lambda: p.data.index_copy_(0, idx, clean))
        p.data.index_copy_(0, idx, torch.cat(ws))
        return clean.numel() * clean.element_size()

    @staticmethod
    def _swap(stack, cache, m, key, p, ids, ready, tag, state, g_shape, spare: bool = False) -> int:
        """Point ``p`` at a fused tensor of the cache holding this placement's analog experts (the rest clean) and
        back at its own clean tensor on exit: only experts whose analog/digital state differs from the placement
        that last used that tensor at the same (seed, noise, form) are copied, and the model's own weights are
        never written. With converters, the ADC factors ``g_out [T, E, O]`` kept with that tensor are set only
        for the experts whose factors it does not hold yet (``g_have``): an expert's factors are those of its
        programmed draw, the same at every placement of one (seed, noise, form), so once written they stay right
        for every later placement there; before, every newly analog expert's were written again (a cat and an
        indexed write per projection and layer, ~0.2 ms per result, measured in ``bench/bench_overhead.py``'s
        steady state). A digital expert's factors are never read (its rows take the plain matmul's output,
        ``_FastExperts._readout``). ``spare``: keep a second fused tensor, that of the last other (seed, noise,
        form), so that a sweep alternating two presets at one seed updates each from its own last placement
        instead of rewriting the whole tensor at every switch (the caller allows it when two fit the cache).
        ``ready``: [(w, g)] per expert of ``ids``; ``g_shape``: ``(T, E, O)``."""
        slot = ("fused", m.experts_name, key)
        got = cache.take(slot) or ()
        kept = [got[i:i + 5] for i in range(0, len(got), 5)   # (tensor, tag, analog experts, g_out, g_have),
                if (got[i].shape, got[i].dtype, got[i].device) == (p.shape, p.dtype, p.device)]   # newest first
        mine = next((k for k in kept if k[1] == tag), None)
        other = [k for k in kept if k is not mine][:1] if spare else []
        if mine is not None:
            buf, have, g_out, g_have = mine[0], mine[2], mine[3], mine[4]
        else:   # the oldest kept tensor is rewritten whole (a new one while a spare may be kept)
            buf = kept[-1][0] if kept and not (spare and len(kept) < 2) else torch.empty_like(p.data)
            other = [k for k in other if k[0] is not buf]
            _copy(buf, p.data)
            have, g_out, g_have = frozenset(), None, frozenset()
        want = {e: r for e, r in zip(ids, ready)}
        back = [e for e in sorted(have) if e not in want]
        new = [e for e in ids if e not in have]
        _copy_rows(buf, [(e, p.data, e) for e in back] + [(e, want[e][0], 0) for e in new])
        if state.io_out:
            if g_out is None or tuple(g_out.shape) != g_shape:
                g_out, g_have = torch.ones(g_shape, dtype=torch.float32, device=p.device), frozenset()
            todo = [e for e in ids if e not in g_have]
            if todo:
                g_out[:, todo] = torch.cat([want[e][1] for e in todo]).permute(2, 0, 1)
                g_have = g_have | frozenset(todo)
            state.g_out[key] = g_out
        else:
            g_out, g_have = None, frozenset()
        clean = p.data

        def restore():
            p.data = clean
            cache.keep(slot, (buf, tag, frozenset(want), g_out, g_have, *(x for k in other for x in k)))
        p.data = buf
        stack.callback(restore)
        return buf.numel() * buf.element_size() + (g_out.numel() * 4 if state.io_out else 0)

    def dense(self, stack, uname, kind, unit) -> int:
        noise, seed, device, nm = self.noise, self.seed, self.device, self.nm
        clean_bytes = 0
        gen = torch.Generator(device=device).manual_seed(_derive_seed(seed, uname + ":out"))
        du = _DenseUnit(uname, unit, noise, id(unit.weight) in self.tied, gen)
        w = unit.weight
        O, I = w.shape
        if nm is not None:
            noisy, sc = program_weights(w.data[None], noise, nm, du.in_sizes, du.out_sizes,
                                        _derive_seed(seed, uname), device)
            du.scales = sc[0]
            if du.tied:
                du.noisy = noisy[0].to(w.dtype)
                clean_bytes += du.noisy.numel() * du.noisy.element_size()
            else:
                clean = w.data.clone()
                clean_bytes += clean.numel() * clean.element_size()
                stack.callback(lambda w=w, clean=clean: w.data.copy_(clean))
                w.data.copy_(noisy[0].to(w.dtype))
        else:
            du.noisy = w.data if du.tied else None
            du.scales = torch.stack([w.data[:, i0:i0 + ni].abs().amax(-1).float() for i0, ni in
                                     zip(_cumstarts(du.in_sizes), du.in_sizes)], -1).clamp(min=torch.finfo(torch.float32).tiny)
        if du.hooks_needed():
            h1 = unit.register_forward_pre_hook(du.pre_hook)
            h2 = unit.register_forward_hook(du.post_hook)
            stack.callback(h1.remove)
            stack.callback(h2.remove)
        return clean_bytes


def _tied_ids(model) -> set[int]:
    """ids of parameters held by more than one module (tied lm_head / embeddings)."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}
