"""`autoep plan`: routing plans, layouts, published shapes at scale (timed), the CLI."""

from __future__ import annotations

import json
import time

import pytest

from autoep.cli.main import main
from autoep.moe.dispatch import PlannedCounts
from autoep.plan.api import parse_memory, plan
from autoep.plan.layouts import enumerate_layouts
from autoep.plan.models import PUBLISHED, build_meta, published_config
from autoep.plan.routing import PlannedRouting


def test_planned_routing_is_consistent():
    counts = PlannedRouting(1.0)(num_tokens=1000, top_k=8, ep_size=8, ep_rank=0, num_local_experts=32)
    assert isinstance(counts, PlannedCounts)
    assert len(set(counts.send_rows)) == 1 and counts.recv_rows == counts.send_rows
    assert sum(counts.expert_rows) == 1000 * 8  # 8 sources x 1000 tokens x 8 choices / 8 ranks
    hot = PlannedRouting(2.0)(num_tokens=1000, top_k=8, ep_size=8, ep_rank=0, num_local_experts=32)
    assert abs(hot.expert_rows[0] / counts.expert_rows[0] - 2) < 0.05 and hot.recv_rows[0] > counts.recv_rows[0]


def test_memory_sizes_and_layouts():
    assert parse_memory("80GiB") == 80 * 2**30 and parse_memory("141GB") == 141 * 10**9
    layouts = enumerate_layouts(8, 8, [1, 2], zero=(3,), activation_checkpointing=(True,))
    assert {(lay.ep, lay.tp) for lay in layouts} == {(e, t) for e in (1, 2, 4, 8) for t in (1, 2)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    total = sum(p.numel() for p in build_meta(published_config(name)).parameters())
    assert abs(total - PUBLISHED[name][2]) / PUBLISHED[name][2] < 0.01


@pytest.mark.parametrize(
    ("name", "gpus", "ep"),
    [("DeepSeek-V3", 256, 64), ("Qwen3-30B-A3B", 8, 8)],
)
def test_published_model_plans_in_time(name, gpus, ep):
    """One layout of a published shape, balanced and imbalanced, well under 3 minutes on 2 cores."""
    start = time.perf_counter()
    result = plan(published_config(name), gpus, ep=(ep,), tp=(1,), zero=(3,), activation_checkpointing=(True,))
    seconds = time.perf_counter() - start
    (layout,) = result.layouts
    assert seconds < 180, f"{name}: {seconds:.0f} s"
    assert layout.skipped is None and "layers simulated" in layout.simulated
    assert layout.busiest.dispatch >= layout.balanced.dispatch and layout.all_to_all > 0
    # fp32 sharded parameters and AdamW state (12 bytes a parameter) are alive all step; gradients only in part.
    states = layout.balanced.params + layout.balanced.optimizer
    assert states >= 0.95 * 12 * result.total_params / gpus


def test_cli_json(capsys):
    code = main(["plan", "tiny-mixtral", "--gpus", "4", "--seq-len", "32", "--ep", "2", "--tp", "1", "--zero", "3",
                 "--activation-checkpointing", "off", "--gpu-memory", "1GiB", "--json"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["best"] == "ep2 z3 mb1"
    (layout,) = result["layouts"]
    assert layout["fits"] and layout["comm_bytes"]["all_to_all"] > 0 and layout["simulated"].startswith("all 3")


def test_cli_refuses_bad_ep(capsys):
    assert main(["plan", "tiny-mixtral", "--gpus", "4", "--ep", "3"]) == 2
    assert "ep [3]" in capsys.readouterr().err


def test_train_refuses_a_layout_that_will_not_fit(tmp_path, capsys):
    """`autoep train --gpu-memory` simulates the job's layout before launching any worker."""
    code = main(["train", "--steps", "2", "--output", str(tmp_path / "run"), "--gpu-memory", "1MiB"])
    err = capsys.readouterr().err
    assert code == 2
    assert "needs" in err and "per GPU at peak" in err and "but a GPU has 1.0 MiB" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing was launched
