"""autoep's Muon behaves like a torch optimizer: plain iterables, groups, state_dict round trip, schedulers."""

from __future__ import annotations

import copy

import torch

from autoep.optim import Muon


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_plain_parameters_split_matrices_to_muon_and_the_rest_to_adamw():
    model = _model()
    optimizer = Muon(model.parameters(), lr=0.02, adamw_lr=1e-3)
    muon, adamw = optimizer.param_groups
    assert muon["use_muon"] and all(p.ndim == 2 for p in muon["params"]) and len(muon["params"]) == 2
    assert not adamw["use_muon"] and all(p.ndim == 1 for p in adamw["params"]) and adamw["lr"] == 1e-3
    named = Muon(_model().named_parameters())
    assert [len(g["params"]) for g in named.param_groups] == [2, 2]
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, optimizer, 0)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_state_dict_round_trip_continues_identically():
    model = _model()
    optimizer = Muon(model.parameters(), lr=0.02)
    for seed in range(3):
        _step(model, optimizer, seed)
    twin = copy.deepcopy(model)
    restored = Muon(twin.parameters(), lr=0.5)  # hyperparameters come back with the state
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert restored.param_groups[0]["lr"] == 0.02
    for seed in range(3, 6):
        _step(model, optimizer, seed)
        _step(twin, restored, seed)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


def test_param_groups_and_lr_schedulers():
    model = _model()
    optimizer = Muon([{"params": [model[0].weight], "lr": 0.01}, {"params": [model[0].bias], "use_muon": False}])
    optimizer.add_param_group({"params": [model[2].weight, model[2].bias][:1]})
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 3e-4, 0.02]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 * (step + 1))
    _step(model, optimizer, 0)
    schedule.step()
    assert [round(g["lr"], 8) for g in optimizer.param_groups] == [0.002, 6e-5, 0.004]
