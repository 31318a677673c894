"""`autoep verify`: check a converted model against the original on the same batch.

Each rank builds the original model, converts a copy, runs both on its own
batch, and compares every MoE layer's output and its parameters' gradients.
With ep > 1 an expert's gradient in the converted model gathers the tokens of
every rank of its EP group, so the reference expert gradients are summed over
that group before the owner's slice is compared.

Below fp32 a rounding difference upstream (the expert combine rounds in
another order than the family's own) can flip a near-tie routing choice in a
later layer, and that token then differs by a whole expert's output: a FAIL
that says nothing about the conversion. So in bf16 each converted router is
handed the values of the reference block's input, while gradients still flow
through the converted model's own; routing itself is compared exactly in fp32.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from autoep.convert import convert, find_convertible_blocks
from autoep.moe.ep_experts import ExpertsSite
from autoep.moe.experts import local_tensor
from autoep.moe.layer import MoELayer
from autoep.moe.sites import moe_sites, owned_rows

LOW_PRECISION = ("bfloat16", "float16")


@dataclass
class LayerCheck:
    path: str
    output_diff: float
    output_scale: float
    grad_diff: float
    grad_scale: float


@dataclass
class VerifyReport:
    model: str
    ep_size: int
    dtype: str
    atol: float
    rtol: float
    logits_diff: float = 0.0
    logits_scale: float = 0.0
    layers: list[LayerCheck] = field(default_factory=list)

    def within(self, diff: float, scale: float) -> bool:
        return diff <= self.atol + self.rtol * scale

    def layer_passed(self, check: LayerCheck) -> bool:
        return self.within(check.output_diff, check.output_scale) and self.within(check.grad_diff, check.grad_scale)

    @property
    def passed(self) -> bool:
        return self.within(self.logits_diff, self.logits_scale) and all(self.layer_passed(c) for c in self.layers)

    def merge(self, other: VerifyReport) -> VerifyReport:
        """Worst case over two ranks' reports of the same model."""
        merged = copy.deepcopy(self)
        merged.logits_diff = max(self.logits_diff, other.logits_diff)
        merged.logits_scale = max(self.logits_scale, other.logits_scale)
        for mine, theirs in zip(merged.layers, other.layers, strict=True):
            mine.output_diff = max(mine.output_diff, theirs.output_diff)
            mine.output_scale = max(mine.output_scale, theirs.output_scale)
            mine.grad_diff = max(mine.grad_diff, theirs.grad_diff)
            mine.grad_scale = max(mine.grad_scale, theirs.grad_scale)
        return merged


def _capture_outputs(modules: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], list]:
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for path, module in modules.items():

        def hook(_mod, _inp, out, path=path):
            captured[path] = (out[0] if isinstance(out, tuple) else out).detach()

        handles.append(module.register_forward_hook(hook))
    return captured, handles


def _router(block: nn.Module, site: object) -> nn.Module | None:
    """The module that routes a converted block: autoep's router, or the family's own."""
    if isinstance(site, MoELayer):
        return site.router_module
    if isinstance(site, ExpertsSite) and site.spec.router_name is not None:
        return block.get_submodule(site.spec.router_name)
    return None


def _route_as_reference(reference: nn.Module, converted: nn.Module, paths: list[str]) -> list:
    """Hand each converted router the values of the reference block's input (the reference runs first).

    ``x + (ref - x).detach()``, in fp32 where both bf16 values and their difference are exact: the value is
    the reference's, the gradient flows to the converted model's own input as before."""
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    sites = dict(moe_sites(converted))
    for path in paths:
        router = _router(converted.get_submodule(path), sites.get(path))
        if router is None:
            continue

        def capture(_mod, args, kwargs, path=path):
            inputs[path] = (args[0] if args else kwargs["hidden_states"]).detach()

        def substitute(_mod, args, kwargs, path=path):
            x = args[0] if args else kwargs["hidden_states"]
            ref = inputs.get(path)
            if ref is None or ref.numel() != x.numel():
                return None
            forced = (x.float() + (ref.reshape(x.shape).float() - x.float()).detach()).to(x.dtype)
            if args:
                return (forced, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": forced}

        handles.append(reference.get_submodule(path).register_forward_pre_hook(capture, with_kwargs=True))
        handles.append(router.register_forward_pre_hook(substitute, with_kwargs=True))
    return handles


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _grad_or_zeros(p: nn.Parameter) -> torch.Tensor:
    """This rank's gradient (the local shard for expert-parallel DTensors)."""
    return local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p))


def compare_models(
    reference: nn.Module,
    converted: nn.Module,
    input_ids: torch.Tensor,
    report: VerifyReport,
) -> VerifyReport:
    """Run both models on ``input_ids`` (LM loss), fill ``report`` with per-layer differences."""
    paths = [path for path, _, _ in find_convertible_blocks(reference)[0]]
    ref_out, ref_handles = _capture_outputs({p: reference.get_submodule(p) for p in paths})
    conv_out, conv_handles = _capture_outputs({p: converted.get_submodule(p) for p in paths})
    if report.dtype in LOW_PRECISION:
        conv_handles += _route_as_reference(reference, converted, paths)
    ref_result = reference(input_ids=input_ids, labels=input_ids)
    conv_result = converted(input_ids=input_ids, labels=input_ids)
    ref_result.loss.backward()
    conv_result.loss.backward()
    for handle in ref_handles + conv_handles:
        handle.remove()
    report.logits_diff = _max_abs(ref_result.logits.float() - conv_result.logits.float())
    report.logits_scale = _max_abs(ref_result.logits.float())
    sites = dict(moe_sites(converted))
    for path in paths:
        layer = sites[path]
        expert_ids = {id(p) for p in layer.experts_module.parameters()}
        ref_params = dict(reference.get_submodule(path).named_parameters())
        grad_diff = grad_scale = 0.0
        for name, param in converted.get_submodule(path).named_parameters():
            ref_grad = _grad_or_zeros(ref_params[name]).float()
            if id(param) in expert_ids:
                if layer.ep_size > 1:
                    ref_grad = ref_grad.clone()
                    dist.all_reduce(ref_grad, group=layer.dispatcher.group)
                ref_grad = owned_rows(layer, param, ref_grad)
            grad_diff = max(grad_diff, _max_abs(_grad_or_zeros(param).float() - ref_grad))
            grad_scale = max(grad_scale, _max_abs(ref_grad))
        out_diff = _max_abs(conv_out[path].float() - ref_out[path].float())
        report.layers.append(LayerCheck(path, out_diff, _max_abs(ref_out[path].float()), grad_diff, grad_scale))
    return report


def verify_model(
    model: str,
    ep_size: int = 1,
    *,
    batch_size: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    atol: float | None = None,
    rtol: float | None = None,
) -> VerifyReport:
    """Verify MODEL (built-in name or HF directory) on this rank; call on every rank when ep > 1."""
    from autoep.models.loading import load_model

    low_precision = dtype in (torch.bfloat16, torch.float16)
    report = VerifyReport(
        model=model,
        ep_size=ep_size,
        dtype=str(dtype).removeprefix("torch."),
        atol=atol if atol is not None else (1e-2 if low_precision else 1e-5),
        rtol=rtol if rtol is not None else (5e-2 if low_precision else 1e-4),
    )
    reference = load_model(model, dtype=dtype, seed=seed)
    reference.train()
    converted = copy.deepcopy(reference)
    convert(converted, ep_size)
    rank = dist.get_rank() if dist.is_initialized() else 0
    vocab = reference.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    device = next(reference.parameters()).device
    return compare_models(reference, converted, input_ids.to(device), report)
