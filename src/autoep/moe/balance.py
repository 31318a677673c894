"""Load-balancing settings and the formulas behind them (pure tensor functions).

Conventions (DeepSeek-V3 / Megatron normalisation, not Hugging Face's):

* ``f_e = E / (K·T) · count_e`` is expert e's share of the T·K assignments,
  scaled so that perfect balance gives 1 for every expert;
* ``P_e`` is the mean routing probability of expert e over the tokens;
* a balancing loss is ``Σ_e f_e · P_e``, which equals 1 for uniform routing
  whatever E and K are. Hugging Face's ``load_balancing_loss_func`` is K times
  this value (its coefficient ``router_aux_loss_coef`` is tuned for that).

Probabilities are the softmax of the logits for ``softmax`` and ``topk_softmax``
scoring, and the sigmoid scores normalised to sum to one per token for
``sigmoid`` scoring (DeepSeek-V3's s'_{i,t}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
from pydantic import ConfigDict

from autoep.moe.grouping import count_ids

BiasRule = Literal["sign", "sign_centered"]
DropPolicy = Literal["probs", "position"]
LOSS_NAMES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "z_loss")


@dataclass(frozen=True)
class BalanceConfig:
    """Every load-balancing knob of a job; all off by default (dropless, no extra loss).

    aux_loss_coef:
        Switch-style loss over each micro-batch of each rank.
    seq_aux_loss_coef:
        DeepSeek-V3's sequence-wise loss: ``f`` and ``P`` per sequence, averaged.
    global_aux_loss_coef:
        ``f`` from token counts summed over the data-parallel group (one small
        all-reduce per layer and micro-batch), ``P`` local; its gradient is that
        of the loss on the global micro-batch.
    z_loss_coef:
        Router z-loss, mean over tokens of ``logsumexp(logits)²`` (ST-MoE).
    bias_update_rate:
        Aux-loss-free balancing: after every optimizer step each router's
        selection bias moves by this much per expert, from the step's global
        counts (0 disables).
    bias_update_rule:
        ``sign``: DeepSeek-V3, ``b_e += u·sign(mean − count_e)``. ``sign_centered``:
        Moonlight's variant, the same update minus its mean, so the bias stays
        zero-mean and cannot drift as a whole.
    capacity_factor / drop_policy:
        ``None`` is dropless. Otherwise each expert takes at most
        ``ceil(capacity_factor · T·K / E)`` of a rank's T tokens per micro-batch;
        ``probs`` keeps the highest-probability assignments, ``position`` the
        earliest tokens.

    Losses are computed per MoE layer and averaged over layers, so a
    coefficient does not depend on depth; each is added to the model's loss
    with its own coefficient and reported separately.
    """

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")

    aux_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    global_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    bias_update_rule: BiasRule = "sign"
    capacity_factor: float | None = None
    drop_policy: DropPolicy = "probs"

    def __post_init__(self) -> None:
        for name in (*(f"{n}_coef" for n in LOSS_NAMES), "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or null for dropless), got {self.capacity_factor}")

    def coef(self, loss_name: str) -> float:
        return getattr(self, f"{loss_name}_coef")

    @property
    def enabled_losses(self) -> tuple[str, ...]:
        return tuple(name for name in LOSS_NAMES if self.coef(name) > 0)

    @property
    def updates_bias(self) -> bool:
        return self.bias_update_rate > 0


def routing_probs(logits_TE: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-token probabilities over all experts that the balancing losses use (fp32)."""
    logits_TE = logits_TE.float()
    if scoring == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    return torch.softmax(logits_TE, dim=-1)


def expert_counts(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (int64 ``[E]``); ids >= E (dropped) are not counted."""
    return count_ids(indices_TK, num_experts)


def switch_aux_loss(
    probs_TE: torch.Tensor, counts_E: torch.Tensor, num_tokens: int | torch.Tensor, top_k: int
) -> torch.Tensor:
    """``Σ_e f_e · P_e`` with ``f_e = E·count_e/(K·num_tokens)`` and ``P_e`` the mean of ``probs_TE``.

    ``counts_E``/``num_tokens`` may come from more tokens than ``probs_TE`` holds
    (the global variant: counts summed over ranks, the token total left on the device as a tensor).
    """
    num_experts = probs_TE.shape[-1]
    if isinstance(num_tokens, torch.Tensor):  # in float64, as Python computes the int case: the same scale
        scale = num_experts / (top_k * num_tokens.clamp(min=1).double())
    else:
        scale = num_experts / (top_k * max(num_tokens, 1))
    f_E = counts_E.to(probs_TE.dtype) * scale
    return (f_E * probs_TE.mean(dim=0)).sum()


def sequence_aux_loss(probs_BSE: torch.Tensor, indices_BSK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise loss: the switch loss of each sequence, averaged over sequences."""
    B, S, E = probs_BSE.shape
    K = indices_BSK.shape[-1]
    onehot_BSE = torch.zeros(B, S, E + 1, dtype=probs_BSE.dtype, device=probs_BSE.device)
    onehot_BSE.scatter_add_(2, indices_BSK.clamp(max=E), torch.ones_like(indices_BSK, dtype=probs_BSE.dtype))
    f_BE = onehot_BSE[..., :E].sum(dim=1) * (E / (K * S))
    return (f_BE * probs_BSE.mean(dim=1)).sum(dim=-1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)²``."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def bias_update(counts_E: torch.Tensor, rate: float, rule: BiasRule) -> torch.Tensor:
    """The step added to a selection bias from one optimizer step's global counts.

    Overloaded experts (count above the mean) go down by ``rate``, underloaded
    ones up; exact ties with the mean do not move (``sign(0) = 0``).
    """
    counts = counts_E.double()
    delta_E = rate * torch.sign(counts.mean() - counts)
    if rule == "sign_centered":
        delta_E = delta_E - delta_E.mean()
    return delta_E.float()


def measure_losses(
    cfg: BalanceConfig,
    logits_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    scoring: str,
    batch_size: int,
    stats_group: dist.ProcessGroup | None,
) -> dict[str, torch.Tensor]:
    """One layer's balancing losses for one forward: aux and z always (for metrics), the others when enabled.

    ``indices_TK`` holds the routed choices before capacity drops. The global
    aux loss sums counts over ``stats_group`` (one all-reduce).
    """
    E, K = logits_TE.shape[-1], indices_TK.shape[-1]
    logits_TE = logits_TE.reshape(-1, E)
    T = logits_TE.shape[0]
    counts_E = expert_counts(indices_TK, E)
    probs_TE = routing_probs(logits_TE, scoring)
    losses = {"aux_loss": switch_aux_loss(probs_TE, counts_E, T, K), "z_loss": z_loss(logits_TE)}
    if cfg.seq_aux_loss_coef > 0:
        losses["seq_aux_loss"] = sequence_aux_loss(probs_TE.view(batch_size, -1, E), indices_TK.view(batch_size, -1, K))
    if cfg.global_aux_loss_coef > 0:
        losses["global_aux_loss"] = switch_aux_loss(probs_TE, *_global_counts(counts_E, T, stats_group), K)
    return losses


@torch.no_grad()
def _global_counts(
    counts_E: torch.Tensor, num_tokens: int, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """Counts and token total summed over the data-parallel group (one all-reduce, no read-back)."""
    if not dist.is_initialized():
        return counts_E, num_tokens
    packed = torch.cat([counts_E, counts_E.new_tensor([num_tokens])])
    dist.all_reduce(packed, group=group)
    return packed[:-1], packed[-1]
