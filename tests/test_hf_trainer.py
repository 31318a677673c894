"""transformers' Trainer and accelerate on autoep models, against autoep's own step (4 gloo ranks, one spawn).

Every scenario trains the tiny Mixtral-style model at ep 2 / ZeRO 3 with a
switch aux loss on, twice: once through the integration under test and once
through autoep's own `train_step` with the same hyperparameters, on the same
rows in the same order (each data-parallel rank's DistributedSampler shard).
Per-step losses and final weights must agree within 1e-5:

* Trainer, AdamW, 10 steps (crossing an epoch boundary), then `save_model`:
  the directory loads in plain transformers with the trained model's logits;
* Trainer with gradient accumulation 2; Trainer with Muon;
* Trainer stopped at step 5, resumed from its checkpoint at ep 4 / ZeRO 1:
  steps 6-10 equal the straight run's;
* Trainer at tp 2 / ep 2 / ZeRO 1: tensor-parallel peers get the same rows;
* an accelerate loop (`prepare`, `accumulate`, 2 micro-batches).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from autoep.launch import run_local

WORLD = 4
STEPS = 10
ROWS, SEQ = 64, 16
LR = 3e-3
SEED = 42
BALANCE = {"aux_loss_coef": 0.01}


class Rows(torch.utils.data.Dataset):
    def __init__(self, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (ROWS, SEQ), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(ep: int = 2, zero: int = 3, tp: int = 1, optimizer: dict | None = None):
    import autoep
    from autoep.models.tiny import build_tiny_model

    config = autoep.AutoEPConfig(
        ep_size=ep, tp_size=tp, zero_stage=zero, load_balancing=BALANCE, optimizer=optimizer or {"type": "AdamW"}
    )
    return build_tiny_model("tiny-mixtral", seed=0), config


def _full_params(model) -> dict[str, torch.Tensor]:
    from autoep.checkpoint.manager import full_tensor

    return {k: full_tensor(v).detach().clone() for k, v in model.state_dict().items()}


def _reference(dataset, accum: int, optimizer: dict, tp: int = 1, batch: int = 2) -> tuple[list[float], dict]:
    """autoep's own loop: build_optimizer + train_step + the same linear schedule, same rows."""
    import transformers

    import autoep
    from autoep.train import train_step

    model, config = _model(tp=tp, zero=1 if tp > 1 else 3, optimizer=optimizer)
    autoep.parallelize(model, config)
    opt = autoep.build_optimizer(model, config)
    schedule = transformers.get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=STEPS)
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=model.autoep.dims.dp, rank=model.autoep.dp_rank, shuffle=True, seed=SEED
    )
    order: list[list[int]] = []
    epoch = 0
    while len(order) < STEPS * accum:
        sampler.set_epoch(epoch)
        indices = list(sampler)
        order += [indices[i : i + batch] for i in range(0, len(indices), batch)]
        epoch += 1
    losses = []
    for step in range(STEPS):
        micro = [torch.stack([dataset[i]["input_ids"] for i in order[step * accum + m]]) for m in range(accum)]
        losses.append(train_step(model, opt, micro, max_grad_norm=1.0).loss)
        schedule.step()
    return losses, _full_params(model)


def _args(out: str, accum: int = 1, **extra):
    import transformers

    fields = dict(
        output_dir=out,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accum,
        max_steps=STEPS,
        learning_rate=LR,
        adam_beta2=0.95,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=SEED,
    )
    return transformers.TrainingArguments(**{**fields, **extra})


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


class StopAt(__import__("transformers").TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer_run(out: str, accum: int = 1, optimizer: dict | None = None, tp: int = 1, **extra):
    import autoep.hf

    model, config = _model(tp=tp, zero=1 if tp > 1 else 3, optimizer=optimizer)
    dataset = Rows(model.config.vocab_size)
    trainer = autoep.hf.Trainer(model=model, args=_args(out, accum, **extra), train_dataset=dataset,
                                autoep_config=config)  # fmt: skip
    trainer.train()
    return trainer


def _accelerate_run(dataset, accum: int = 2) -> tuple[list[float], dict, bool]:
    import transformers
    from accelerate import Accelerator
    from transformers import default_data_collator

    import autoep
    import autoep.hf

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model, config = _model(optimizer={"type": "AdamW", "params": {"lr": LR, "betas": (0.9, 0.95)}})
    autoep.parallelize(model, config)
    optimizer = autoep.build_optimizer(model, config)
    schedule = transformers.get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=STEPS)
    loader = autoep.hf.data_parallel_loader(dataset, model, batch_size=2, collate_fn=default_data_collator, seed=SEED)
    prepared, optimizer = accelerator.prepare(model, optimizer)  # a prepared scheduler steps once per process
    syncs = []
    model.no_sync = _counting(model.no_sync, syncs)
    losses, step, epoch, window = [], 0, 0, 0.0
    while step < STEPS:
        loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(prepared):
                loss = prepared(**batch).loss
                accelerator.backward(loss)
                window += loss.detach()
                if accelerator.sync_gradients:
                    autoep.clip_grad_norm_(prepared, 1.0)
                optimizer.step()
                if accelerator.sync_gradients:
                    schedule.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                from autoep.load_balance import step_load_balancing

                step_load_balancing(model, model.autoep.meshes.stats_group)
                dist.all_reduce(window)
                losses.append(float(window) / (accum * WORLD))
                step, window = step + 1, 0.0
                if step == STEPS:
                    break
        epoch += 1
    return losses, _full_params(model), prepared is model and len(syncs) == STEPS * (accum - 1)


def _counting(no_sync, calls: list):
    def wrapped():
        calls.append(1)
        return no_sync()

    return wrapped


def _close(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _scenarios(out: str) -> dict:
    import transformers

    from autoep.hf.demo import demo_tokenizer

    rank = dist.get_rank()
    torch.set_num_threads(1)
    results: dict = {}
    adamw = {"type": "AdamW", "params": {"lr": LR, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}}
    dataset = Rows(256)

    # AdamW, one micro-batch, with checkpoints at 5 and 10, then the final HF export.
    ref_losses, ref_params = _reference(dataset, 1, adamw)
    trainer = _trainer_run(f"{out}/straight", save_strategy="steps", save_steps=5)
    losses = _losses(trainer)
    results["adamw"] = (
        ref_losses,
        [losses[s] for s in range(1, STEPS + 1)],
        _close(ref_params, _full_params(trainer.model)),
    )
    trainer.processing_class = demo_tokenizer()
    trainer.save_model()
    probe = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    trainer.model.eval()
    with torch.no_grad():
        trained_logits = trainer.model(input_ids=probe).logits
    if rank == 0:
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(f"{out}/straight").eval()
        with torch.no_grad():
            results["export"] = float((reloaded(input_ids=probe).logits - trained_logits).abs().max())
        results["export_files"] = sorted(p.name for p in __import__("pathlib").Path(f"{out}/straight").iterdir())

    # Stopped at 5 (its own run), resumed at ep 4 / ZeRO 1.
    import autoep.hf

    model, config = _model()
    stopped = autoep.hf.Trainer(model=model, args=_args(f"{out}/stopped", save_strategy="steps", save_steps=5),
                                train_dataset=dataset, autoep_config=config, callbacks=[StopAt(5)])  # fmt: skip
    stopped.train()
    model, config = _model(ep=4, zero=1)
    resumed = autoep.hf.Trainer(model=model, args=_args(f"{out}/stopped", save_strategy="steps", save_steps=5),
                                train_dataset=dataset, autoep_config=config)  # fmt: skip
    resumed.train(resume_from_checkpoint=f"{out}/stopped/checkpoint-5")
    after = _losses(resumed)
    results["resume"] = (
        [losses[s] for s in range(6, STEPS + 1)],
        [after.get(s) for s in range(6, STEPS + 1)],
        _close(_full_params(trainer.model), _full_params(resumed.model)),
    )

    # Gradient accumulation 2; Muon.
    ref_losses, ref_params = _reference(dataset, 2, adamw)
    trainer = _trainer_run(f"{out}/accum", accum=2)
    results["accum"] = (ref_losses, list(_losses(trainer).values()), _close(ref_params, _full_params(trainer.model)))
    muon = {"type": "Muon", "params": {"lr": LR, "weight_decay": 0.0, "adamw_betas": (0.9, 0.95), "adamw_eps": 1e-8}}
    ref_losses, ref_params = _reference(dataset, 1, muon)
    trainer = _trainer_run(f"{out}/muon", optimizer={"type": "Muon"})
    results["muon"] = (ref_losses, list(_losses(trainer).values()), _close(ref_params, _full_params(trainer.model)))

    # Tensor parallelism 2: data by dp rank, tokens counted over dp.
    ref_losses, ref_params = _reference(dataset, 1, adamw, tp=2)
    trainer = _trainer_run(f"{out}/tp", tp=2)
    results["tp"] = (ref_losses, list(_losses(trainer).values()), _close(ref_params, _full_params(trainer.model)))

    # A plain accelerate loop.
    ref_losses, ref_params = _reference(dataset, 2, adamw)
    acc_losses, acc_params, unwrapped = _accelerate_run(dataset)
    results["accelerate"] = (ref_losses, acc_losses, _close(ref_params, acc_params))
    results["accelerate_unwrapped"] = unwrapped
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_local(_scenarios, WORLD, str(tmp_path_factory.mktemp("hf")))[0]


@pytest.mark.parametrize("scenario", ["adamw", "accum", "muon", "tp", "accelerate"])
def test_matches_autoeps_own_loop(results, scenario):
    reference, losses, weights = results[scenario]
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(reference, losses, strict=True)) < 1e-5, (reference, losses)
    assert weights < 1e-5
    assert losses[-1] < losses[0]  # it trains


def test_resume_at_another_layout_continues_the_straight_run(results):
    straight, resumed, weights = results["resume"]
    assert None not in resumed
    assert max(abs(a - b) for a, b in zip(straight, resumed, strict=True)) < 1e-5, (straight, resumed)
    assert weights < 1e-5


def test_save_model_writes_a_plain_hf_directory(results):
    assert results["export"] < 1e-5
    files = results["export_files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_args.bin"} <= set(files)
    assert {"checkpoint-5", "checkpoint-10"} <= set(files)  # the export left Trainer's checkpoints alone


def test_accelerate_prepare_does_not_wrap_and_accumulate_skips_syncs(results):
    assert results["accelerate_unwrapped"]
