"""TRL's SFTTrainer on an expert-parallel model: put ``autoep.hf.AutoEPMixin`` in front of it.

    torchrun --nproc-per-node 4 examples/sft_trl.py --output runs/sft-example

Prompt/completion chats, loss on the completion only (TRL's default for this
format), packed into rows of 128 tokens (TRL's packing, with per-document
position ids).
"""

import argparse

import datasets
import torch
import trl

import autoep
import autoep.hf
from autoep.hf.demo import arithmetic_chats, demo_tokenizer
from autoep.models.tiny import build_tiny_model


class SFTTrainer(autoep.hf.AutoEPMixin, trl.SFTTrainer):
    """TRL's SFTTrainer, training an autoep model."""


parser = argparse.ArgumentParser()
parser.add_argument("--output", default="runs/sft-example")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--ep", type=int, default=2)
parser.add_argument("--zero", type=int, default=3)
opts = parser.parse_args()

args = trl.SFTConfig(
    output_dir=opts.output,
    per_device_train_batch_size=2,
    max_steps=opts.steps,
    learning_rate=3e-3,
    logging_steps=5,
    save_strategy="no",
    packing=True,
    max_length=128,
    bf16=torch.cuda.is_available(),
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
)
trainer = SFTTrainer(
    model=build_tiny_model("tiny-mixtral"),
    args=args,
    train_dataset=datasets.Dataset.from_list(arithmetic_chats(512)),
    processing_class=demo_tokenizer(),
    autoep_config=autoep.AutoEPConfig(ep_size=opts.ep, zero_stage=opts.zero),
)
result = trainer.train()
trainer.save_model()
if trainer.is_world_process_zero():
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
autoep.shutdown()  # destroys the process group and exits without gloo's exit-time abort (autoep.teardown)
