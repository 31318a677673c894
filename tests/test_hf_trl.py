"""TRL's SFTTrainer and DPOTrainer with `autoep.hf.AutoEPMixin` on 2 gloo ranks (ep 2, ZeRO 3, one spawn).

SFT: prompt/completion chats packed into rows (TRL's padding-free packing);
the loss falls, and every label is -100 on prompt tokens and the token itself
on completion tokens, checked token by token against the chat template's
rendering. DPO: the mixin makes the reference model (a frozen autoep copy
taken before the policy is sharded); the first step's loss is
log 2 plus the family's router aux loss (policy = reference), and it trains.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from autoep.launch import run_local

USER, ASSISTANT = 250, 251


def _sft(out: str) -> dict:
    import datasets
    import trl

    import autoep
    import autoep.hf
    from autoep.hf.demo import arithmetic_chats, demo_tokenizer
    from autoep.models.tiny import build_tiny_model

    class SFT(autoep.hf.AutoEPMixin, trl.SFTTrainer):
        pass

    args = trl.SFTConfig(output_dir=out, per_device_train_batch_size=4, max_steps=12, logging_steps=1,
                         learning_rate=3e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                         bf16=False, packing=True, max_length=96)  # fmt: skip
    trainer = SFT(model=build_tiny_model("tiny-mixtral", seed=0), args=args, processing_class=demo_tokenizer(),
                  train_dataset=datasets.Dataset.from_list(arithmetic_chats(256)),
                  autoep_config=autoep.AutoEPConfig(ep_size=2, zero_stage=3))  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"batch": {k: v.tolist() for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")},
            "losses": losses, "metrics": trainer.state.log_history[0]}  # fmt: skip


def _dpo(out: str) -> dict:
    import datasets
    import trl

    import autoep
    import autoep.hf
    from autoep.hf.demo import demo_tokenizer, preference_pairs
    from autoep.models.tiny import build_tiny_model

    class DPO(autoep.hf.AutoEPMixin, trl.DPOTrainer):
        pass

    config = autoep.AutoEPConfig(ep_size=2, zero_stage=3)
    args = trl.DPOConfig(output_dir=out, per_device_train_batch_size=4, max_steps=6, logging_steps=1,
                         learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                         bf16=False, max_length=64)  # fmt: skip
    trainer = DPO(model=build_tiny_model("tiny-mixtral", seed=0), args=args,  # reference: an autoep copy
                  processing_class=demo_tokenizer(), train_dataset=datasets.Dataset.from_list(preference_pairs(64)),
                  autoep_config=config)  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    coef = trainer.model.config.router_aux_loss_coef
    reference = trainer.ref_model
    frozen = getattr(reference, "autoep", None) is not None and not any(p.requires_grad for p in reference.parameters())
    return {"logs": logs, "coef": coef, "reference_is_frozen_autoep_copy": frozen and reference is not trainer.model}


def _both(out: str) -> dict:
    torch.set_num_threads(1)
    return {"sft": _sft(f"{out}/sft"), "dpo": _dpo(f"{out}/dpo")}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_local(_both, 2, str(tmp_path_factory.mktemp("trl")))[0]


def test_sft_trains_and_logs_balancing_metrics(results):
    losses = results["sft"]["losses"]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert "expert_imbalance" in results["sft"]["metrics"]


def test_sft_completion_only_labels(results):
    batch = results["sft"]["batch"]
    checked = 0
    for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"], strict=True):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for begin, end in itertools.pairwise(starts):  # each packed document
            doc, doc_labels = ids[begin:end], labels[begin:end]
            assert doc[0] == USER and ASSISTANT in doc
            answer = doc.index(ASSISTANT) + 1  # the template's completion starts after <|assistant|>
            assert all(label == -100 for label in doc_labels[:answer])
            assert doc_labels[answer:] == doc[answer:]
            checked += 1
    assert checked >= 2


def test_dpo_runs_on_a_converted_model(results):
    logs = results["dpo"]["logs"]
    assert len(logs) == 6
    # Step 1: policy == reference, so the DPO term is log 2; the model adds its router aux loss.
    assert logs[0]["rewards/margins"] == 0.0
    assert 0 <= logs[0]["loss"] - math.log(2) < 5 * results["dpo"]["coef"]
    assert any(log["rewards/margins"] != 0.0 for log in logs[1:])
    assert results["dpo"]["reference_is_frozen_autoep_copy"]
