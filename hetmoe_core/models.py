"""Loading MoE models and a uniform view of their anatomy.

transformers 5 stores every causal MoE's routed experts as fused 3-D tensors
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``; GPT-OSS transposed
``[E, H, 2I]`` / ``[E, I, H]`` with gate/up interleaved). ``Anatomy`` finds them through one
table of per-family facts (``FAMILIES``) and exposes each expert's projections as zero-copy
views, so scores and analog noise act on the real weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ASSETS = Path(__file__).parent / "assets"
DEFAULT_DIR = ASSETS / "default"

KINDS = ("routed_experts", "shared_experts", "router", "attention", "dense_mlp",
         "lm_head", "embeddings", "norms", "other")
"""Module kinds every parameter is counted under (``Anatomy.param_counts``)."""


@dataclass(frozen=True)
class Family:
    """Per-family facts: where the MoE block's parts live, relative to the decoder layer."""
    moe_attr: str = "mlp"                 # decoder-layer attribute holding the sparse MoE block
    router_attr: str = "gate"             # MoE-block attribute of the router ([E, H] weight)
    shared: tuple[str, ...] = ()          # MoE-block attributes of shared experts (and their gates)
    layer_shared: tuple[str, ...] = ()    # decoder-layer attributes of shared experts (GraniteMoeShared)
    transposed: bool = False              # experts stored [E, H, 2I] / [E, I, H] (GPT-OSS)
    interleaved: bool = False             # gate/up rows interleaved (GPT-OSS) instead of [gate; up]
    router_picks_with_bias: bool = False  # top-k uses a correction bias or groups: never recompute it


FAMILIES: dict[str, Family] = {
    "olmoe": Family(),
    "mixtral": Family(),
    "qwen2_moe": Family(shared=("shared_expert", "shared_expert_gate")),
    "qwen3_moe": Family(),
    "deepseek_v2": Family(shared=("shared_experts",), router_picks_with_bias=True),
    "deepseek_v3": Family(shared=("shared_experts",), router_picks_with_bias=True),
    "phimoe": Family(router_attr="router"),
    "granitemoe": Family(moe_attr="block_sparse_moe", router_attr="router"),
    "granitemoeshared": Family(moe_attr="block_sparse_moe", router_attr="router",
                               layer_shared=("shared_mlp",)),
    "gpt_oss": Family(router_attr="router", transposed=True, interleaved=True),
}


@dataclass(frozen=True, eq=False)
class MoELayer:
    """One sparse MoE block: its router and its fused routed experts.

    ``gate(e)``/``up(e)`` are ``[I, H]`` and ``down(e)`` is ``[H, I]`` (nn.Linear orientation:
    out x in), whatever the storage layout; all three are views sharing storage with
    ``experts.gate_up_proj`` / ``experts.down_proj`` (writes through them change the model).
    """
    index: int               # position among MoE layers
    layer: int               # decoder layer index
    prefix: str              # module path of the MoE block, e.g. "model.layers.3.mlp"
    experts_name: str
    router_name: str
    shared_names: tuple[str, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    gated: bool
    transposed: bool
    interleaved: bool
    has_bias: bool
    experts: nn.Module = field(repr=False)
    router: nn.Module = field(repr=False)

    def router_weight(self) -> torch.Tensor:
        """Router weight ``[E, H]`` (one row per routed expert)."""
        return self.router.weight

    def _gate_up(self, e: int) -> torch.Tensor:
        """Expert e's fused gate/up weight as ``[2I, H]`` (or ``[I, H]`` when not gated)."""
        w = self.experts.gate_up_proj[e] if self.gated else self.experts.up_proj[e]
        return w.T if self.transposed else w

    def gate(self, e: int) -> torch.Tensor | None:
        """Gate projection ``[I, H]`` of expert e, or None for an ungated MLP."""
        if not self.gated:
            return None
        w = self._gate_up(e)
        return w[0::2] if self.interleaved else w[: self.intermediate_size]

    def up(self, e: int) -> torch.Tensor:
        """Up projection ``[I, H]`` of expert e."""
        w = self._gate_up(e)
        if not self.gated:
            return w
        return w[1::2] if self.interleaved else w[self.intermediate_size:]

    def down(self, e: int) -> torch.Tensor:
        """Down projection ``[H, I]`` of expert e."""
        w = self.experts.down_proj[e]
        return w.T if self.transposed else w


@dataclass(eq=False)
class Anatomy:
    """Where every part of an MoE model lives and how many parameters each kind holds."""
    family: str
    model_class: str
    num_layers: int
    moe_layers: list[MoELayer]
    modules: dict[str, tuple[str, ...]]
    param_counts: dict[str, int]
    dtype: str
    tied_lm_head: bool = False
    shared_experts_per_layer: int = 0
    host: str = ""  # "deepseek→qwen2_moe" when a remote-code type runs in a built-in class (hosts.py)

    @property
    def total_params(self) -> int:
        return sum(self.param_counts.values())

    def summary(self) -> dict:
        """JSON-able summary: family, layers, MoE layers, experts, top-k, shared experts, counts."""
        m = self.moe_layers
        return {
            "family": self.family, "host": self.host, "model_class": self.model_class, "dtype": self.dtype,
            "num_layers": self.num_layers, "moe_layers": [x.layer for x in m],
            "experts_per_layer": sorted({x.num_experts for x in m}),
            "top_k": sorted({x.top_k for x in m}),
            "hidden_size": m[0].hidden_size, "expert_intermediate_size": m[0].intermediate_size,
            "shared_experts_per_layer": self.shared_experts_per_layer,
            "shared_expert_modules": list(self.modules["shared_experts"]),
            "dense_mlp_layers": len(self.modules["dense_mlp"]),
            "tied_lm_head": self.tied_lm_head,
            "param_counts": dict(self.param_counts), "total_params": self.total_params,
        }


def _family_of(model: nn.Module) -> tuple[str, Family]:
    mtype = getattr(model.config, "model_type", "?")
    if mtype not in FAMILIES:
        raise ValueError(
            f"{type(model).__name__} (model_type {mtype!r}) has no routed experts hetmoe knows; "
            f"supported MoE families: {', '.join(sorted(FAMILIES))}.")
    return mtype, FAMILIES[mtype]


def _top_k(cfg, router: nn.Module) -> int:
    for obj, name in ((router, "top_k"), (cfg, "num_experts_per_tok"), (cfg, "num_experts_per_token")):
        if getattr(obj, name, None):
            return int(getattr(obj, name))
    raise ValueError(f"cannot find top-k for {type(router).__name__}")


def anatomy_of(model: nn.Module) -> Anatomy:
    """Describe a transformers-5 MoE causal LM.

    Raises:
        ValueError: the model's family is not in ``FAMILIES`` or it holds no routed experts
            (the message names its class and the supported families).
    """
    family, fam = _family_of(model)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    base_name = next(n for n, m in model.named_modules() if m is base)
    layers = base.layers
    kinds: dict[str, list[str]] = {k: [] for k in KINDS}
    moe_layers: list[MoELayer] = []
    for li, layer in enumerate(layers):
        lp = f"{base_name}.layers.{li}"
        kinds["attention"].append(f"{lp}.self_attn")
        for a in fam.layer_shared:
            if getattr(layer, a, None) is not None:
                kinds["shared_experts"].append(f"{lp}.{a}")
        block = getattr(layer, fam.moe_attr, None)
        experts = getattr(block, "experts", None)
        if experts is None or not hasattr(experts, "down_proj"):
            if block is not None:
                kinds["dense_mlp"].append(f"{lp}.{fam.moe_attr}")
            continue
        prefix = f"{lp}.{fam.moe_attr}"
        router = getattr(block, fam.router_attr)
        shared = tuple(f"{prefix}.{a}" for a in fam.shared if getattr(block, a, None) is not None)
        kinds["shared_experts"] += shared
        kinds["router"].append(f"{prefix}.{fam.router_attr}")
        kinds["routed_experts"].append(f"{prefix}.experts")
        gated = hasattr(experts, "gate_up_proj")
        d = experts.down_proj
        E, H, I = (d.shape[0], d.shape[2], d.shape[1]) if fam.transposed else d.shape
        moe_layers.append(MoELayer(
            index=len(moe_layers), layer=li, prefix=prefix, experts_name=f"{prefix}.experts",
            router_name=f"{prefix}.{fam.router_attr}", shared_names=shared, num_experts=E,
            top_k=_top_k(model.config, router), hidden_size=H, intermediate_size=I, gated=gated,
            transposed=fam.transposed, interleaved=fam.interleaved,
            has_bias=hasattr(experts, "down_proj_bias"), experts=experts, router=router))
    if not moe_layers:
        raise ValueError(f"{type(model).__name__} has no routed experts; supported MoE families: "
                         f"{', '.join(sorted(FAMILIES))}.")
    lm_head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    tied = lm_head is not None and lm_head.weight is emb.weight
    names = {id(m): n for n, m in model.named_modules()}
    if lm_head is not None:
        kinds["lm_head"].append(names[id(lm_head)])
    kinds["embeddings"] += [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    counts = _count_params(model, kinds)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    n_shared = 0  # shared experts per MoE layer: DeepSeek fuses n of them into one MLP
    if kinds["shared_experts"]:
        n_shared = int(getattr(model.config, "n_shared_experts", None) or 1)
    return Anatomy(family=family, model_class=type(model).__name__, num_layers=len(layers),
                   moe_layers=moe_layers, modules={k: tuple(v) for k, v in kinds.items()},
                   param_counts=counts, dtype=dtype, tied_lm_head=tied, shared_experts_per_layer=n_shared,
                   host=getattr(model.config, "hetmoe_host", None) or "")


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (element-wise, no matrix-vector product), by its class name."""
    return "norm" in type(module).__name__.lower()


def param_owner(model: nn.Module, kinds: dict) -> dict[int, str]:
    """id(parameter) -> the most specific anatomy kind whose module holds it (``kinds``: Anatomy.modules).

    Precedence: embeddings, lm_head, router, routed_experts, shared_experts, dense_mlp, attention; norm weights are
    ``norms`` even inside attention (element-wise, not matrix-vector products). Parameters of no listed module are
    absent (callers count them as norms or other)."""
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    owner: dict[int, str] = {}
    for kind in ("embeddings", "lm_head", "router", "routed_experts", "shared_experts", "dense_mlp", "attention"):
        for name in kinds.get(kind, ()):
            for p in model.get_submodule(name).parameters():
                owner.setdefault(id(p), "norms" if id(p) in norm_params else kind)
    return owner


def _count_params(model: nn.Module, kinds: dict[str, list[str]]) -> dict[str, int]:
    """Each unique parameter counted once, under the kind :func:`param_owner` gives it."""
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    owner = param_owner(model, kinds)
    counts = dict.fromkeys(KINDS, 0)
    for p in model.parameters():  # unique parameters (tied weights once)
        kind = owner.get(id(p), "norms" if id(p) in norm_params else "other")
        counts[kind] += p.numel()
    return counts


# ---------------------------------------------------------------- tiny models for tests / demos

_TINY_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                    bos_token_id=2, eos_token_id=3, pad_token_id=0)
_TINY: dict[str, dict] = {
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_experts=8, num_experts_per_tok=2, num_hidden_layers=3, mlp_only_layers=[0]),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                      num_experts_per_tok=2, head_dim=8),
    "deepseek_v2": dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, num_hidden_layers=3, num_key_value_heads=4,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, num_hidden_layers=3, num_key_value_heads=4,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_group=2, topk_group=1),
    "phimoe": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=24),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                    sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
}
TINY_FAMILIES = tuple(_TINY)


def tiny_config(family: str):
    """Config of a tiny random model of ``family`` (see ``TINY_FAMILIES``)."""
    from transformers import AutoConfig
    if family not in _TINY:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    return AutoConfig.for_model(family, **{**_TINY_COMMON, **_TINY[family]})


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny randomly initialised causal LM of ``family`` (seeded, eval mode).

    Expert weights are drawn with per-expert scales so that experts differ in neuron norm,
    as trained experts do (random init gives near-identical norms)."""
    from transformers import AutoModelForCausalLM
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if "experts." in name and p.dim() == 3:
                p.mul_(torch.rand(p.shape[0], 1, 1, generator=g) * 1.5 + 0.5)
    return model.eval()


# ---------------------------------------------------------------------------------- loading

@dataclass(eq=False)
class LoadedModel:
    """A model with its tokenizer, anatomy, source and fingerprint (for cache keys)."""
    model: nn.Module
    tokenizer: object
    anatomy: Anatomy
    source: str
    fingerprint: str


from .fingerprints import forget_fingerprints, source_fingerprint, weights_fingerprint  # noqa: E402,F401 (re-export)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tiny_tokenizer():
    """A byte-level tokenizer matching the tiny models' 128-token vocabulary (ASCII bytes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {chr(i) if 32 <= i < 127 else f"<{i}>": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", pad_token="<0>",
                                   eos_token="<3>", bos_token="<2>")


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but this torch build or machine has no CUDA GPU; use --device cpu")


def shorten(text: str, n: int = 40) -> str:
    """``text`` cut to its first ``n`` characters (+ '…'), for echoing what a user typed in one line."""
    return text if len(text) <= n else text[:n] + "…"


HUB_ID_RULE = ("a Hugging Face hub id is owner/name with letters, digits, '-', '_' or '.' (no '--' or '..'), "
               "at most 96 characters, e.g. allenai/OLMoE-1B-7B-0924")


def check_hub_id(repo_id: str) -> None:
    """Raise ValueError (one line: what a valid id looks like, the input truncated) unless ``repo_id`` is a valid
    hub id of the form owner/name (rule: huggingface_hub.utils.validate_repo_id, plus exactly one '/')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
        ok = repo_id.count("/") == 1
    except HFValidationError:
        ok = False
    if not ok:
        raise ValueError(f"{shorten(repo_id)!r} is not a valid hub id: {HUB_ID_RULE}")


def not_a_model_folder(source: str) -> ValueError:
    """The one error for a local folder that cannot be used, whatever the reason (missing, a file, no config or
    weights): it repeats only what the user typed, so a shared server reveals none of its paths or files."""
    return ValueError(f"{shorten(source)} is not a folder with a model (config.json + *.safetensors)")


def resolve_source(source: str, expect: str | None = None) -> tuple[str, str | None]:
    """Classify a model source: ("default"|"tiny"|"folder"|"hub", path or id).

    expect: "hub" or "folder" when the user said which it is (the sidebar's Hub id / Local folder): a hub id is
    then validated without looking at the file system, a folder never goes to the hub.
    Raises ValueError with what to type instead for an empty or malformed source, an unknown tiny family, an
    invalid hub id (``check_hub_id``) or a path that is not a model folder (``not_a_model_folder``)."""
    source = (source or "").strip()
    if not source:
        raise ValueError("empty model source: give 'default', a Hugging Face hub id (org/name) or a local folder")
    if source == "default" and expect is None:
        return "default", str(DEFAULT_DIR)
    if source.startswith("tiny:") and expect is None:
        if source[5:] not in TINY_FAMILIES:
            raise ValueError(f"unknown tiny family {shorten(source[5:])!r}; choose one of {', '.join(TINY_FAMILIES)}")
        return "tiny", source[5:]
    if expect == "hub":
        check_hub_id(source)
        return "hub", source
    try:
        p = Path(source).expanduser()
        is_dir, exists = p.is_dir(), p.exists()
    except (OSError, RuntimeError):   # name too long, no home for '~user'
        p, is_dir, exists = None, False, False
    if is_dir:
        return "folder", str(p)
    if exists or expect == "folder" or source.startswith((".", "/", "~")):
        raise not_a_model_folder(source)
    if source.count("/") != 1:
        raise ValueError(f"{shorten(source)!r} is neither a local folder nor a hub id: {HUB_ID_RULE}")
    check_hub_id(source)
    return "hub", source


def load_model(source: str = "default", device: str = "cpu", dtype: str = "float32",
               trust_remote_code: bool = False, revision: str | None = None, tokenizer: bool = True) -> LoadedModel:
    """Load an MoE causal LM with its tokenizer and anatomy.

    Args:
        source: "default" (the embedded model in ``hetmoe_core/assets/default``), "tiny:<family>"
            (a tiny random model), a local folder (safetensors only) or a Hugging Face hub id.
        device: torch device string ("cpu", "cuda", "cuda:1").
        dtype: "float32", "bfloat16" or "float16".
        trust_remote_code: passed to transformers; off unless the caller turns it on.
        revision: hub revision (branch, tag or commit) for hub ids.
        tokenizer: load the tokenizer too; False where no text is tokenized (anatomy, weight scores), so a
            checkpoint folder without tokenizer files still works (``LoadedModel.tokenizer`` is then None).
    Raises:
        ValueError: bad source, dtype, missing safetensors, a model without routed experts, or (with
            ``tokenizer``) a folder without tokenizer files.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {', '.join(_DTYPES)}")
    _check_device(device)
    kind, where = resolve_source(source)
    if kind == "tiny":
        model = tiny_model(where, dtype=_DTYPES[dtype]).to(device)
        return LoadedModel(model, _tiny_tokenizer(), anatomy_of(model), source, f"tiny:{where}:seed0")
    if kind == "default" and not (DEFAULT_DIR / "config.json").exists():
        raise ValueError(f"the embedded default model is missing from {DEFAULT_DIR}; reinstall hetmoe "
                         "(or use 'tiny:olmoe' for a random toy model)")
    if kind in ("default", "folder"):
        if not list(Path(where).glob("*.safetensors")):
            if kind == "folder":   # pickled .bin files are never loaded
                raise not_a_model_folder(source)
            raise ValueError("the embedded default model holds no *.safetensors weights; reinstall hetmoe")
        fingerprint = weights_fingerprint(where)
    else:
        fingerprint = f"hub:{where}@{revision or 'main'}"
    kw = dict(revision=revision, trust_remote_code=trust_remote_code)
    from .hosts import host_for
    try:  # OSError: hub unreachable or no such repo; ValueError: remote code refused
        # hosted model types (hosts.py) have no built-in config class: read config.json as a dict
        host = host_for(PretrainedConfig.get_config_dict(where, revision=revision)[0])
        if host:
            model = host.load(where, dtype=_DTYPES[dtype], **kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                where, config=AutoConfig.from_pretrained(where, **kw), dtype=_DTYPES[dtype],
                use_safetensors=True, **kw)
    except OSError as e:
        offline = any(w in str(e).lower() for w in ("connect", "offline", "resolve host", "timed out"))
        hint = (" (the Hugging Face hub is unreachable offline: download the model to a folder)" if offline else
                " (no such model on the hub, or it is private or gated)") if kind == "hub" else ""
        if kind == "folder":
            raise not_a_model_folder(source) from None
        raise ValueError(f"could not load {shorten(source)!r}{hint}: {shorten(str(e).splitlines()[0], 200)}") \
            from None
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        why = str(e).splitlines()[0].replace(where, source) if str(e) else ""
        raise ValueError(f"could not load {shorten(source)!r}: its weights or config.json are damaged or do not "
                         f"match ({type(e).__name__}: {shorten(why, 200)})") from None
    except Exception as e:  # safetensors' SafetensorError (corrupt header) derives from Exception only
        if "Safetensor" not in type(e).__name__:
            raise
        raise ValueError(f"could not load {shorten(source)!r}: a safetensors file is damaged "
                         f"({shorten(str(e).replace(where, source), 200)})") from None
    model.to(device).eval()
    if not tokenizer:
        return LoadedModel(model, None, anatomy_of(model), source, fingerprint)
    try:  # a hosted checkpoint's config.json names a model type AutoTokenizer cannot parse: pass the host's
        tokenizer = AutoTokenizer.from_pretrained(where, **kw, **({"config": model.config} if host else {}))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"could not load the tokenizer of {source!r}: the folder needs tokenizer.json and "
                         f"tokenizer_config.json ({type(e).__name__})") from None
    return LoadedModel(model, tokenizer, anatomy_of(model), source, fingerprint)
