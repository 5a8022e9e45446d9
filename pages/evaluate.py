"""Evaluate page: a noise preset (every parameter editable), strategies, budgets, seeds, tasks; run in background."""
import streamlit as st

from hetmoe_core import evaluate as ev
from hetmoe_core import figures, jobs, results, ui
from hetmoe_core.noise import PRESET_DOCS, PRESETS, field_docs, slow_tile_warning
from hetmoe_core.noise import preset_label as preset_label_of
from hetmoe_core.placement import DENSE_KINDS
from hetmoe_core.store import Store, StoreBusy

ui.frame()
st.title("Noisy evaluation")
st.caption("Run the model with its analog part on simulated AIMC tiles and score it with the lm-eval harness. "
           "Every result is stored; a configuration that was run before is answered from the store at once.")
ss = st.session_state
h = ui.require_model()
jobs.restore_form("eval_job")   # a reload: the form shows the running job's request, not the defaults

# ---------------------------------------------------------------- noise preset, every field editable
# Help, unit and allowed range of every widget come from NoiseConfig's field metadata (noise.field_docs), the one
# source the CLI's `presets` command reads too.
DOCS = field_docs()
presets = list(PRESETS)
if ss.get("preset") not in presets:
    ss["preset"] = presets[0]
c1, c2 = st.columns([2, 3])
preset = c1.selectbox("Noise preset", presets, key="preset", persist_state="session",
                      help="Start from a preset; every parameter below can be changed.")
c2.info(PRESET_DOCS.get(preset, ""))
base = PRESETS[preset]


def noise_help(doc: dict) -> str:
    """A parameter's tooltip: its meaning, allowed range (ui.allowed_text) and the source of its formula, from the
    field metadata."""
    allowed = ui.allowed_text(doc)
    return f"{doc['help']}\n\n{f'Allowed: {allowed}. ' if allowed else ''}Source: {doc['source']}."


def noise_label(name: str, doc: dict) -> str:
    """A parameter's label with its unit, and what 0 stands for when the field is optional (None)."""
    unit = doc["unit"] if doc["unit"] not in ("", "unitless", "on/off") else ""
    zero = f"0 = {doc['optional']}" if doc["optional"] else ""
    extra = ", ".join(x for x in (unit, zero) if x)
    return f"{name} ({extra})" if extra else name


with st.expander("Noise parameters (units in the labels, meaning and source in the tooltips)", expanded=False):
    cols = st.columns(4)
    vals = {}
    for i, (name, doc) in enumerate((n, d) for n, d in DOCS.items() if n != "name"):
        v, col, allowed = getattr(base, name), cols[i % 4], doc["allowed"]
        kw = dict(key=f"nz_{preset}_{name}", help=noise_help(doc), persist_state="session")
        label = noise_label(name, doc)
        if isinstance(allowed[0], str):                             # a choice among names
            vals[name] = col.selectbox(label, allowed, index=allowed.index(v), **kw)
        elif isinstance(allowed[0], bool):
            vals[name] = col.checkbox(label, v, **kw)
        # numbers: no widget bounds — a browser holds an out-of-range entry red and sends the old value, so the
        # run would silently use it; NoiseConfig's range check (the field metadata) refuses it in one line below
        # integers: a float box shown as %g (Streamlit's integer box reads a typed "1e9" as 1); a whole number goes
        # on as an int, anything else as typed, for NoiseConfig to refuse
        elif isinstance(allowed[0], int):                           # optional: 0 stands for None
            x = col.number_input(label, value=float((v or 0) if doc["optional"] else v), step=1.0, format="%g", **kw)
            num = int(x) if float(x).is_integer() else x
            vals[name] = (num or None) if doc["optional"] else num
        else:
            num = col.number_input(label, value=float(v or 0.0), format="%.4g", **kw)
            vals[name] = (num or None) if doc["optional"] else num
overrides = {k: v for k, v in vals.items() if v != getattr(base, k)}
try:
    noise = base.replace(**overrides)
except ValueError as e:            # one line naming the parameter and its allowed range; nothing runs
    st.error(f"{e} above.")
    st.stop()
preset_label = preset_label_of(preset, noise)
if overrides:
    st.caption(f"Preset **{preset_label}**: " + ", ".join(f"{k} = {v} (preset: {getattr(base, k)})"
                                                         for k, v in overrides.items()))
    if slow := slow_tile_warning([mat for m in ui.shapes(h).moe for mat in m.matrices], noise, base):
        st.warning(slow)

job = jobs.page_job("eval_job")   # after a reload: the job the URL names
running_now = job is not None and job.running   # the model is busy: nothing is timed on it

# ---------------------------------------------------------------- sweep
aliases = ev.task_aliases()
tasks_all = aliases.get("local", []) + [t for t in aliases.get("paper", []) if t not in aliases.get("local", [])]
c1, c2, c3 = st.columns(3)
strategies = c1.multiselect("Strategies", list(ev.STRATEGIES), default=[ss.get("strategy", "maxnn")],
                            format_func=figures.STRATEGY_LABELS.get, key="ev_strategies", persist_state="session",
                            help="Oracle and Local output error measure the model under the chosen preset first: "
                                 "the oracle's measurement (Validate page, 5 seeds x 16,384 tokens) takes minutes on "
                                 "a CPU unless it is stored; Local output error takes one calibration pass.")
budgets_txt = c2.text_input("Digital budgets (%)", f"{ui.budget() * 100:g}", key="ev_budgets", persist_state="session",
                            help=ui.BUDGETS_HELP)
first = next((t for t in ("hetmoe_cloze", "hetmoe_choice") if t in tasks_all), tasks_all[0] if tasks_all else None)
tasks = c3.multiselect("Tasks", tasks_all, default=[first] if first else [], key="ev_tasks", persist_state="session",
                       help="hetmoe_* tasks ship with the default model; paper_* are the paper's zero-shot suite.")
c1, c2, c3, c4 = st.columns(4)
# whole numbers: no widget bounds (as for the noise fields); ui.sweep_number_problem refuses a value out of range below
# float boxes shown as whole numbers: Streamlit's integer box reads a typed "1e9" as 1, a float box as 1e9 (refused)
nums = {name: float(col.number_input(ui.SWEEP_NUMBERS[name][0], value=float(default), step=1.0, format="%g", key=key,
                                     persist_state="session", help=ui.sweep_number_help(name)))
        for name, col, default, key in (("seeds", c1, 1, "ev_seeds"), ("limit", c2, 20, "ev_limit"),
                                        ("batch_size", c4, 8, "ev_batch"))}
backend = c3.radio("Backend", list(ev.BACKENDS), key="ev_backend", persist_state="session", horizontal=True,
                   help="fast: vectorised, aihwkit's noise functions; aihwkit: reference, one layer per expert (slow).")
dense = {k: bool(ss.get(f"dense_{k}", True)) for k in DENSE_KINDS}
st.caption(f"Placement page: budget **{ui.budget() * 100:g}%**, scope **{ss.get('scope', 'layer')}**; dense modules "
           "digital: " + (", ".join(figures.KIND_LABELS[k] for k, v in dense.items()
                                    if v and h.lm.anatomy.modules.get(k)) or "none")
           + " (scope and dense modules are set on the Placement page).")



def _blocked(message: str) -> None:
    """A form error: its line, Run shown disabled (not gone), and the page ends here."""
    st.error(message)
    st.columns([1, 5])[0].button("Run", type="primary", disabled=True, key="ev_run",
                                 help="Disabled until the error above is fixed.")
    st.stop()


if problem := ui.sweep_form_problem(strategies, tasks) or ui.sweep_number_problem(**nums):
    _blocked(problem)
seeds, limit, batch = (int(nums[k]) for k in ("seeds", "limit", "batch_size"))
try:
    budgets = ui.budgets_from_text(budgets_txt)
except ValueError as e:
    _blocked(f"Digital budgets (%): {e}.")
for note in ui.budget_notes(budgets, h.lm.anatomy, ss.get("scope", "layer")):
    st.info(f"Digital budgets (%): {note}")
kw = dict(strategies=strategies, budgets=budgets, presets=[preset], seeds=int(seeds), tasks=tasks,
          limit=int(limit) or None, backend=backend, batch_size=int(batch), scope=ss.get("scope", "layer"),
          dense=dense, preset_overrides=overrides or None, device=ss["device"], dtype=ss["dtype"])
store = have = None
try:
    specs = ev.plan(ss["source"], **kw)
    store = Store()
    have = store.existing_keys(s.key for s in specs)
except StoreBusy as e:     # another process writes the store: say so in one line, the form stays usable
    ui.store_busy(e)
except ValueError as e:
    _blocked(f"{e}")
if not running_now and have is not None and (note := ui.measurement_notice(h, strategies, noise, store,
                                                                          preset_label)):
    st.warning(note)
st.markdown(f"**{len(specs)} results** in this sweep under **{preset_label}** (ideal references included): "
            + (f"**{len(have)} cached**, {len(specs) - len(have)} to compute." if have is not None else
               "how many are cached is not known while another process writes the store."))


def _start(source, kw):
    """Run's callback: the job starts before the page is drawn, so the page draws Run disabled from this run on."""
    ss["eval_job"] = jobs.Job(h, source=source, store=None, **kw)


running = running_now
b1, b2 = st.columns([1, 5])
b1.button("Run", type="primary", disabled=running or not specs, key="ev_run", on_click=_start,
          args=(ss["source"], kw), help="Disabled while an evaluation runs." if running else None)
if running:
    b2.caption("An evaluation is running: Run is disabled until it ends or is cancelled.")


def running_text(j) -> str:
    last = j.results[-1] if j.results else None
    what = (f"last: {last['task']} · {last['strategy']} · {last['budget'] * 100:g}%"
            f"{' (cached)' if last['cached'] else ''}") if last else "loading the model and the tasks"
    return f"{j.done} / {j.total or '?'} results · {what} · {j.elapsed:.0f} s"


def ended(j) -> None:
    if j.kwargs != {"source": ss["source"], "store": None, **kw}:   # the form changed since: say whose it is
        how = {"done": "done", "cancelled": "cancelled"}.get(j.status, f"stopped ({j.error})")
        kept = "they are stored; the Results page shows them" if j.results else "nothing was stored"
        st.info(f"Previous run, with other settings than the form shows now: {how}, {len(j.results)} results in "
                f"{j.elapsed:.1f} s ({kept}).")
        return
    if j.status == "done":
        st.success(f"Done: {len(j.results)} results in {j.elapsed:.1f} s "
                   f"({sum(r['cached'] for r in j.results)} from the cache).")
    elif j.status == "cancelled":
        st.warning(ev.cancelled_line(len(j.results)))
    else:
        st.error(f"The evaluation stopped: {j.error}")
    if j.results:
        st.dataframe(results.result_rows(j.results), hide_index=True)


jobs.job_progress("eval_job", running_text, ended, cancel_key="ev_cancel",
                cancel_note="Cancelling: the evaluation stops within one layer's forward; finished results stay "
                            "stored.")
if (job is None or not job.running) and have and (job is None or job.kwargs != {"source": ss["source"],
                                                                                   "store": None, **kw}):
    st.markdown("**Cached results of this configuration** (shown without running):")
    st.dataframe(results.result_rows([results.stored_result(store, s.key) for s in specs if s.key in have]),
                 hide_index=True)

# ---------------------------------------------------------------- routing drift of the placement
noisy = [s for s in specs if not s.ideal and s.budget < 1 and s.preset != "ideal"]   # something is analog
if noisy:
    first = noisy[0]
    with st.expander("Routing drift: does the noise change which experts the router picks?"):
        st.caption(f"The sweep's first noisy result — {figures.STRATEGY_LABELS.get(first.strategy, first.strategy)}, "
                   f"{first.budget * 100:g}% digital, {preset_label}, seed {first.seed} — against the digital "
                   "model on 1,024 calibration tokens: per MoE layer, the share of tokens whose top-k expert set "
                   "changes, and the max/mean expert load before and after (ROMER, arXiv 2605.11800, reports noise "
                   "breaking expert load balance).")
        if st.button("Measure routing drift", key="ev_drift", disabled=running,
                     help="Routes the calibration tokens through the digital and the noisy model (a few seconds). Disabled while an evaluation runs on this model."):
            try:
                with st.spinner("Routing the calibration tokens, digital and noisy …"):
                    ss["ev_drift_rows"] = (first.key, ev.spec_routing_drift(h.lm, first, store))
            except (ValueError, StoreBusy) as e:
                st.error(str(e))
        got = ss.get("ev_drift_rows")
        if got and got[0] == first.key:
            st.plotly_chart(figures.routing_drift({"routing_drift": got[1]}), key="ev_drift_chart")
            view, notes = results.drift_view(got[1])
            st.dataframe(view, hide_index=True)
            for n in notes:
                st.caption(n)
