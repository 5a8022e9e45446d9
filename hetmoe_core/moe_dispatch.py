"""Every touch of transformers internals, in one place: how analog experts take over the fused experts forward.

transformers 5 fuses a MoE layer's experts into 3-D tensors and routes their forward through ``ExpertsInterface``
(``config._experts_implementation`` names the registered function). hetmoe registers one implementation,
``hetmoe_analog``, and selects it per experts module while an ``analog()`` context is open. Each private name used
below carries a comment naming the official route and why it is not taken; :func:`check_transformers` fails with a
clear message when the installed transformers is not the version these internals were read in.
"""
from __future__ import annotations

import torch

IMPL_NAME = "hetmoe_analog"
# The pinned version (requirements.txt) whose transformers/integrations/moe.py and modeling_utils.py were read
# for the private names below. Moving the pin means reading them again, then updating this constant.
PINNED_TRANSFORMERS = "5.24.0"
_checked = False


def check_transformers() -> None:
    """Raise RuntimeError when the installed transformers is not ``PINNED_TRANSFORMERS`` or lacks an internal used
    here (the experts forward would otherwise fail deep inside a model call, or silently run the wrong code)."""
    global _checked
    if _checked:
        return
    import transformers
    from transformers.integrations import moe
    missing = [n for n in ("_grouped_linear", "ALL_EXPERTS_FUNCTIONS", "ExpertsInterface") if not hasattr(moe, n)]
    if transformers.__version__ != PINNED_TRANSFORMERS or missing:
        raise RuntimeError(
            f"hetmoe's analog experts use transformers internals read in transformers=={PINNED_TRANSFORMERS}, but "
            f"{transformers.__version__} is installed{' (missing: ' + ', '.join(missing) + ')' if missing else ''}; "
            f"install transformers=={PINNED_TRANSFORMERS} (requirements.txt) or re-check hetmoe_core/moe_dispatch.py "
            f"against the new version and update PINNED_TRANSFORMERS")
    _checked = True


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Grouped ``x @ w[e].T`` (``w [E, O, I]``; transposed storage ``[E, I, O]``) for tokens
    sorted by expert (``offs``: cumulative counts). transformers' grouped_mm when the strides
    allow, else its loop fallback op."""
    # Private: the official route is the registered "grouped_mm" experts forward, but it runs a whole
    # experts module; the analog forward needs one projection at a time, between DAC and ADC.
    from transformers.integrations.moe import _grouped_linear
    try:
        return _grouped_linear(x, w, offs, is_transposed=transposed)
    except RuntimeError:  # strides the grouped kernel cannot take (tile slices)
        wt = w if transposed else w.transpose(-2, -1)  # [E, I, O]
        return torch.ops.transformers.grouped_mm_fallback(x.to(w.dtype), wt, offs)


def apply_gate(mod, h: torch.Tensor) -> torch.Tensor:
    """The experts module's gating of a fused gate/up output ``[S, 2I]`` -> ``[S, I]``."""
    # Private: transformers attaches ``_apply_gate`` to every experts class (its own or the default split + act_fn);
    # there is no public per-projection route, and re-implementing it would miss families that override it.
    return mod._apply_gate(h)


def _eager_forward(mod):
    # Private: ``forward.__wrapped__`` is the class's own eager forward under transformers'
    # ``use_experts_implementation`` decorator (functools.wraps); the official route, config
    # ``_experts_implementation="eager"``, is model-wide, and only some layers are analog.
    return type(mod).forward.__wrapped__


def _analog_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The ``hetmoe_analog`` experts implementation: analog layers use their backend state,
    other layers the implementation the model had before ``analog()``."""
    state = self.__dict__.get("_hetmoe_state")
    if state is not None:
        return state.forward(self, hidden_states, top_k_index, top_k_weights)
    prev = self.__dict__.get("_hetmoe_prev")
    if prev is None:  # not inside analog(): the class's own eager forward
        return _eager_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    return prev(self, hidden_states, top_k_index, top_k_weights)


def _register_impl():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
    if IMPL_NAME not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(IMPL_NAME, _analog_experts_forward)


def set_state(experts, state) -> None:
    """Give one experts module its backend state (read by the ``hetmoe_analog`` forward; removed on exit)."""
    experts.__dict__["_hetmoe_state"] = state


def install(stack, anatomy) -> None:
    """Select ``hetmoe_analog`` for every MoE layer's experts until ``stack`` (an ExitStack) closes.

    Raises RuntimeError for a nested ``analog()`` on the same model or an unchecked transformers version.
    """
    check_transformers()
    _register_impl()
    # Private: ``config._experts_implementation`` is set on each experts module's config. The official route,
    # ``model.set_experts_implementation(name)``, sets the top-level config only when the model class's source shows
    # ``@use_experts_implementation`` (inspect.getsource heuristic), which remote-code families hosted in a built-in
    # class (hosts.py) and sub-configs do not pass; the previous value is restored exactly on exit.
    configs = {id(m.experts.config): m.experts.config for m in anatomy.moe_layers}
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    for m in anatomy.moe_layers:
        prev_name = m.experts.config._experts_implementation
        if prev_name == IMPL_NAME:
            raise RuntimeError("analog() contexts cannot be nested on one model")
        m.experts.__dict__["_hetmoe_prev"] = ALL_EXPERTS_FUNCTIONS.get_interface(prev_name, _eager_forward(m.experts))
    prev_impls = {k: c._experts_implementation for k, c in configs.items()}

    def _undo_dispatch():
        for k, c in configs.items():
            c._experts_implementation = prev_impls[k]
        for m in anatomy.moe_layers:
            m.experts.__dict__.pop("_hetmoe_prev", None)
            m.experts.__dict__.pop("_hetmoe_state", None)
    stack.callback(_undo_dispatch)
    for c in configs.values():
        c._experts_implementation = IMPL_NAME
