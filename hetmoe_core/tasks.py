"""Tasks: which lm-eval task a name stands for, its content version, and the lm-eval adapter that runs one.

Names resolve to ``TaskRef``s: the default model's local tasks (``hetmoe_core/assets/tasks``, versioned by a hash of
their folder), the paper suite built by ``paper_tasks``, and any lm-eval registry task (versioned by the lm-eval
version). ``_run_task`` runs one task through ``lm_eval.simple_evaluate`` on the model as it is now.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .store import canonical_json

os.environ.setdefault("DISABLE_MULTIPROC", "1")   # lm-eval's bootstrap stderr: no process pool inside our process
ASSETS = Path(__file__).resolve().parent / "assets"
LOCAL_TASKS = ASSETS / "tasks"
BOOTSTRAP_ITERS = 1000             # lm-eval bootstrap draws for perplexity stderr (deterministic seeds in lm-eval)


@dataclass(frozen=True)
class TaskRef:
    """A resolved task: lm-eval name, content version (enters the key), folder for TaskManager or None."""
    name: str
    version: str
    include_path: str | None = None


_local_index: dict = {}


def _local_tasks() -> dict[str, TaskRef]:
    """lm-eval tasks shipped in hetmoe_core/assets/tasks (hetmoe_cloze, hetmoe_choice, hetmoe_ppl_<domain>),
    versioned by a hash of the files of their folder; re-read when a file's size or mtime changes."""
    if not LOCAL_TASKS.is_dir():
        return {}
    with _local_lock:
        return _scan_local_tasks()


_local_lock = threading.Lock()


def _scan_local_tasks() -> dict[str, TaskRef]:
    files = sorted(p for p in LOCAL_TASKS.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    stamp = canonical_json([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    if _local_index.get("stamp") != stamp:
        out = {}
        for y in files:
            if y.suffix not in (".yaml", ".yml"):
                continue
            for line in y.read_text(encoding="utf-8").splitlines():
                name = line.split(":", 1)[1].strip().strip("'\"") if line.startswith("task:") else ""
                if name:   # a group's "task:" line lists its members below: not a task name
                    h = hashlib.sha256()
                    for f in sorted(p for p in y.parent.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
                        h.update(f.name.encode() + f.read_bytes())
                    out[name] = TaskRef(name, h.hexdigest()[:16], str(y.parent))
        _local_index.update(stamp=stamp, tasks=out)
    return dict(_local_index["tasks"])


def task_aliases() -> dict[str, list[str]]:
    """Names that stand for several tasks: "paper" (the paper's offline suite), "local" (the default model's),
    "ppl" (its per-domain perplexity tasks)."""
    from .paper_tasks import PAPER_TASKS
    local = sorted(_local_tasks())
    return {"paper": list(PAPER_TASKS), "local": local, "ppl": [t for t in local if t.startswith("hetmoe_ppl_")]}


TASK_LISTING = ("`python -m hetmoe_core tasks` lists hetmoe's tasks and aliases, `lm-eval ls tasks` lm-eval's")


def lm_eval_may_know(names) -> list[str]:
    """The names among ``names`` that occur somewhere in lm-eval's task folder (its yaml and Python files);
    a name in no file is certainly no lm-eval task, group or tag, which this tells in about a second instead of
    the ~20 s lm-eval's TaskManager takes to index its ~14,000 task files (the full check then runs on the rest)."""
    import lm_eval.tasks
    left = {n: n.encode() for n in names}
    found = []
    for f in Path(lm_eval.tasks.__file__).parent.rglob("*"):
        if not left:
            break
        if f.suffix in (".yaml", ".py") and f.is_file():
            data = f.read_bytes()
            for n in [n for n, b in left.items() if b in data]:
                found.append(n)
                del left[n]
    return [n for n in names if n in found]


def resolve_tasks(tasks) -> list[TaskRef]:
    """Task names (list or comma-separated string; aliases from task_aliases) -> TaskRefs.

    Local and paper tasks get a content version; any other name is an lm-eval registry task, versioned by the
    lm-eval version (its yaml ships with it) and checked against the registry when it first has to run.
    Raises ValueError for an empty list.
    """
    from .evaluate import library_versions
    from .paper_tasks import PAPER_TASKS, paper_task_version, DEFAULT_DIR
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise ValueError("no task given; e.g. --tasks hetmoe_cloze,paper_arc_easy (aliases: paper, local)")
    aliases, local, out = task_aliases(), _local_tasks(), []
    for n in names:
        for name in aliases.get(n, [n]):
            if name in PAPER_TASKS:
                ref = TaskRef(name, paper_task_version(name), str(DEFAULT_DIR))
            elif name in local:
                ref = local[name]
            else:
                ref = TaskRef(name, f"lm_eval={library_versions()['lm_eval']}", None)
            if ref not in out:
                out.append(ref)
    if not out:
        raise ValueError(f"tasks {names} name no task (the 'local' tasks ship with the default model)")
    return out

_tm_lock = threading.Lock()
_task_managers: dict = {}


def _task_manager(include_paths: tuple, defaults: bool):
    from lm_eval.tasks import TaskManager
    with _tm_lock:
        # task folders built later in this process (e.g. another paper task) must be indexed too
        k = (include_paths, defaults, tuple(sorted(str(f) for d in include_paths for f in Path(d).rglob("*.yaml"))))
        if k not in _task_managers:
            _task_managers[k] = TaskManager(include_path=list(include_paths) or None, include_defaults=defaults)
        return _task_managers[k]


def higher_is_better(metric: str) -> bool | None:
    """Direction of a metric by name ("acc", "perplexity", "acc_norm[filter]"), from lm-eval's metric registry
    (``lm_eval.api.registry.is_higher_better``); None when lm-eval does not know the metric. Used where a stored
    result predates the stored direction."""
    from lm_eval.api.registry import is_higher_better
    return is_higher_better(metric.split("[", 1)[0])


def _env_info_once() -> None:
    """Make lm-eval collect its environment report (and its git hash) once per process, not after every task.

    ``simple_evaluate`` ends every call with ``add_env_info``, which runs torch's ``collect_env`` (``pip list``,
    ``lsb_release``, ... as subprocesses): about 1 s per task, measured, more than a small task's forwards, and
    a stretch no Cancel can interrupt (``bench/bench_cancel.py`` found most slow cancels there). hetmoe never reads
    that report (every result stores its own library versions), so later calls get a copy of the first one.
    The official route without it, ``lm_eval.evaluator.evaluate``, would mean re-typing simple_evaluate's seeding
    and few-shot set-up, which must stay lm-eval's own so that the numbers are lm-eval's."""
    import copy
    from lm_eval import evaluator
    if getattr(evaluator.add_env_info, "hetmoe_once", False):
        return
    collect, first = evaluator.add_env_info, {}
    git_hash, commit = evaluator.get_git_commit_hash, []

    def add_env_info(storage: dict) -> None:
        if not first:
            collect(first)
        storage.update(copy.deepcopy(first))

    def get_git_commit_hash():   # likewise `git describe` in a subprocess per task (~20 ms, measured): once
        if not commit:
            commit.append(git_hash())
        return commit[0]
    add_env_info.hetmoe_once = True
    evaluator.add_env_info, evaluator.get_git_commit_hash = add_env_info, get_git_commit_hash


def _torch_seed_cheap() -> None:
    """Make lm-eval's per-call torch seeding cost the seeding: ``simple_evaluate`` calls ``torch.manual_seed(1234)``
    (``lm_eval.utils.set_torch_seed``) on every call, and where no accelerator is initialised that call queues a lazy
    seed for CUDA, XPU and MTIA, each with a ``traceback.format_stack()`` (a linecache ``stat`` per frame): ~0.7 ms
    at lm-eval's call depth, measured, against ~4 us for the seed itself (``bench/bench_overhead.py``). The queued
    seeds act only when such a device is initialised later, and every later call then finds it initialised and runs
    lm-eval's own ``torch.manual_seed``: so while none is initialised (nor MPS or a custom device present), seeding
    the CPU generator alone (``torch.default_generator``, as ``torch.manual_seed`` does) draws the same numbers."""
    from lm_eval import evaluator
    if getattr(evaluator.set_torch_seed, "hetmoe_cheap", False):
        return
    full = evaluator.set_torch_seed

    def set_torch_seed(seed: int) -> None:
        import torch
        lazy = (torch.cuda, torch.xpu, torch.mtia)
        if (torch._C._has_mps or any(m.is_initialized() for m in lazy)
                or hasattr(torch, torch._C._get_privateuse1_backend_name())):
            full(seed)
        else:
            torch.default_generator.manual_seed(int(seed))
    set_torch_seed.hetmoe_cheap, set_torch_seed.lm_eval_set_torch_seed = True, full
    evaluator.set_torch_seed = set_torch_seed


def _task_log_when_shown() -> None:
    """Make lm-eval list the selected tasks (``evaluator._log_selected_tasks``) only when its logger shows INFO.

    ``simple_evaluate`` calls it on every call; it only logs (``evaluator_utils.eval_logger.info`` lines of the task
    hierarchy and each task's yaml path), but builds those lines first: ~0.15 ms per call (measured,
    ``bench/bench_overhead.py``), and hetmoe sets lm-eval's logger to ERROR (``_run_task``), where none of them is
    shown. With INFO shown (a user raising lm-eval's log level), lm-eval's own function runs."""
    from lm_eval import evaluator, evaluator_utils
    if getattr(evaluator._log_selected_tasks, "hetmoe_shown", False):
        return
    full = evaluator._log_selected_tasks

    def _log_selected_tasks(*a, **k):
        if evaluator_utils.eval_logger.isEnabledFor(logging.INFO):
            full(*a, **k)
    _log_selected_tasks.hetmoe_shown, _log_selected_tasks.lm_eval_log_selected_tasks = True, full
    evaluator._log_selected_tasks = _log_selected_tasks


_TEMPLATES_KEPT = 1024   # compiled Jinja templates kept per process (a task has a few; lm-eval's registry ~14,000 files)


def _templates_once() -> None:
    """Make lm-eval compile each prompt template (``doc_to_text``, ``doc_to_target``, ``doc_to_choice``, ...) once
    per process, not on every document of every call.

    lm-eval renders a task's prompts with ``lm_eval.utils.apply_template(template, doc)``, which calls Jinja's
    ``Environment.from_string`` each time: a parse and compile to Python (~1 ms per template, measured; Jinja's
    own template cache serves loaders, not ``from_string``), about 3 per document. A compiled ``jinja2.Template`` is
    immutable and renders the same text for the same document (Jinja documents rendering as thread-safe), so later
    calls render the kept compile of the same template string from lm-eval's own environment (its filters and
    ``StrictUndefined``): the prompts, and so every number, are lm-eval's (test)."""
    import functools
    from lm_eval import utils
    if getattr(utils.apply_template, "hetmoe_once", False):
        return

    @functools.lru_cache(maxsize=_TEMPLATES_KEPT)
    def compiled(env, template: str):
        return env.from_string(template)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(utils.env, template).render(**doc)
    apply_template.hetmoe_once, apply_template.compiled = True, compiled
    apply_template.lm_eval_apply_template = utils.apply_template
    utils.apply_template = apply_template


def _built_tasks(tm, ref: TaskRef, num_fewshot, built: dict | None) -> list:
    """What ``simple_evaluate`` gets as ``tasks``: the task's name, or with ``built`` (a dict the caller keeps, per
    model and under its lock) the lm-eval Task / Group objects that lm-eval's ``TaskManager.load`` built for it
    the first time, kept per (task, include path, few-shot count). Building a task reads its documents (~40 ms
    for a local JSON task, measured), more than half of a one-document result's forward; ``simple_evaluate``
    takes built objects as they are (``TaskManager.load`` passes Task and Group through), re-sets their few-shot
    count and seed, and builds each call's requests afresh, so the numbers are those of a fresh build (test)."""
    if built is None:
        return [ref.name]
    key = (ref.name, ref.include_path, num_fewshot)
    if key not in built:
        loaded = tm.load([ref.name])
        for task in loaded["tasks"].values():
            _config_once(task)
            _requests_once(task)
            _docs_once(task)
        built[key] = _Kept([loaded["groups"][ref.name]] if ref.name in loaded["groups"] else loaded["tasks"].values())
        built[key].task_manager = tm
    return list(built[key])


class _Kept(list):
    """The lm-eval Task / Group objects built for one (task, include path, few-shot count), and ``task_manager``: the
    TaskManager that built them, which ``simple_evaluate`` is given again with them (finding it anew lists the
    task folder's files, ~0.5 ms per call, measured)."""
    task_manager = None


def _config_once(task) -> None:
    """Make a kept lm-eval Task dump its config (``Task.dump_config``) once per value of the fields
    ``simple_evaluate`` sets on every call (``num_fewshot``, ``generation_kwargs``), not on every call.

    lm-eval's ``_collect_results`` dumps the whole TaskConfig of each task after every evaluation, for the
    ``configs`` of its results: ``dataclasses.asdict`` plus ``inspect.getsource`` of each function field, ~1 ms
    per call (measured, ``bench/bench_overhead.py``), which hetmoe never reads (its own config is stored with every
    result). A kept task's other fields are fixed for its life; each call gets its own copy of the dump."""
    own = type(task).dump_config
    kept: dict = {}

    def dump_config() -> dict:
        key = (task.config.num_fewshot, repr(task.config.generation_kwargs))
        if key not in kept:
            kept[key] = own(task)
        return dict(kept[key])
    task.dump_config = dump_config


_KEPT_MAX = 4096   # requests / documents of one kept build at most (tasks._requests_once, tasks._docs_once)
_REQUESTS_OWN = {"samples": None, "cache_requests": False, "rewrite_requests_cache": False,
                 "apply_chat_template": False, "chat_template": None}   # any other value: lm-eval's own build


def _requests_once(task) -> None:
    """Make a kept lm-eval Task build its requests (``Task.build_all_requests``) once per (limit, rank, world size,
    tokenizer name, generation kwargs) while it runs zero-shot, not on every call.

    ``simple_evaluate`` rebuilds every request of every call: it iterates the task's documents (a ``datasets``
    row read each) and renders their prompts, ~0.7 ms per call of a one-document task (measured,
    ``bench/bench_overhead.py``'s steady state, where a sweep's 24 results at ``--limit 1`` re-ran it 24 times
    for the same document). Zero-shot, a request depends only on the task's fixed documents and config and on
    those arguments (no few-shot sampler draws), so each later call gets fresh copies of the first build's
    ``Instance`` objects (the same document, arguments and metadata; empty ``resps`` / ``filtered_resps``, which
    lm-eval fills per call); the system instruction and ``fewshot_as_multiturn`` enter the key too. Any other
    case (few-shot, ``samples``, lm-eval's request cache on disk, a chat template) and a build of more than
    ``_KEPT_MAX`` requests take lm-eval's own build unchanged. The documents are shared between calls, as lm-eval's
    own request cache (``cache_requests``) shares them. The numbers equal a fresh build's (test)."""
    import copy
    own = type(task).build_all_requests
    kept: dict = {}

    def fresh(insts):
        out = []
        for inst in insts:
            c = copy.copy(inst)
            c.resps, c.filtered_resps = [], {}
            out.append(c)
        return out

    def build_all_requests(**kw):
        rest = {k: v for k, v in kw.items() if k not in _REQUESTS_OWN}
        if task.config.num_fewshot not in (0, None) or any(kw.get(k, v) is not v for k, v in _REQUESTS_OWN.items()) \
                or not all(v is None or isinstance(v, (str, int, bool)) for v in rest.values()):
            return own(task, **kw)
        key = (tuple(sorted(rest.items())), repr(task.config.generation_kwargs))
        if key not in kept:
            own(task, **kw)
            if len(task._instances) > _KEPT_MAX:   # a large build: its forwards dwarf building it again
                return None
            kept[key] = fresh(task._instances)
        task._instances = fresh(kept[key])
    task.build_all_requests = build_all_requests
    task.build_all_requests.kept = kept


def _docs_once(task) -> None:
    """Make a kept lm-eval Task list its documents (``Task.doc_iterator``) once per (rank, limit, world size), not on
    every call.

    lm-eval's ``evaluate`` iterates the task's documents after the forwards to score each one
    (``process_results``); every iteration reads each row from the ``datasets`` table anew, ~0.4 ms per call of a
    one-document task (measured, ``bench/bench_overhead.py``'s steady state). A kept task's documents are fixed,
    so later calls iterate the (doc id, document) pairs the first one listed: the documents lm-eval's own request
    cache (``cache_requests``) and the kept requests (:func:`_requests_once`) share between calls too. With
    ``samples``, or more than ``_KEPT_MAX`` documents, lm-eval's own iterator runs. The numbers equal lm-eval's
    (test)."""
    own = type(task).doc_iterator
    kept: dict = {}

    def doc_iterator(*, rank=0, limit=None, world_size=1, samples=None):
        if samples:
            return own(task, rank=rank, limit=limit, world_size=world_size, samples=samples)
        key = (int(rank), int(limit) if limit else None, int(world_size))
        if key not in kept:
            docs = list(own(task, rank=rank, limit=limit, world_size=world_size, samples=samples))
            if len(docs) > _KEPT_MAX:
                return iter(docs)
            kept[key] = docs
        return iter(kept[key])
    task.doc_iterator = doc_iterator
    task.doc_iterator.kept = kept


def _run_task(hflm, ref: TaskRef, spec, built: dict | None = None) -> list[dict]:
    """One lm-eval task on the model as it is now; returns [{task, metric, value, stderr, higher_is_better}]
    (the direction as the task's results declare it, ``results["higher_is_better"][task]``). ``built``: see
    :func:`_built_tasks` (None: lm-eval builds the task from its name)."""
    import lm_eval
    _env_info_once()
    _templates_once()
    _torch_seed_cheap()
    _task_log_when_shown()
    kept = built.get((ref.name, ref.include_path, spec.num_fewshot)) if built is not None else None
    tm = kept.task_manager if kept is not None else \
        _task_manager((ref.include_path,) if ref.include_path else (), ref.include_path is None)
    limit = None if spec.limit is None else (int(spec.limit) if spec.limit >= 1 else spec.limit)
    tasks = _built_tasks(tm, ref, spec.num_fewshot, built)
    # lm-eval's messages at ERROR level: set on its logger (Python logging) only when it differs, as simple_evaluate's
    # deprecated ``verbosity`` would re-set it after every call (logging then clears every logger's cache: ~1 ms)
    lm_eval_logger = logging.getLogger("lm_eval")
    if lm_eval_logger.level != logging.ERROR:
        lm_eval_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):   # lm-eval prints progress notes; stdout stays for --json
            res = lm_eval.simple_evaluate(model=hflm, tasks=tasks, task_manager=tm, limit=limit,
                                          num_fewshot=spec.num_fewshot, bootstrap_iters=BOOTSTRAP_ITERS,
                                          log_samples=False)
    except AssertionError:   # lm-eval asserts that every answer fits the model's context window
        raise ValueError(f"task {ref.name} has answers longer than the model's context window "
                         f"({hflm.max_length} tokens); choose another task or a model with a longer context") from None
    out = []
    for task, vals in res["results"].items():
        direction = res.get("higher_is_better", {}).get(task, {})   # lm-eval's own metric direction
        for k, v in vals.items():
            if "," not in k or "_stderr," in k or not isinstance(v, (int, float)):
                continue
            metric, filt = k.split(",", 1)
            se = vals.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric}[{filt}]"
            hib = direction.get(metric)
            out.append({"task": task, "metric": name, "value": float(v),
                        "stderr": float(se) if isinstance(se, (int, float)) else None,
                        "higher_is_better": bool(hib) if hib is not None else higher_is_better(name)})
    if not out:
        raise RuntimeError(f"lm-eval returned no metrics for {ref.name}")
    return out


_QUIET: list = []
_TOKENS_KEPT_BYTES = 32 * 2 ** 20   # encoded strings kept per lm-eval wrapper: text + 4 bytes per token id


class _TokenMemo:
    """Token ids of the strings a wrapper encoded last, at most ``_TOKENS_KEPT_BYTES`` (UTF-8 length of the
    string + 4 bytes per id, as kept: ``array('i')``), least recently used out first. ``get`` returns a fresh list."""

    def __init__(self):
        self.entries: OrderedDict = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key: tuple) -> list[int] | None:
        with self.lock:
            got = self.entries.get(key)
            if got is None:
                return None
            self.entries.move_to_end(key)
            return got.tolist()

    def put(self, key: tuple, ids: list[int]) -> None:
        from array import array
        try:
            kept = array("i", ids)
        except (OverflowError, TypeError):   # an id beyond 32 bits, or not a list of ids: not kept
            return
        size = len(key[0].encode()) + 4 * len(kept)
        with self.lock:
            if size > _TOKENS_KEPT_BYTES or key in self.entries:
                return
            self.entries[key] = kept
            self.bytes += size
            while self.bytes > _TOKENS_KEPT_BYTES:
                k, old = self.entries.popitem(last=False)
                self.bytes -= len(k[0].encode()) + 4 * len(old)


_ROWS_LM_EVAL = "0.4.13"   # the lm-eval whose HFLM._loglikelihood_tokens was read for _Logits (requirements.txt)
_rows_ok: list = []


def _rows_deferred() -> bool:
    """Whether the installed lm-eval is the one ``_Logits`` was written against (else lm-eval's own path runs)."""
    if not _rows_ok:
        import importlib.metadata
        _rows_ok.append(importlib.metadata.version("lm_eval") == _ROWS_LM_EVAL)
    return _rows_ok[0]


class _Logits:
    """The logits ``[batch, positions, vocab]`` of one batch of a quiet wrapper's loglikelihood requests, handed to
    lm-eval's ``HFLM._loglikelihood_tokens`` in place of the tensor its ``_model_call`` returns.

    lm-eval takes ``F.log_softmax(logits, dim=-1)`` of the whole batch, then keeps of each request's row only the
    positions of its continuation (``_select_cont_toks``): at ``--limit 1`` the log-softmax over the vocabulary of
    every padded position was ~0.5-1 ms per result, a sixth of a sweep's steady-state overhead (measured,
    ``bench/bench_overhead.py``), for the one to few positions scored. Here that ``F.log_softmax`` (reached through
    ``__torch_function__``) gives one :class:`_RowLogits` per request, and the quiet wrapper's ``_select_cont_toks``
    takes lm-eval's own slice of the raw row and the log-softmax of that slice alone, with lm-eval's arguments
    (``dtype``: its ``softmax_dtype``). A log-softmax over the last dimension computes each position on its own, so
    the values are those of the whole batch's, bit for bit (test: lm-eval's own HFLM gives the same numbers). Any
    other function reaching it runs on the tensor unchanged."""

    def __init__(self, logits):
        self.logits = logits

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        import torch
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.log_softmax and isinstance(args[0], _Logits):
            x = args[0].logits
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim is not None and dim % x.dim() == x.dim() - 1 and len(args) <= 2:
                return [_RowLogits(row, kwargs.get("dtype")) for row in x]
        return func(*[a.logits if isinstance(a, _Logits) else a for a in args], **kwargs)


class _RowLogits:
    """One request's raw logits ``[positions, vocab]`` (``raw``) whose log-softmax over the vocabulary is taken only
    where lm-eval slices it (:class:`_Logits`); ``shape`` is the row's, as lm-eval reads it."""

    def __init__(self, raw, dtype):
        self.raw, self.dtype = raw, dtype

    @property
    def shape(self):
        return self.raw.shape

    def log_softmax(self, sliced):
        import torch
        return torch.nn.functional.log_softmax(sliced, dim=-1, dtype=self.dtype)


def quiet_hflm(**kw):
    """lm-eval's ``HFLM(**kw)`` without its per-request progress bars ("Tokenizing inputs", "Running loglikelihood
    requests", ...): hetmoe shows one overall bar per sweep instead. lm-eval passes ``disable_tqdm`` explicitly
    (and ``False`` from ``loglikelihood_rolling`` to ``_loglikelihood_tokens``), so tqdm's environment switch cannot
    reach those bars; this subclass forces the argument on its request methods. Its ``get_model_info`` (the model
    facts ``simple_evaluate`` adds to every result: parameter count, dtype, a hub look-up of the weights' sha) is
    collected once per wrapper: the wrapped model object stays the same, and the look-up costs ~1.5 ms per task
    (measured) where hetmoe keys every result by its own fingerprint. Its ``tok_encode`` keeps the token ids of the
    strings it encoded last (``_TokenMemo``): a sweep encodes the same documents for every result, and lm-eval's
    encode of one short request (the tokenizer's encode plus a ``decode`` of the BOS token, each call) took ~0.5 ms
    (measured, ``bench/bench_overhead.py``); the tokenizer and the wrapper's BOS setting are fixed for the
    wrapper's life, so the ids are the ones lm-eval computes (a fresh list per call: callers may edit it). Its
    loglikelihood requests take the log-softmax over the vocabulary only at the positions lm-eval scores
    (``_Logits``)."""
    if not _QUIET:
        from lm_eval.models.huggingface import HFLM

        def quiet(name):
            def method(self, *a, **k):
                return getattr(HFLM, name)(self, *a, **{**k, "disable_tqdm": True})
            method.__name__ = name
            return method

        def get_model_info(self) -> dict:
            if "_hetmoe_model_info" not in self.__dict__:
                self._hetmoe_model_info = HFLM.get_model_info(self)
            return dict(self._hetmoe_model_info)

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kw) -> list[int]:
            if kw or not isinstance(string, str):
                return HFLM.tok_encode(self, string, add_special_tokens, left_truncate_len, **kw)
            memo = self.__dict__.setdefault("_hetmoe_tokens", _TokenMemo())
            key = (string, add_special_tokens, left_truncate_len)
            got = memo.get(key)
            if got is None:
                got = HFLM.tok_encode(self, string, add_special_tokens, left_truncate_len)
                memo.put(key, got)
            return got
        def _loglikelihood_tokens(self, *a, **k):
            self._hetmoe_rows = _rows_deferred() and self.batch_size != "auto"
            try:
                return HFLM._loglikelihood_tokens(self, *a, **{**k, "disable_tqdm": True})
            finally:
                self._hetmoe_rows = False

        def _model_call(self, inps, attn_mask=None, labels=None):
            out = HFLM._model_call(self, inps, attn_mask, labels)
            return _Logits(out) if self.__dict__.get("_hetmoe_rows") else out

        def _select_cont_toks(self, logits, contlen=None, inplen=None):
            if isinstance(logits, _RowLogits):
                return logits.log_softmax(HFLM._select_cont_toks(self, logits.raw, contlen, inplen))
            return HFLM._select_cont_toks(self, logits, contlen, inplen)
        names = ("loglikelihood", "loglikelihood_rolling", "generate_until")
        _QUIET.append(type("QuietHFLM", (HFLM,), {**{n: quiet(n) for n in names}, "get_model_info": get_model_info,
                                                   "tok_encode": tok_encode,
                                                   "_loglikelihood_tokens": _loglikelihood_tokens,
                                                   "_model_call": _model_call, "_select_cont_toks": _select_cont_toks}))
    return _QUIET[0](**kw)
