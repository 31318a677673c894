"""Recognise transformers' standard experts modules, and say why other MoE-looking modules are not.

transformers 5 gives most MoE families one experts module shape: stacked
weights (``gate_up_proj``/``up_proj`` and ``down_proj``, optionally biases),
the ``use_experts_implementation`` flags on the instance (``has_gate``,
``has_bias``, ``is_transposed``, ``is_concatenated``, ``has_post_expert_norm``),
``_apply_gate`` for the gated activation and a forward called as
``experts(hidden_states, top_k_index, top_k_weights)``. Recognition here is by
that interface only, never by class or model name, so a family released later
that uses the standard module converts with no change.
"""

from __future__ import annotations

from torch import nn

from autoep.moe.spec import StandardExperts

INTERFACE_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")


def has_interface_flags(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, flag, None), bool) for flag in INTERFACE_FLAGS)


def describe_standard_experts(module: nn.Module) -> StandardExperts | str | None:
    """The module's layout; a one-line reason when it carries the interface flags but autoep cannot run it;
    ``None`` when it does not carry the flags at all (not a standard experts module)."""
    if not has_interface_flags(module):
        return None
    name = type(module).__name__
    if module.has_post_expert_norm:
        return (
            f"{name} applies a post-expert norm whose weight all experts share; autoep does not yet "
            "reduce such a weight over the expert-parallel group"
        )
    in_proj = "gate_up_proj" if module.has_gate else "up_proj"
    weights = [in_proj, "down_proj"] + ([f"{in_proj}_bias", "down_proj_bias"] if module.has_bias else [])
    tensors = {n: getattr(module, n, None) for n in weights}
    missing = [n for n, t in tensors.items() if t is None]
    if missing:
        return f"{name} has the experts-interface flags but no {', '.join(missing)}"
    up, down = tensors[in_proj], tensors["down_proj"]
    if up.ndim != 3 or down.ndim != 3 or up.shape[0] != down.shape[0]:
        return f"{name}.{in_proj} {list(up.shape)} / down_proj {list(down.shape)} are not stacked [E, ...] tensors"
    num_experts = up.shape[0]
    if module.is_transposed:
        hidden, width = up.shape[1], up.shape[2]
        down_ok = tuple(down.shape[1:]) == (width // (2 if module.has_gate else 1), hidden)
    else:
        width, hidden = up.shape[1], up.shape[2]
        down_ok = tuple(down.shape[1:]) == (hidden, width // (2 if module.has_gate else 1))
    if not down_ok or (module.has_gate and width % 2):
        return f"{name}: {in_proj} {list(up.shape)} and down_proj {list(down.shape)} do not fit one another"
    if module.has_gate and not callable(getattr(module, "_apply_gate", None)):
        return f"{name} is gated but has no _apply_gate"
    if not module.has_gate and not callable(getattr(module, "act_fn", None)):
        return f"{name} is not gated and has no act_fn"
    shared = [n for n, p in module.named_parameters() if n not in tensors]
    if shared:
        return f"{name} holds parameters that are not per-expert stacks ({', '.join(shared)})"
    unstacked = [n for n, t in tensors.items() if t.shape[0] != num_experts]
    if unstacked:
        return f"{name}: {', '.join(unstacked)} do not have {num_experts} experts along dim 0"
    intermediate = width // 2 if module.has_gate else width
    return StandardExperts(
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=intermediate,
        has_gate=bool(module.has_gate),
        has_bias=bool(module.has_bias),
        is_transposed=bool(module.is_transposed),
        weights=tuple(weights),
    )


def looks_like_experts(path: str, module: nn.Module) -> bool:
    """A module that holds routed experts by the usual naming conventions, standard or not.

    Used to explain refusals: a child named ``experts`` or a class named
    ``*Experts`` (shared experts excluded: they are ordinary dense MLPs).
    """
    child = path.rpartition(".")[2]
    cls = type(module).__name__.lower()
    if "shared" in child.lower() or "shared" in cls:
        return False
    return child == "experts" or cls.endswith("experts")


def refusal_reason(module: nn.Module) -> str:
    """Why a module that looks like routed experts cannot take the experts path."""
    described = describe_standard_experts(module)
    if isinstance(described, str):
        return described
    name = type(module).__name__
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        first = next(iter(module.children()), None)
        kind = type(first).__name__ if first is not None else "nothing"
        return f"experts are a list of separate {kind} modules, not stacked tensors"
    stacked = {n: list(p.shape) for n, p in module.named_parameters(recurse=False) if p.ndim >= 2}
    shapes = ", ".join(f"{n} {s}" for n, s in stacked.items()) or "no stacked weights"
    return (
        f"{name} does not follow transformers' experts interface (no use_experts_implementation flags; {shapes}); "
        "describe it with a FamilyAdapter (docs/adding-a-family.md)"
    )
