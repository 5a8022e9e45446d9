"""Command line: ``python -m hetmoe_core <command> ...`` (every command takes ``--json``).

Each command is a pair ``add_<name>(parser)`` / ``cmd_<name>(args) -> dict`` registered in
``COMMANDS``; ``main`` prints the dict as JSON or as indented text, and turns ``ValueError``
into a one-line error with exit code 2 (never a traceback for bad input).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .backend import BACKENDS
from .strategies import STRATEGIES, needs
from .cli_store import (_store_arg, add_export, add_import, add_presets, add_report, add_runs,  # noqa: F401
                        add_tasks, cmd_export, cmd_import, cmd_presets, cmd_report, cmd_runs, cmd_tasks)


from .cli_args import _Parser, _int_at_least, _limit, _number, _set_arg, _setting, _share, _shares  # noqa: F401

def _source(p):
    p.add_argument("source", help="'default', 'tiny:<family>', a local folder or a Hugging Face hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true")


class _StepLine:
    """A measurement's progress line on stderr (``evaluate.measurement_line``, the dashboard's wording): rewritten in
    place on a terminal, else printed at every tenth of the way (a log file gets ten lines, not thousands).
    ``bar``: a tqdm bar already on stderr, whose postfix shows the line instead."""

    def __init__(self, bar=None):
        self.bar, self.tty, self.tenth = bar, sys.stderr.isatty(), None

    def __call__(self, line: str, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(line)
            self.bar.refresh()
        elif self.tty:
            print("\r" + line, end="\n" if done >= total else "", file=sys.stderr, flush=True)
        elif (tenth := 10 * done // max(total, 1)) != self.tenth or done >= total:
            self.tenth = tenth
            print(line, file=sys.stderr, flush=True)


def _load(args, tokenizer: bool = True):
    from .models import load_model
    return load_model(args.source, device=args.device, dtype=args.dtype, tokenizer=tokenizer,
                      trust_remote_code=args.trust_remote_code, revision=args.revision)


# ---- info
def add_info(p):
    _source(p)


def cmd_info(args) -> dict:
    lm = _load(args, tokenizer=False)   # anatomy only: no text is tokenized
    return {"source": args.source, "fingerprint": lm.fingerprint, **lm.anatomy.summary()}


# ---- scores, place
def _calib_args(p):
    p.add_argument("--calib", default=None, help="calibration text (.txt one per line, .json, .jsonl with "
                   "text/domain); default: the default model's validation text (built-in sentences for tiny: models)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8)
    p.add_argument("--max-length", type=_int_at_least(1), default=256, help="tokens per forward window (longer texts are cut into windows)")
    p.add_argument("--cache-dir", default=None, help="activation-statistics cache (default cache/activation)")


def _activation(args, lm):
    from .routing import activation_stats, calibration_hash, default_calibration, is_builtin, read_calibration
    texts, where = (read_calibration(args.calib), args.calib) if args.calib else default_calibration(args.source)
    if is_builtin(where) and not args.json:
        print(f"note: calibration = {where}", file=sys.stderr)
    stats = activation_stats(lm.model, lm.tokenizer, lm.anatomy, texts, batch_size=args.batch_size,
                             max_length=args.max_length, cache_dir=args.cache_dir, fingerprint=lm.fingerprint)
    return stats, {"source": where, "from": where, "builtin": is_builtin(where), "tokens": stats.num_tokens,
                   "hash": calibration_hash(texts, args.max_length), "domains": list(stats.domains),
                   "tokens_per_domain": dict(zip(stats.domains, stats.tokens.tolist()))}


def add_scores(p):
    _source(p)
    _calib_args(p)
    p.add_argument("--no-activation", action="store_true", help="skip frequency/weight (no forward passes)")
    p.add_argument("--stream", action="store_true", help="local folder only: MaxNNScore and Router Norm straight "
                   "from the safetensors shards, model never built (no frequency/weight)")
    p.add_argument("--neuron-norms", action="store_true", help="include every neuron's norm")


def _scores_table(out: dict) -> None:
    """One line per (MoE layer, expert): MaxNNScore, router norm and, when measured, frequency and weight."""
    import pandas as pd
    rows = []
    for layer in out["layers"]:
        for e, v in enumerate(layer["maxnn"]):
            rows.append({"layer": layer["layer"], "expert": e, "maxnn": v, "router_norm": layer["router_norm"][e],
                         **({"frequency": layer["frequency"][e], "weight": layer["weight"][e]} if "frequency" in layer
                            else {})})
    for k in ("source", "fingerprint", "streamed", "calibration"):
        if k in out:
            print(f"{k}: {json.dumps(out[k]) if isinstance(out[k], dict) else out[k]}")
    from .results import NA, number
    print(pd.DataFrame(rows).to_string(index=False, float_format=number, na_rep=NA))


def cmd_scores(args) -> dict:
    out = _scores(args)
    if args.json:
        return out
    _scores_table(out)
    return None


def _scores(args) -> dict:
    from .scores import expert_scores, stream_scores
    if args.stream:
        from .models import resolve_source
        kind, where = resolve_source(args.source)
        if kind not in ("folder", "default"):
            raise ValueError("--stream reads a local checkpoint folder; give its path (or drop --stream)")
        return {**stream_scores(where).to_dict(args.neuron_norms), "source": args.source, "streamed": True}
    lm = _load(args, tokenizer=not args.no_activation)   # text is tokenized only for frequency / weight
    out = {**expert_scores(lm.anatomy).to_dict(args.neuron_norms), "source": args.source,
           "fingerprint": lm.fingerprint}
    if not args.no_activation:
        stats, out["calibration"] = _activation(args, lm)
        for i, layer in enumerate(out["layers"]):
            layer["frequency"], layer["weight"] = stats.frequency[i].tolist(), stats.weight[i].tolist()
    return out


def add_place(p):
    _source(p)
    _calib_args(p)
    p.add_argument("--budget", required=True, type=_share, help="share of routed experts run digitally, in [0, 1]")
    p.add_argument("--strategy", default="maxnn", help=" | ".join(STRATEGIES) + " (" + ", ".join(
                   n for n, s in STRATEGIES.items() if s.needs == "measurement") + " need --preset)")
    p.add_argument("--preset", default=None, help="noise preset the oracle / local_error strategies measure under")
    p.add_argument("--seeds", type=_int_at_least(1), default=5, help="oracle: noise seeds of its measurement")
    p.add_argument("--tokens", type=_int_at_least(1), default=16384, help="oracle: calibration tokens of its measurement")
    _store_arg(p)
    p.add_argument("--scope", default="layer", help="layer (budget per MoE layer, the paper) | global")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the random strategy")
    p.add_argument("--analog-dense", default="", help="comma-separated dense kinds put on AIMC "
                   "(attention,lm_head,shared_experts,router,dense_mlp); default none (paper)")
    _hardware_args(p)


def _hardware_args(p):
    from .hardware import DEFAULT_HARDWARE, HARDWARE
    p.add_argument("--hardware", default=DEFAULT_HARDWARE, help=f"hardware preset: {' | '.join(HARDWARE)}")
    p.add_argument("--batch", type=int, default=32, help="tokens decoded together per step (paper: 32)")
    p.add_argument("--routing", default="auto", choices=["auto", "uniform", "measured"],
                   help="expert routing frequencies for the cost: measured on the calibration text, uniform "
                   "top-k/E, or auto (measured when the strategy already needs them)")


def _energy(args, lm, placement, stats) -> dict:
    """The energy block of a placement (energy.energy_block) on --hardware at --batch."""
    from .energy import energy_block, shapes_of
    if args.routing == "measured" and stats is None:
        stats, _ = _activation(args, lm)
    return energy_block(shapes_of(lm.model, lm.anatomy, args.source), placement, args.hardware, args.batch,
                        None if args.routing == "uniform" else stats)


def _check_hardware(args) -> None:
    from .energy import check_batch
    from .hardware import get_hardware
    get_hardware(args.hardware)
    check_batch(args.batch)


def cmd_place(args) -> dict:
    from .placement import DENSE_KINDS, DensePolicy, check_request, digital_share, place
    budget = args.budget
    check_request(args.strategy, budget, args.scope)
    _check_hardware(args)
    analog = [k.strip() for k in args.analog_dense.split(",") if k.strip()]
    if bad := [k for k in analog if k not in DENSE_KINDS]:
        raise ValueError(f"unknown dense kind(s) {', '.join(bad)}; choose from {', '.join(DENSE_KINDS)}")
    noise = None
    if needs(args.strategy) == "measurement":
        from .noise import get_preset
        if not args.preset:
            raise ValueError(f"strategy {args.strategy} measures damage under a noise preset: add --preset, "
                             "e.g. --preset paper-pcm-c2.5")
        noise = get_preset(args.preset)
        if args.seeds < 1 or args.tokens < 1:
            raise ValueError("--seeds and --tokens must be >= 1")
        if args.calib:
            from .routing import read_calibration
            read_calibration(args.calib)
    dense = DensePolicy(**{k: False for k in analog})
    stored = _stored_measurement(args, noise)
    if stored is not None and args.routing != "measured":   # no weights read (a hub model: GBs of them)
        from .energy import energy_block, shapes_from_source
        from .fingerprints import source_fingerprint
        shapes, anatomy = shapes_from_source(args.source)   # the config on the meta device: shapes only
        p = place(anatomy, args.strategy, budget, scope=args.scope, seed=args.seed, dense=dense, measured=stored)
        return {"source": args.source, "fingerprint": source_fingerprint(args.source, args.revision), "key": p.key,
                "placement": p.to_dict(), **digital_share(p, anatomy),
                "energy": energy_block(shapes, p, args.hardware, args.batch, None), "measurement": "stored"}
    needs_text = needs(args.strategy) in ("stats", "measurement") or args.routing == "measured"
    lm = _load(args, tokenizer=needs_text)   # text is tokenized only for routing statistics or measurements
    stats, calib = _activation(args, lm) if needs(args.strategy) == "stats" else (None, None)
    measured = stored
    if noise is not None and measured is None:
        from .evaluate import measurement_line
        from .sensitivity import measured_scores
        line = None if args.json else _StepLine()
        measured = measured_scores(lm, args.strategy, noise, store=args.store, texts=args.calib, seeds=args.seeds,
                                   tokens=args.tokens, progress=line and (lambda done, total: line(
                                       measurement_line(args.strategy, args.preset, done, total), done, total)))
    p = place(lm.anatomy, args.strategy, budget, scope=args.scope, seed=args.seed, stats=stats, dense=dense,
              measured=measured)
    out = {"source": args.source, "fingerprint": lm.fingerprint, "key": p.key, "placement": p.to_dict(),
           **digital_share(p, lm.anatomy), "energy": _energy(args, lm, p, stats)}
    if noise is not None:
        out["measurement"] = "stored" if stored is not None else "measured"
    if calib:
        out["calibration"] = calib
    return out


def _stored_measurement(args, noise) -> list | None:
    """The oracle's per-layer [E] scores (mean only-this damage, nats) when its measurement is stored — the request
    sensitivity.measured_scores makes, looked up by validation.stored_validation without loading the model — else
    None (not stored, or another strategy)."""
    if args.strategy != "oracle" or noise is None:
        return None
    from .validation import stored_validation
    v = stored_validation(args.source, noise, seeds=args.seeds, texts=args.calib, tokens=args.tokens,
                          store=args.store, device=args.device, dtype=args.dtype)
    return None if v is None else v.only_this()


# ---- energy: what a placement costs on hardware
def add_energy(p):
    add_place(p)


def cmd_energy(args) -> dict:
    out = cmd_place(args)
    e = out.pop("energy")
    keys = ("energy_per_token_j", "tokens_per_j", "tokens_per_s", "latency_s", "tiles", "chips", "digital_bytes")
    head = {"source": out["source"], "strategy": args.strategy, "budget": out["placement"]["budget"],
            "digital_share": out["digital_share"], **{k: e.pop(k) for k in keys}}
    if args.json:
        return {**head, **e}
    from .results import number
    for k, v in head.items():
        print(f"{k:<20} {number(v)}" if isinstance(v, float) else f"{k:<20} {v}")
    print(f"{'hardware':<20} {e['hardware']} at batch {e['batch']} ({e['routing']} routing; digital part "
          f"{e['digital_bound']}-bound)")
    for n, r in e["references"].items():
        print(f"  {n:<18} {r['energy_per_token_j']:.4g} J/token  {r['tokens_per_s']:.4g} tokens/s  "
              f"{r['tiles']} tiles  {r['chips']} chips")
    print("sources:")
    for k, v in e["citations"].items():
        print(f"  {k}: {v}")
    return None


# ---- evaluate, sweep, runs, export, import, report

def _eval_args(p, sweep: bool):
    _source(p)
    _store_arg(p)
    s = "s" if sweep else ""
    p.add_argument(f"--strateg{'ies' if sweep else 'y'}", dest="strategies", default="maxnn",
                   help=" | ".join(STRATEGIES) + (" (comma-separated)" if sweep else ""))
    p.add_argument(f"--budget{s}", dest="budgets", type=_shares, default=[0.125], help="digital budget(s) in [0, 1]"
                   + (" (comma-separated)" if sweep else ""))
    p.add_argument(f"--preset{s}", dest="presets", default="paper-pcm-c1.5", help="noise preset(s) (noise.PRESETS)")
    _set_arg(p)
    p.add_argument("--seeds", type=_int_at_least(1), default=1,
                   help="number of noise seeds (0..N-1): mean ± std over them")
    p.add_argument("--tasks", default="local", help="comma-separated tasks: the default model's (alias 'local'; "
                   "'ppl' = per-domain perplexity), paper_* (alias 'paper'), or any lm-eval task name")
    p.add_argument("--limit", type=_limit, default=None, help="documents per task (lm-eval --limit)")
    p.add_argument("--backend", default="fast", help=" | ".join(BACKENDS))
    p.add_argument("--scope", default="layer", help="layer | global")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="fixed for the whole run (enters the cache key)")
    p.add_argument("--num-fewshot", type=_int_at_least(0), default=0)
    p.add_argument("--no-ideal", action="store_true", help="skip the all-digital reference result")


def _run_eval(args, bar: bool) -> dict:
    import logging
    import os
    os.environ.setdefault("TQDM_DISABLE", "1")   # lm-eval's and datasets' per-task bars: only ours is shown
    for name in ("lm_eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from .evaluate import evaluate_many, summarize
    pbar = None
    if bar and not args.json:
        from tqdm import tqdm
        pbar = tqdm(total=None, desc="sweep", unit="result", file=sys.stderr, disable=False)

    def progress(done, total, r):
        if pbar is not None:
            pbar.total = total
            pbar.n = done
            if r["cached"]:   # cache hits arrive at once: the ETA's rate counts computed results only
                pbar.initial = done
            pbar.set_postfix_str(f"{r['task']} {r['strategy']} b={r['budget']} seed={r['seed']}"
                                 f"{' (cached)' if r['cached'] else ''}")
            pbar.refresh()
    kw = dict(strategies=args.strategies, budgets=args.budgets, presets=args.presets, seeds=args.seeds,
              tasks=args.tasks, limit=args.limit, backend=args.backend, scope=args.scope, batch_size=args.batch_size,
              num_fewshot=args.num_fewshot, include_ideal=not args.no_ideal, device=args.device, dtype=args.dtype,
              revision=args.revision, preset_overrides=dict(args.settings) or None)
    _announce(args, kw)
    try:
        # the oracle / local_error measurement before the first result says how far it is (here; not on Ray)
        run, extra = evaluate_many, ({} if args.json else {"measure_progress": _StepLine(pbar)})
        if getattr(args, "executor", "local") == "ray":
            from .ray_executor import RayOptions, evaluate_many_ray
            run, extra = evaluate_many_ray, {"options": RayOptions(address=args.address, workers=args.workers,
                                                                   gpus_per_worker=args.gpus_per_worker)}
        res = run(args.source, store=args.store, trust_remote_code=args.trust_remote_code, progress=progress,
                  **kw, **extra)
    finally:
        if pbar is not None:
            pbar.close()
    from .noise import get_preset
    settled = {p: get_preset(p, **dict(args.settings)).deterministic for p in _names(args.presets)}
    out = {"results": res, "summary": summarize(res), **_work_counts(res, settled)}
    if args.json:
        return out
    from .results import number   # the dashboard's formatter: n/a for missing, float rounding as 0
    for r in out["summary"]:
        std = (" deterministic" if r["ideal"] or settled.get(r["preset"])
               else "" if r["std"] is None else f" ± {number(r['std'], '.3g', r['mean'])}")
        print(f"{r['task']:<22} {r['metric']:<16} {r['strategy']:<11} budget={r['budget']:<6g} {r['preset']:<22} "
              f"{number(r['mean'])}{std} (n={r['n_seeds']}){' cached' if r['cached'] else ''}")
    print(_work_line(out))
    return None


def _work_counts(res: list[dict], deterministic: dict) -> dict:
    """How a sweep's results were obtained: computed (the model ran), shared (not run: an identical computation of
    this call gave the numbers, ``shared_from``), of which shared_deterministic are other seeds of a deterministic
    preset (``deterministic``: {preset: bool}) and the rest the same placement under another strategy (e.g.
    budget 0, every routed expert analog), and cached (already in the store)."""
    fresh = [r for r in res if not r["cached"]]
    shared = [r for r in fresh if r.get("shared_from")]
    return {"computed": len(fresh) - len(shared), "shared": len(shared),
            "shared_deterministic": sum(bool(deterministic.get(r["preset"])) for r in shared),
            "cached": len(res) - len(fresh)}


def _work_line(counts: dict) -> str:
    """_work_counts in words: "20 computed, 16 shared with identical computations (13 of deterministic presets,
    3 the same placement under another strategy), 1 from the cache"."""
    n, d = counts["shared"], counts["shared_deterministic"]
    parts = [f"{d} of deterministic presets" if d else "",
             f"{n - d} the same placement under another strategy" if n - d else ""]
    why = ", ".join(p for p in parts if p)
    shared = f"{n} shared with identical computations ({why}), " if n else ""
    return f"{counts['computed']} computed, {shared}{counts['cached']} from the cache"


LARGE_RUN = 200   # results: above this, say how many and about how long before starting


def _names(text) -> list[str]:
    return [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x and x.strip()]


def run_estimate(specs, store) -> dict:
    """How many of ``specs`` (evaluate.plan) are not stored yet and about how long computing them takes:
    {"total", "todo", "per_result_s" (median duration of this model's stored results, None when none), "timed"
    (how many stored results that median is of), "seconds" (None when unknown)}. Reads the store only."""
    have = store.existing_keys(s.key for s in specs)
    todo = sum(s.key not in have for s in specs)
    t = store.query("SELECT median(duration_s) AS t, count(*) AS n FROM runs WHERE status='ok' AND "
                    "model_fingerprint=? AND duration_s > 0", [specs[0].fingerprint]) if specs else None
    n = int(t.n.iloc[0]) if t is not None else 0
    per = float(t.t.iloc[0]) if n else None
    return {"total": len(specs), "todo": todo, "per_result_s": per, "timed": n,
            "seconds": None if per is None else per * todo}


def _announce(args, kw: dict) -> None:
    """Check the request before anything is created: every value (evaluate.plan) and, when the store does not exist
    yet, the lm-eval task names too (a misspelt task once left an empty store file behind). Before a run of more
    than LARGE_RUN results, print (stderr) how many will be computed and about how long that takes (nothing is
    loaded or computed here)."""
    from .evaluate import plan
    from .store import Store
    specs = plan(args.source, **kw)   # validates everything first: a bad value fails before the store is touched
    try:
        Store(args.store, create=False, read_only=True)
    except ValueError:   # no store yet: nothing is cached, so a misspelt task is checked before one is created
        from .evaluate import _check_registry_tasks
        _check_registry_tasks(specs)
    if len(specs) <= LARGE_RUN:
        return
    e = run_estimate(specs, Store(args.store))
    if e["seconds"] is None:
        eta = "time unknown: no stored result of this model to time yet (try a small --limit first)"
    else:
        secs = e["seconds"]
        eta = (f"about {secs / 3600:.1f} h" if secs > 5400 else f"about {secs / 60:.0f} min" if secs > 90
               else f"about {secs:.0f} s") + (f" at {e['per_result_s']:.1f} s per result (median of "
                                               f"{e['timed']} stored results of this model)")
    print(f"{e['total']} results: {e['todo']} to compute, {e['total'] - e['todo']} cached; {eta}", file=sys.stderr)


def add_evaluate(p):
    _eval_args(p, sweep=False)


def cmd_evaluate(args) -> dict:
    return _run_eval(args, bar=False)


def _executor_args(p, what: str):
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help=f"local: this process (default); ray: one Ray actor per worker, {what}")
    p.add_argument("--address", default=None, help="Ray cluster to join ('auto' = the one `ray start` made here, "
                   "or host:6379); default: a private local Ray for this run")
    p.add_argument("--workers", type=int, default=None, help="Ray actors, each loads the model once "
                   "(default: one per GPU, or one per driver-thread-count CPUs)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray actor (with --device cuda)")


def add_sweep(p):
    _eval_args(p, sweep=True)
    _executor_args(p, "results stored here")


def cmd_sweep(args) -> dict:
    return _run_eval(args, bar=True)


# ---- validate: measured expert sensitivity and criterion check
def add_validate(p):
    _source(p)
    _store_arg(p)
    p.add_argument("--preset", required=True, help="noise preset (noise.PRESETS; not 'ideal')")
    _set_arg(p)
    p.add_argument("--seeds", type=_int_at_least(1), default=5, help="noise seeds 0..N-1 (standard errors over them)")
    p.add_argument("--calib", default=None, help="calibration text (.txt, .json, .jsonl); default: the default "
                   "model's validation text")
    p.add_argument("--tokens", type=_int_at_least(1), default=16384,
                   help="calibration tokens measured (same for every expert)")
    p.add_argument("--bootstrap", type=_int_at_least(1), default=1000, help="bootstrap replicates of the correlation CIs")
    _executor_args(p, "one seed per Ray unit, combined and stored here")


def cmd_validate(args) -> dict:
    from .noise import get_preset
    from .routing import read_calibration
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1 (number of noise seeds), got {args.seeds}")
    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    noise = get_preset(args.preset, **dict(args.settings))
    if not (noise.weight_noise or noise.io_active):
        raise ValueError(f"preset {args.preset!r} has no nonideality, so every damage is 0; choose a noisy preset, "
                         "e.g. paper-pcm-c2.5")
    if args.bootstrap < 1:
        raise ValueError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    if args.calib:
        read_calibration(args.calib)   # an empty or unreadable file is refused before the model loads
    from .validation import stored_validation
    kw = dict(seeds=args.seeds, texts=args.calib, tokens=args.tokens, store=args.store, n_boot=args.bootstrap,
              device=args.device, dtype=args.dtype)
    v = stored_validation(args.source, noise, **kw)   # a stored request answers without torch
    if v is None:
        from .sensitivity import validate
        if args.executor == "ray":
            from .ray_executor import RayOptions
            kw["executor"] = RayOptions(address=args.address, workers=args.workers,
                                        gpus_per_worker=args.gpus_per_worker)
        v = validate(args.source, noise, **kw)
    out = v.to_dict()
    if args.json:
        return out
    _print_validation(out)
    return None


def _print_validation(d: dict) -> None:
    from .results import number   # the dashboard's formatter: n/a for missing, float rounding as 0
    se = lambda x: "" if x is None else f" ± {number(x, '.2e')}"  # noqa: E731
    print(f"model {d['model_fingerprint']}  preset {d['preset']}  seeds {d['seeds']}  tokens {d['tokens']} "
          f"({d['calibration']['source']})  clean NLL {d['clean_nll']:.4f} nats{'  (cached)' if d['cached'] else ''}")
    print("damage = increase of mean token NLL (nats), mean ± standard error over seeds")
    print(f"all routed experts analog: {number(d['all_experts']['damage'], '.3e')}{se(d['all_experts']['se'])}")
    for r in d["dense"]:
        print(f"only {r['kind']:<15} analog: {number(r['damage'], '.3e')}{se(r['se'])}")
    for r in d["layers"]:
        print(f"only MoE layer {r['layer']:<2} analog: {number(r['damage'], '.3e')}{se(r['se'])}")
    print(f"{'layer':>5} {'expert':>6} {'only_this':>10} {'se':>9} {'all_but_this':>12} {'se':>9}")
    for r in d["experts"]:
        f = lambda x: number(x, ".2e")  # noqa: E731
        print(f"{r['layer']:>5} {r['expert']:>6} {f(r['only_this']):>10} {f(r['only_this_se']):>9} "
              f"{f(r['all_but_this']):>12} {f(r['all_but_this_se']):>9}")
    print("rank correlation with only-this damage (95% bootstrap CI over experts and seeds)")
    print(f"{'criterion':<12} {'scope':>6} {'spearman':>8} {'CI':>17} {'kendall':>8} {'CI':>17}")
    g = lambda x: number(x, "+.2f")  # noqa: E731
    for r in d["correlations"]:
        print(f"{r['criterion']:<12} {str(r['scope']):>6} {g(r['spearman']):>8} [{g(r['spearman_lo'])}, "
              f"{g(r['spearman_hi'])}] {g(r['kendall']):>8} [{g(r['kendall_lo'])}, {g(r['kendall_hi'])}]")
    b = d["best"]
    if b.get("criterion"):
        verdict = "ranks best" if b["significant"] else "ranks first, but no difference from"
        print(f"best: {b['criterion']} {verdict} {b['runner_up']} (Spearman margin {g(b['margin'])}, 95% CI "
              f"[{g(b['margin_lo'])}, {g(b['margin_hi'])}])")
    print("routing drift (all routed experts analog vs digital)")
    for r in d["routing_drift"]:
        print(f"MoE layer {r['layer']}: top-k set changed for {100 * r['changed_share']:.2f}% of tokens; max/mean "
              f"expert load {r['load_max_over_mean_ideal']:.2f} -> {r['load_max_over_mean_noisy']:.2f}")


COMMANDS = {
    "info": (add_info, cmd_info, "anatomy summary of an MoE model"),
    "scores": (add_scores, cmd_scores, "MaxNNScore, per-projection maxima, router norm, frequency, weight"),
    "place": (add_place, cmd_place, "digital/analog placement of routed experts and its digital share"),
    "energy": (add_energy, cmd_energy, "energy per token, throughput, AIMC tiles and chips of a placement"),
    "evaluate": (add_evaluate, cmd_evaluate, "scores under a placement and noise preset, n seeds, cached"),
    "sweep": (add_sweep, cmd_sweep, "evaluate the product budgets x strategies x presets x seeds x tasks (resumable)"),
    "runs": (add_runs, cmd_runs, "list or filter stored results"),
    "validate": (add_validate, cmd_validate, "measured per-expert damage under a noise preset; criteria checked "
                 "against it (cached)"),
    "export": (add_export, cmd_export, "write chosen results to a portable snapshot (.zip of Parquet)"),
    "import": (add_import, cmd_import, "merge a snapshot into a store (idempotent, validated)"),
    "report": (add_report, cmd_report, "standalone HTML report (Plotly, offline) of a snapshot or store"),
    "presets": (add_presets, cmd_presets, "noise presets and every noise parameter: unit, allowed range, source"),
    "tasks": (add_tasks, cmd_tasks, "hetmoe's evaluation tasks by alias (local, ppl, paper); lm-eval's work too"),
}


def _print(out, as_json: bool):
    if as_json:
        print(json.dumps(out, indent=2, default=str))
        return
    for k, v in out.items():
        _print_item(k, v, "")


WIDTH = 100
"""Text output wraps at this many characters."""


def _scalar(v) -> str:
    """A value as text: floats to 6 significant digits, lists as JSON, anything else as str."""
    if isinstance(v, float):
        return f"{v:.6g}"
    return json.dumps(v, default=str) if isinstance(v, (list, tuple)) else str(v)


def _print_item(k, v, indent: str) -> None:
    """One key of a command's result as text: a scalar on its ``key: value`` line (wrapped at WIDTH), a dict of
    same-keyed flat dicts as a small table (one row per key), any other dict as indented ``key: value`` lines."""
    rows = isinstance(v, dict) and v and all(isinstance(r, dict) for r in v.values())
    cols = list(next(iter(v.values()))) if rows else []
    if rows and all(list(r) == cols and not any(isinstance(x, (dict, list)) for x in r.values()) for r in v.values()):
        cells = [[""] + cols] + [[str(name)] + [_scalar(x) for x in r.values()] for name, r in v.items()]
        w = [max(len(row[i]) for row in cells) for i in range(len(cols) + 1)]
        print(f"{indent}{k}:")
        for row in cells:
            print(indent + "  " + "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)))
    elif isinstance(v, dict):
        print(f"{indent}{k}:")
        for kk, vv in v.items():
            _print_item(kk, vv, indent + "  ")
    else:
        import textwrap
        print(textwrap.fill(_scalar(v), WIDTH, initial_indent=f"{indent}{k}: ", subsequent_indent=indent + "    ",
                            break_long_words=False, break_on_hyphens=False) or f"{indent}{k}: ")


def _quiet_progress_bars() -> None:
    """--json: no progress bars on stderr (transformers' "Loading weights", hub downloads). transformers reads
    HF_HUB_DISABLE_PROGRESS_BARS when first imported (huggingface_hub.utils.are_progress_bars_disabled); an already
    imported one is switched off directly."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    parser = _Parser(prog="python -m hetmoe_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="print JSON")
        add(p)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # a bad flag (one line already printed) or --help: an exit code, also in-process
        return e.code if isinstance(e.code, int) else 2
    if args.json:
        _quiet_progress_bars()
    try:
        out = COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment problem: one line for users, the traceback on request
        store_file = sys.modules.get(f"{__package__}.store_file")   # imported when a store was opened
        if store_file is not None and isinstance(e, store_file.StoreBusy):   # another process writes the store
            print(f"error: {e}", file=sys.stderr)
            return 1
        if os.environ.get("HETMOE_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set HETMOE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    if out is not None:
        _print(out, args.json)
    return 0
