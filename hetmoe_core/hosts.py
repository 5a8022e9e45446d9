"""Hosting checkpoints whose own architecture code is remote-only in a built-in transformers class.

DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066; ``deepseek-ai/deepseek-moe-16b-base``, model_type
``deepseek``) ships only remote code (``modeling_deepseek.py``, written for transformers 4.36). Its
forward is Qwen2-MoE's (transformers ``Qwen2MoeForCausalLM``) with these settings:

- multi-head attention with llama RoPE (rotate_half), no biases: ``qkv_bias=False``;
- dense layers (``layer < first_k_dense_replace`` or ``layer % moe_layer_freq != 0``) become
  ``mlp_only_layers`` with the dense ``intermediate_size``;
- router: softmax over all routed experts, top-k, renormalised only when ``norm_topk_prob``
  (and top-k > 1, as DeepSeek does): Qwen2MoeTopKRouter;
- the n shared experts are already one SwiGLU MLP of width ``n * moe_intermediate_size`` in the
  checkpoint. Qwen2-MoE scales it by ``sigmoid(shared_expert_gate(x))``: the gate weight is set to
  0 (sigmoid(0) = 1/2 exactly) and the shared down_proj doubled, so 1/2 * (2W)h = Wh bit for bit
  (scaling by powers of two is exact in binary floating point).

Same equations, so outputs differ from the remote code's by summation order only (float32 logits
match an independent DeepSeekMoE forward to ~2e-6, tests/test_deepseek_host.py). In bf16/fp16 the
host also computes the router softmax in float32 where the remote code rounds it to the model dtype.
``pretraining_tp`` (remote code: split matmuls) and ``seq_aux``/``aux_loss_alpha`` (training loss)
do not change the forward. Anatomy counts the zeroed gate ([1, H] per MoE layer) as shared experts.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

# Routed experts keep their names (``mlp.experts.E.*``, ``mlp.gate.weight``; transformers' qwen2_moe
# conversion then fuses them into ``experts.gate_up_proj``/``down_proj``); shared experts are renamed.
DEEPSEEK_KEY_MAPPING = {r"\.mlp\.shared_experts\.": ".mlp.shared_expert."}
_EXACT_ROPE = ("default", "linear")  # the remote code's dynamic NTK caches state across calls


class DeepseekHost:
    """DeepSeekMoE hosted in ``Qwen2MoeForCausalLM``.

    ``config``: the Qwen2MoeConfig to build with; ``key_mapping``: checkpoint-key renames for
    ``from_pretrained``; ``load(where)``: the finished model; ``finish(model)``: the fix-ups."""

    label = "deepseek→qwen2_moe"

    def __init__(self, cfg: dict):
        from transformers import Qwen2MoeConfig
        _check_deepseek(cfg)
        n_layers, freq = cfg["num_hidden_layers"], cfg.get("moe_layer_freq", 1)
        first = cfg.get("first_k_dense_replace", 0)
        top_k = cfg["num_experts_per_tok"]
        rope = dict(cfg.get("rope_scaling") or {})
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        copied = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "hidden_act", "max_position_embeddings",
                  "initializer_range", "rms_norm_eps", "use_cache", "tie_word_embeddings",
                  "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id")
        self.config = Qwen2MoeConfig(
            **{k: cfg[k] for k in copied if k in cfg},
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            num_experts=cfg["n_routed_experts"], num_experts_per_tok=top_k,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) and top_k > 1,
            shared_expert_intermediate_size=cfg["moe_intermediate_size"] * cfg["n_shared_experts"],
            decoder_sparse_step=1, qkv_bias=False, use_sliding_window=False,
            mlp_only_layers=[i for i in range(n_layers) if not (i >= first and i % freq == 0)],
            router_aux_loss_coef=cfg.get("aux_loss_alpha", 0.001),
            rope_parameters={"rope_type": rope_type, "rope_theta": float(cfg.get("rope_theta", 1e4)), **rope},
            architectures=["Qwen2MoeForCausalLM"],
            n_shared_experts=cfg["n_shared_experts"],  # read by anatomy_of (shared experts per layer)
            hetmoe_host=self.label)
        self.key_mapping = dict(DEEPSEEK_KEY_MAPPING)

    def load(self, where: str, dtype: torch.dtype = torch.float32, **kw) -> nn.Module:
        """Load the checkpoint at ``where`` (folder or hub id) into Qwen2MoeForCausalLM, finished.

        ``kw`` goes to ``from_pretrained`` (revision, trust_remote_code: no remote code runs
        either way, the config is built in). transformers' load report would list the shared
        expert gate as newly initialised; it is silenced for this load and checked here instead.
        Raises:
            ValueError: checkpoint keys that do not match the DeepSeekMoE layout (any missing
                weight but the gate, unexpected or mismatched keys).
        """
        from transformers import AutoModelForCausalLM
        log = logging.getLogger("transformers.modeling_utils")
        quiet = _DropReport(str(where))
        log.addFilter(quiet)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                where, config=self.config, key_mapping=self.key_mapping, dtype=dtype,
                use_safetensors=True, output_loading_info=True, **kw)
        finally:
            log.removeFilter(quiet)
        missing = sorted(k for k in info["missing_keys"] if not k.endswith("mlp.shared_expert_gate.weight"))
        wrong = missing + sorted(info["unexpected_keys"]) + [str(k) for k in info["mismatched_keys"]]
        if wrong:
            raise ValueError(f"{where} is not in the DeepSeekMoE layout ({len(wrong)} missing, unexpected "
                             f"or mismatched weights, e.g. {wrong[:3]}); check config.json against the weights")
        self.finish(model)
        return model

    @staticmethod
    def finish(model: nn.Module) -> None:
        """Make Qwen2-MoE's gated shared expert the plain DeepSeek sum; call once, right after loading.

        ``shared_expert_gate.weight`` [1, H] (absent from the checkpoint) becomes exactly 0 and
        ``shared_expert.down_proj.weight`` [H, n*I] is doubled, in every MoE layer."""
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.mlp, "shared_expert_gate"):
                    layer.mlp.shared_expert_gate.weight.zero_()
                    layer.mlp.shared_expert.down_proj.weight.mul_(2)


class _DropReport(logging.Filter):
    """Drops transformers' load report for one checkpoint (its missing keys are checked instead)."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("LOAD REPORT" in msg and self.where in msg)


def _check_deepseek(cfg: dict) -> None:
    """Refuse DeepSeekMoE variants Qwen2-MoE cannot reproduce exactly (ValueError says which)."""
    why = [f"no {k}" for k in ("num_hidden_layers", "num_experts_per_tok", "moe_intermediate_size")
           if not cfg.get(k)]
    if cfg.get("scoring_func", "softmax") != "softmax":
        why.append(f"scoring_func {cfg['scoring_func']!r} (only 'softmax')")
    if cfg.get("attention_bias"):
        why.append("attention_bias=True (Qwen2-MoE's o_proj has no bias)")
    if not cfg.get("n_routed_experts"):
        why.append("no n_routed_experts (a dense model)")
    if not cfg.get("n_shared_experts"):
        why.append("no n_shared_experts (Qwen2-MoE always has a shared expert)")
    rope = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in _EXACT_ROPE:
        why.append(f"rope_scaling type {rope_type!r} (only none or 'linear')")
    if cfg.get("kv_lora_rank") or cfg.get("q_lora_rank"):
        why.append("latent attention (kv_lora_rank/q_lora_rank: a DeepSeek-V2/V3 layout)")
    if cfg.get("topk_method", "greedy") != "greedy" or (cfg.get("n_group") or 1) > 1:
        why.append("grouped top-k routing (topk_method/n_group)")
    if (cfg.get("routed_scaling_factor") or 1.0) != 1.0:
        why.append(f"routed_scaling_factor {cfg['routed_scaling_factor']}")
    if why:
        raise ValueError("this DeepSeekMoE config cannot be hosted exactly in transformers' "
                         "Qwen2MoeForCausalLM: " + "; ".join(why) + ". hetmoe needs a built-in transformers "
                         "class (it reads their fused experts): convert the checkpoint to a built-in MoE family.")


HOSTS = {"deepseek": DeepseekHost}
"""model_type (as in config.json) -> host class, for types transformers has no class for."""


def host_for(config) -> DeepseekHost | None:
    """Host adapter for a checkpoint's config, or None when transformers has the class itself.

    Args:
        config: the checkpoint's ``config.json`` as a dict (read before ``AutoConfig``, which cannot
            parse remote-code model types without running their code) or a ``PretrainedConfig``.
    Returns:
        None, or a host with ``load(where, dtype, **from_pretrained_kw)`` -> the finished model
        (used by ``models.load_model``, whatever its trust_remote_code), built from ``config`` (the
        built-in config), ``key_mapping`` (regex -> replacement for checkpoint keys) and
        ``finish(model)`` (fix-ups after loading; exactly once).
    Raises:
        ValueError: a hosted model_type whose config this host cannot reproduce exactly.
    """
    cfg = config if isinstance(config, dict) else config.to_dict()
    host = HOSTS.get(cfg.get("model_type"))
    return host(cfg) if host else None
