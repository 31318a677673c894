"""`autoep.convert`: replace every HF MoE block of a model by an expert-parallel layer."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from autoep.errors import AlreadyConvertedError, ConfigError, UnsupportedModelError
from autoep.load_balance import install_loss_hook
from autoep.models import adapter_for, registered_families
from autoep.models.base import FamilyAdapter
from autoep.models.experts_path import find_experts_path_blocks
from autoep.models.hf_outputs import capture_router_logits
from autoep.moe.balance import BalanceConfig
from autoep.moe.ep_experts import SITE_ATTR, ExpertsSite, select_implementation
from autoep.moe.experts import GemmBackend
from autoep.moe.layer import MoELayer
from autoep.moe.sites import moe_sites
from autoep.moe.spec import ExpertsSpec, MoESpec
from autoep.parallel.groups import build_expert_mesh, mesh_device_type


@dataclass(frozen=True)
class LayerReport:
    """One converted MoE layer, as seen from this rank."""

    path: str
    family: str
    num_experts: int
    top_k: int
    scoring: str
    shared_experts: bool
    expert_start: int
    expert_end: int
    params_per_rank: int
    conversion: str = "block"

    @property
    def local_experts(self) -> str:
        return f"{self.expert_start}-{self.expert_end - 1}"


@dataclass
class ConversionReport:
    """What :func:`convert` did: the converted layers and the layout on this rank."""

    ep_size: int
    ep_rank: int
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def families(self) -> list[str]:
        return sorted({layer.family for layer in self.layers})

    @property
    def total_params_per_rank(self) -> int:
        return sum(layer.params_per_rank for layer in self.layers)

    def rows(self) -> list[tuple[str, ...]]:
        """Table rows (also used by the CLI), one per converted layer."""
        return [
            (
                layer.path,
                layer.family,
                layer.conversion,
                str(layer.num_experts),
                str(layer.top_k or "?"),
                layer.scoring,
                "yes" if layer.shared_experts else "no",
                layer.local_experts,
                f"{layer.params_per_rank:,}",
            )
            for layer in self.layers
        ]

    HEADERS = ("layer", "family", "path", "experts", "top-k", "scoring", "shared", "local experts", "params/rank")

    def __str__(self) -> str:
        rows = [self.HEADERS, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADERS))]
        lines = [f"autoep: {len(self.layers)} MoE layers converted, ep={self.ep_size} (rank {self.ep_rank})"]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        return "\n".join(lines)


def supported_families() -> list[str]:
    """Names of the model families autoep recognises (built-in and registered)."""
    return sorted(registered_families())


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, FamilyAdapter]]:
    """Every MoE block of ``model`` that a family adapter recognises, in module order."""
    found = []
    for path, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is not None:
            found.append((path, module, adapter))
    return found


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _unsupported_message(model: nn.Module, refused: list[tuple[str, str]]) -> str:
    if refused:
        shown = "; ".join(f"{path}: {reason}" for path, reason in refused[:3])
        more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
        return f"autoep cannot convert the routed experts of this {_model_type(model)!r} model: {shown}{more}."
    return (
        f"autoep found no MoE block in this {_model_type(model)!r} model: no block a family adapter knows "
        f"({', '.join(supported_families())}) and no experts module following transformers' experts interface. "
        "To convert a custom block, describe it with autoep.register_family(autoep.FamilyAdapter(name=..., "
        "block_classes=('YourMoeBlock',), router_config=...)); see docs/adding-a-family.md."
    )


def find_convertible_blocks(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Module, MoESpec | ExpertsSpec]], list[tuple[str, str]]]:
    """Every MoE block and how it converts, in module order, plus the refused ones with their reasons.

    Blocks a family adapter recognises take the block path (:class:`MoESpec`);
    the others holding a standard transformers experts module take the experts
    path (:class:`ExpertsSpec`). Needs no process group: safe on meta models.
    """
    config = _text_config(model)
    dedicated = [(path, block, adapter.describe(block, config)) for path, block, adapter in find_moe_blocks(model)]
    generic, refused = find_experts_path_blocks(model, [path for path, _, _ in dedicated])
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return sorted(dedicated + generic, key=lambda item: order[item[0]]), refused


def _check_options(path: str, spec: MoESpec | ExpertsSpec, balance: BalanceConfig | None, folded: bool) -> None:
    """Refuse, naming the family and the option, what a block cannot do."""
    if folded and spec.jitter_noise > 0:
        raise ConfigError(
            f"router jitter noise (at {path}, {spec.family}) would give tensor-parallel peers different tokens; "
            "set router_jitter_noise=0 to fold MoE layers over tp"
        )
    if isinstance(spec, MoESpec) and spec.zero_experts and balance is not None and balance.updates_bias:
        raise ConfigError(
            f"{spec.family} ({path}) also routes to {spec.zero_experts} zero-computation experts, which the "
            "aux-loss-free bias update does not count (it counts the expert-parallel experts only); "
            "set bias_update_rate=0"
        )
    if not isinstance(spec, ExpertsSpec) or balance is None:
        return
    if balance.enabled_losses and spec.router_name is None:
        raise ConfigError(
            f"{spec.family} ({path}) declares no router_logits output autoep can read, so the balancing losses "
            f"{list(balance.enabled_losses)} cannot be computed for it; turn them off"
        )
    if balance.updates_bias and spec.selection_bias_name is None:
        raise ConfigError(
            f"{spec.family} ({path}) takes the experts path and its router has no e_score_correction_bias, so "
            "aux-loss-free bias updates (bias_update_rate) cannot work for it; set bias_update_rate=0"
        )


def _valid_ep_sizes(num_experts: int, world: int) -> list[int]:
    return [n for n in range(1, num_experts + 1) if num_experts % n == 0 and world % n == 0]


def validate_conversion(
    model: nn.Module,
    ep_size: int,
    world_size: int,
    ep_group: dist.ProcessGroup | DeviceMesh | None = None,
    *,
    balance: BalanceConfig | None = None,
    folded: bool = False,
) -> list[tuple[str, nn.Module, MoESpec | ExpertsSpec]]:
    """All the checks :func:`convert` makes, using only rank-local facts.

    Every rank reaches the same verdict without communicating, so a bad
    request raises the same clear error everywhere instead of hanging a
    collective.
    """
    if moe_sites(model):
        raise AlreadyConvertedError(
            "this model is already converted by autoep (it contains MoELayer modules); "
            "build or load a fresh model to convert it again with another ep_size"
        )
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ConfigError(f"ep_size must be a positive integer, got {ep_size!r}")
    if world_size % ep_size:
        raise ConfigError(
            f"ep_size={ep_size} does not divide the world size {world_size}; "
            f"choose an ep_size among the divisors of {world_size}: "
            f"{[n for n in range(1, world_size + 1) if world_size % n == 0]}"
        )
    if ep_group is not None:
        group_size = ep_group.size() if isinstance(ep_group, DeviceMesh) else dist.get_world_size(ep_group)
        if group_size != ep_size:
            raise ConfigError(f"ep_group has {group_size} ranks but ep_size={ep_size}")
    described, refused = find_convertible_blocks(model)
    if refused or not described:
        raise UnsupportedModelError(_unsupported_message(model, refused))
    for path, _, spec in described:
        _check_options(path, spec, balance, folded)
        if spec.num_experts % ep_size:
            raise ConfigError(
                f"ep_size={ep_size} does not divide the {spec.num_experts} routed experts of {path}; "
                f"ep sizes that divide both the experts and the world size {world_size}: "
                f"{_valid_ep_sizes(spec.num_experts, world_size)}"
            )
    return described


def _layer_report(path: str, spec: MoESpec | ExpertsSpec, block: nn.Module, ep_size: int, ep_rank: int) -> LayerReport:
    """The report row of one layer at a given layout, computed from shapes alone."""
    local = spec.num_experts // ep_size
    if isinstance(spec, ExpertsSpec):
        experts = block.get_submodule(spec.experts_name)
        expert_params = sum(getattr(experts, n)[0].numel() for n in spec.experts.weights)
        dense_params = sum(p.numel() for n, p in block.named_parameters() if not n.startswith(spec.experts_name + "."))
        shared = any("shared" in n for n, _ in block.named_children())
        top_k, conversion = spec.top_k, "experts"
    else:
        rows = spec.layout.rows_per_expert(spec.intermediate_size)  # dim-0 rows of one expert
        expert_params = sum(block.experts.get_parameter(n)[0].numel() * rows for n in spec.layout.tensor_names)
        dense = [getattr(block, a) for a in (spec.router_attr, spec.shared_attr, spec.shared_gate_attr) if a]
        dense_params = sum(p.numel() for module in dense for p in module.parameters())
        shared, top_k, conversion = spec.shared_attr is not None, spec.router.top_k, "block"
    return LayerReport(
        path=path,
        family=spec.family,
        num_experts=spec.num_experts,
        top_k=top_k,
        scoring=spec.scoring_name,
        shared_experts=shared,
        expert_start=ep_rank * local,
        expert_end=(ep_rank + 1) * local,
        params_per_rank=local * expert_params + dense_params,
        conversion=conversion,
    )


def plan_conversion(model: nn.Module, ep_size: int = 1, *, world_size: int | None = None) -> ConversionReport:
    """What :func:`convert` would do at ``ep_size`` (EP rank 0's view), without changing ``model``.

    Works on a model built on the meta device, so it can describe models far
    larger than this machine's memory.
    """
    world_size = ep_size if world_size is None else world_size
    described = validate_conversion(model, ep_size, world_size)
    report = ConversionReport(ep_size=ep_size, ep_rank=0)
    report.layers = [_layer_report(path, spec, block, ep_size, 0) for path, block, spec in described]
    return report


def _child(block: nn.Module, path: str) -> nn.Module | None:
    """The block's submodule at a dotted ``path``, or ``None`` when it has none."""
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _copy_expert_tensor(layer: MoELayer, name: str, local: torch.Tensor) -> None:
    """Fill the layer's expert tensor ``name`` with this rank's rows of the source tensor.

    The rows are experts ``[expert_start, expert_end)`` (``F`` rows per expert
    in DBRX's flattened layout, so a rank's experts stay contiguous either way).
    With an EP mesh the local slice is a Shard(0) of the global tensor: state
    dicts then show global shapes and checkpoints reload under any layout.
    """
    owner_path, _, leaf = name.rpartition(".")
    owner = layer.experts.get_submodule(owner_path)
    target = getattr(owner, leaf)
    target.copy_(local)
    if layer.ep_mesh is not None:
        shard = DTensor.from_local(target.detach(), layer.ep_mesh, [Shard(0)], run_check=False)
        setattr(owner, leaf, nn.Parameter(shard, requires_grad=target.requires_grad))


def _copy_router(router: nn.Module, source: nn.Module) -> None:
    """Copy the HF router's tensors into autoep's by name (the router keeps its predecessor's names).

    Only a selection bias autoep added for aux-loss-free balancing may be
    missing from the source; it starts at 0, which leaves routing unchanged.
    """
    source_state = source.state_dict()
    for name, tensor in router.state_dict(keep_vars=True).items():
        if name in source_state and source_state[name].dtype != tensor.dtype:
            _replace_tensor(router, name, source_state[name])
        elif name in source_state:
            tensor.copy_(source_state[name])
        elif name == "e_score_correction_bias":
            tensor.zero_()
        else:
            raise UnsupportedModelError(f"{type(source).__name__} has no {name!r} for autoep's router to take")


def _replace_tensor(module: nn.Module, name: str, source: torch.Tensor) -> None:
    """Put a copy of ``source`` at ``name``, in its own dtype: a DeepSeek router keeps its fp32 weight in a
    bf16 model, and rounding it to bf16 would route tokens differently from the family's own router."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    old = getattr(owner, leaf)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(source.detach().clone(), requires_grad=old.requires_grad))
    else:
        owner.register_buffer(leaf, source.detach().clone())


@torch.no_grad()
def _build_layer(
    spec: MoESpec,
    block: nn.Module,
    ep_mesh: DeviceMesh | None,
    backend: GemmBackend,
    balance: BalanceConfig,
    stats_group: dist.ProcessGroup | None,
    fold_group: dist.ProcessGroup | None,
) -> MoELayer:
    shared = getattr(block, spec.shared_attr) if spec.shared_attr else None
    shared_gate = getattr(block, spec.shared_gate_attr) if spec.shared_gate_attr else None
    act_fn = _child(block, spec.act_fn_attr)
    source_router = getattr(block, spec.router_attr)
    source_experts = [block.experts.get_parameter(name) for name in spec.layout.tensor_names]
    added_bias = balance.updates_bias and not spec.router.use_correction_bias
    if added_bias:  # aux-loss-free balancing needs a selection bias; start it at 0 (routing unchanged)
        spec = replace(spec, router=replace(spec.router, use_correction_bias=True))
    with torch.device(source_experts[0].device):
        layer = MoELayer(
            spec,
            ep_mesh=ep_mesh,
            shared=shared,
            shared_gate=shared_gate,
            act_fn=act_fn,
            backend=backend,
            balance=balance,
            stats_group=stats_group,
            fold_group=fold_group,
        )
    layer.added_selection_bias = added_bias
    layer.to(dtype=source_experts[0].dtype)
    rows = spec.layout.rows_per_expert(spec.intermediate_size)
    for name, source in zip(spec.layout.tensor_names, source_experts, strict=True):
        _copy_expert_tensor(layer, name, source[layer.expert_start * rows : layer.expert_end * rows])
    _copy_router(layer.router_module, source_router)
    layer.train(block.training)
    return layer


def _logits_source(spec: MoESpec, layer: MoELayer) -> nn.Module:
    """The module of the converted layer whose output HF's ``router_logits`` recorder should read.

    The recorder keeps the index it has for the family's router. autoep's
    router returns its logits first, as most HF routers do. ``Llama4Router``
    returns ``(scores, logits)`` and is recorded at index 1; its block returns
    ``(out, router_logits)``, and so does the converted layer, whose output
    then holds the logits at that same index.
    """
    return layer if spec.returns_router_logits else layer.router_module


def _shard_expert_tensors(
    module: nn.Module, names: tuple[str, ...], start: int, end: int, ep_mesh, done: dict[int, nn.Parameter]
) -> None:
    """Keep experts ``[start, end)`` of each stacked tensor; with an EP mesh, as a shard of the global tensor,
    so that state dicts show global shapes and checkpoints reload under any layout.

    ``done`` maps already converted source tensors to their shards: experts tied between
    blocks (an encoder and a decoder sharing weights) stay tied.
    """
    if ep_mesh is None:
        return  # ep = 1: every expert stays, as it is
    for name in names:
        source = getattr(module, name)
        if id(source) in done:
            setattr(module, name, done[id(source)])
            continue
        local = DTensor.from_local(source.detach()[start:end].clone(), ep_mesh, [Shard(0)], run_check=False)
        done[id(source)] = nn.Parameter(local, requires_grad=source.requires_grad)
        setattr(module, name, done[id(source)])


@torch.no_grad()
def _convert_experts(
    spec: ExpertsSpec,
    block: nn.Module,
    ep_mesh: DeviceMesh | None,
    backend: GemmBackend,
    balance: BalanceConfig,
    stats_group: dist.ProcessGroup | None,
    fold_group: dist.ProcessGroup | None,
    done: dict[int, nn.Parameter],
) -> nn.Module:
    site = ExpertsSite(
        spec,
        block,
        ep_mesh=ep_mesh,
        backend=backend,
        balance=balance,
        stats_group=stats_group,
        fold_group=fold_group,
    )
    experts = block.get_submodule(spec.experts_name)
    _shard_expert_tensors(experts, spec.experts.weights, site.expert_start, site.expert_end, site.ep_mesh, done)
    setattr(experts, SITE_ATTR, site)
    return experts


def convert(
    model: nn.Module,
    ep_size: int = 1,
    *,
    ep_group: dist.ProcessGroup | DeviceMesh | None = None,
    backend: GemmBackend = "auto",
    balance: BalanceConfig | None = None,
    stats_group: dist.ProcessGroup | None = None,
    fold_group: dist.ProcessGroup | None = None,
) -> ConversionReport:
    """Replace every MoE block of ``model`` in place by an expert-parallel :class:`MoELayer`.

    With ``ep_size > 1`` the default process group must be initialised; each
    rank keeps experts ``[r * E / ep, (r + 1) * E / ep)`` of every layer, where
    ``r`` is its rank in ``ep_group`` (a process group or a 1-D device mesh;
    by default, blocks of ``ep_size`` consecutive ranks). The converted model
    computes what the original computes. State-dict keys are unchanged; with
    ep > 1 expert tensors are DTensors of the global shape ``[E, ...]``
    sharded over the EP ranks, each rank holding its own experts.

    ``balance`` sets the load-balancing losses, capacity and bias updates (off
    by default); ``stats_group`` is the data-parallel group the global aux loss
    reduces over (default: the whole world). ``fold_group`` folds the layers
    over tensor-parallel peers, which must feed them identical tokens: each
    dispatches its own share (see :class:`MoELayer`). Models that return
    ``router_logits`` (``output_router_logits=True``) keep doing so.
    """
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if ep_size > 1 and world_size == 1 and ep_group is None:
        raise ConfigError(
            f"ep_size={ep_size} needs torch.distributed: initialise a process group of at least "
            f"{ep_size} ranks first (or launch with torchrun / `autoep train`)"
        )
    folded = fold_group is not None and dist.get_world_size(fold_group) > 1
    described = validate_conversion(model, ep_size, world_size, ep_group, balance=balance, folded=folded)
    ep_mesh = None
    if ep_size > 1:
        if ep_group is None:
            ep_mesh = build_expert_mesh(ep_size)["ep"]
        elif isinstance(ep_group, DeviceMesh):
            ep_mesh = ep_group
        else:
            ep_mesh = DeviceMesh.from_group(ep_group, mesh_device_type())
    report = ConversionReport(ep_size=ep_size, ep_rank=ep_mesh.get_local_rank() if ep_mesh is not None else 0)
    balance = balance or BalanceConfig()
    replaced: list[tuple[nn.Module, MoELayer]] = []
    converted_experts: list[nn.Module] = []
    sharded: dict[int, nn.Parameter] = {}
    for path, block, spec in described:
        report.layers.append(_layer_report(path, spec, block, ep_size, report.ep_rank))
        if isinstance(spec, ExpertsSpec):
            converted_experts.append(
                _convert_experts(spec, block, ep_mesh, backend, balance, stats_group, fold_group, sharded)
            )
            continue
        layer = _build_layer(spec, block, ep_mesh, backend, balance, stats_group, fold_group)
        parent_path, _, child = path.rpartition(".")
        model.get_submodule(parent_path).register_module(child, layer)
        replaced.append((getattr(block, spec.router_attr), _logits_source(spec, layer)))
    capture_router_logits(model, replaced)
    if converted_experts:
        select_implementation(model, converted_experts)
    if balance.enabled_losses:
        install_loss_hook(model)
    return report
