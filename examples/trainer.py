"""transformers' Trainer on an expert-parallel model: one changed line (``autoep.hf.Trainer``).

    torchrun --nproc-per-node 4 examples/trainer.py --output runs/trainer-example

Trains the built-in tiny Mixtral-style model (ep 2, ZeRO 3 on 4 ranks) on
rendered arithmetic chats, saves Trainer checkpoints (autoep DCP checkpoints
inside ``checkpoint-N``, resumable at another layout) and finally a plain
Hugging Face model directory, which it reloads with transformers to check.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, TrainingArguments

import autoep
import autoep.hf
from autoep.hf.demo import demo_tokenizer, packed_rows
from autoep.models.tiny import build_tiny_model

parser = argparse.ArgumentParser()
parser.add_argument("--output", default="runs/trainer-example")
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--ep", type=int, default=2)
parser.add_argument("--zero", type=int, default=3)
opts = parser.parse_args()

tokenizer = demo_tokenizer()
args = TrainingArguments(
    output_dir=opts.output,
    per_device_train_batch_size=4,
    max_steps=opts.steps,
    learning_rate=3e-3,
    warmup_steps=5,
    logging_steps=10,
    save_steps=20,
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
)
trainer = autoep.hf.Trainer(  # was: transformers.Trainer(
    model=build_tiny_model("tiny-mixtral"),
    args=args,
    train_dataset=packed_rows(tokenizer),
    processing_class=tokenizer,
    autoep_config=autoep.AutoEPConfig(ep_size=opts.ep, zero_stage=opts.zero),
)
result = trainer.train()
trainer.save_model()  # a Hugging Face directory: config.json + model.safetensors

if trainer.is_world_process_zero():
    reloaded = AutoModelForCausalLM.from_pretrained(opts.output)
    print(f"final loss {result.training_loss:.3f}; reloaded {type(reloaded).__name__} from {opts.output}")
autoep.shutdown()  # destroys the process group and exits without gloo's exit-time abort (autoep.teardown)
