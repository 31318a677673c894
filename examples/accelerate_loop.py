"""A plain accelerate loop on an expert-parallel model.

    accelerate launch --multi_gpu --num_processes 8 examples/accelerate_loop.py   # 8 GPUs, NCCL
    accelerate launch --multi_gpu --num_processes 4 examples/accelerate_loop.py   # no GPU: 4 CPU processes, gloo
    torchrun --nproc-per-node 4 examples/accelerate_loop.py                       # the same, without accelerate's CLI

``accelerator.prepare`` leaves the autoep model as it is (no DDP on top) and
``accelerator.accumulate`` defers its gradient reduction to the last
micro-batch. Two things differ from a DDP loop: the data is sharded by the
model's data-parallel rank (``autoep.hf.data_parallel_loader``: tensor-parallel
peers must see the same rows), and clipping uses autoep's global norm.
"""

import argparse

import torch
from accelerate import Accelerator
from transformers import default_data_collator, get_scheduler

import autoep
import autoep.hf
from autoep.hf.demo import demo_tokenizer, packed_rows
from autoep.models.tiny import build_tiny_model

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--ep", type=int, default=2)
parser.add_argument("--zero", type=int, default=3)
parser.add_argument("--grad-accum", type=int, default=2)
opts = parser.parse_args()

# cpu=True on a machine without GPUs: accelerate then runs its multi-process CPU mode (gloo)
accelerator = Accelerator(gradient_accumulation_steps=opts.grad_accum, cpu=not torch.cuda.is_available())
config = autoep.AutoEPConfig(ep_size=opts.ep, zero_stage=opts.zero, optimizer={"type": "AdamW", "params": {"lr": 3e-3}})
model = autoep.parallelize(build_tiny_model("tiny-mixtral"), config)
optimizer = autoep.build_optimizer(model, config)
scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=4, num_training_steps=opts.steps)
loader = autoep.hf.data_parallel_loader(
    packed_rows(demo_tokenizer()), model, batch_size=4, collate_fn=default_data_collator
)
# The scheduler stays out of prepare(): accelerate would step it once per process per step.
model, optimizer = accelerator.prepare(model, optimizer)

step, epoch = 0, 0
while step < opts.steps:
    loader.set_epoch(epoch)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                autoep.clip_grad_norm_(model, 1.0)
                step += 1
            optimizer.step()  # accelerate skips it until the last micro-batch
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients and step % 10 == 0:
            accelerator.print(f"step {step}: loss {loss.item():.3f}")
        if step >= opts.steps:
            break
    epoch += 1
accelerator.print("done")
autoep.shutdown()  # destroys the process group and exits without gloo's exit-time abort (autoep.teardown)
