"""Distil a student with Hugging Face's `transformers.Trainer`, the loss being kdcache's `KDLoss`.

    python examples/hf_trainer.py --data runs/demo/prepared --cache runs/demo/cache \
        --student runs/demo/ce/final --out runs/hf_student --max-steps 50

(`kdcache run configs/demo.yaml` makes runs/demo/prepared, runs/demo/cache and a warm-started
student in runs/demo/ce/final.) Writes a `save_pretrained` directory with the tokenizer to --out.

Three things differ from a plain causal-LM fine-tune, and each is said where it is done:
- the dataset is a torch dataset of dicts with nested cache rows, so `remove_unused_columns=False`
  (otherwise Trainer strips every key the model's forward does not name, the cache rows included);
- `compute_loss` returns KDLoss's per-batch mean, so `model_accepts_loss_kwargs = False` makes
  Trainer divide it by gradient_accumulation_steps (a mean over micro-batches; `kdcache train`
  instead normalises over all kept positions of the step, which agrees with one micro-batch per step);
- LATF's focus ratio moves once per optimizer step: a callback calls `KDLoss.end_step()`.
Needs kdcache installed with `accelerate` (`pip install -e '.[trainers]'`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from pipeline.api import KDCollator, KDExampleDataset, KDLoss, KDLossConfig, KdError, gather_target_logits, save_student


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="", help="prepared data (default: the one the cache records)")
    p.add_argument("--cache", required=True, help="teacher cache (`kdcache teacher` output)")
    p.add_argument("--student", required=True, help="student model directory to start from")
    p.add_argument("--out", required=True, help="where the trained student is written (must not exist)")
    p.add_argument("--max-steps", type=int, default=50, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--loss", default="fkl", help="divergence: fkl rkl jsd tvd skl srkl akl")
    p.add_argument("--gate", default="none", help="SpecKD rule: none topk spec threshold")
    p.add_argument("--latf", action="store_true", help="AdaKD token focusing")
    p.add_argument("--idts", action="store_true", help="AdaKD per-token temperatures")
    p.add_argument("--ce-weight", type=float, default=0.0, help="alpha: loss = alpha*CE + (1-alpha)*KD")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and the gate")
    return p.parse_args(argv)


def make_trainer_class():
    """The Trainer subclass (built in a function so importing this file does not import transformers' Trainer)."""
    from transformers import Trainer, TrainerCallback

    class KDTrainer(Trainer):
        """`Trainer` whose loss is `KDLoss` on the student's logits at the batch's target positions."""

        def __init__(self, *args, kd: KDLoss, **kwargs):
            super().__init__(*args, **kwargs)
            self.kd = kd
            # KDLoss returns a per-batch mean: let Trainer divide it by the accumulation steps (it would not
            # when the model "accepts loss kwargs", expecting a loss already normalised over the whole step).
            self.model_accepts_loss_kwargs = False
            self._kd_logs: dict[str, list[float]] = defaultdict(list)
            self.add_callback(EndStep(kd))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            self.kd.train(model.training)  # evaluation batches must not count towards LATF's step loss
            out = self.kd(gather_target_logits(outputs.logits, inputs), inputs)
            if model.training:
                for k, v in out.metrics.items():
                    if v is not None and k != "loss":
                        self._kd_logs[k].append(v)
            return (out.loss, outputs) if return_outputs else out.loss

        def log(self, logs, start_time=None):
            # KD metrics averaged over the micro-batches since the last log line
            logs.update({k: sum(v) / len(v) for k, v in self._kd_logs.items() if v})
            self._kd_logs.clear()
            super().log(logs, start_time)

    class EndStep(TrainerCallback):
        """LATF's focus ratio moves once per optimizer step, from that step's kd_loss."""

        def __init__(self, kd: KDLoss):
            self.kd = kd

        def on_step_end(self, args, state, control, **kwargs):
            self.kd.end_step()

    return KDTrainer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except KdError as e:
        print(f"hf_trainer: error: {e}", file=sys.stderr)
        return 1


def train(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, TrainingArguments

    from pipeline.models import load_tokenizer
    from pipeline.data.prepare import prepared_meta
    from pipeline.training.student import check_inputs

    if Path(args.out).exists():
        raise KdError(f"{args.out} already exists; choose a new --out")
    ds = KDExampleDataset(args.data or None, args.cache)
    data = args.data or ds.cache.meta["data"]["path"]
    model = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    check_inputs(model, prepared_meta(data), ds.cache)  # vocabulary, tokenizer and data fingerprint, one line each
    with tempfile.TemporaryDirectory(prefix="kdcache-hf-") as scratch:  # Trainer's own output: nothing kept
        targs = TrainingArguments(
            output_dir=scratch, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, seed=args.seed, logging_steps=1,
            save_strategy="no", report_to="none", remove_unused_columns=False, dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        # each DDP rank gets its own gate stream, as in `kdcache train`
        kd = KDLoss.from_cache(ds.cache, KDLossConfig(loss=args.loss, gate=args.gate, latf=args.latf, idts=args.idts,
                                                      ce_weight=args.ce_weight, total_steps=args.max_steps,
                                                      seed=args.seed, rank=targs.process_index,
                                                      auto_step=False))
        trainer = make_trainer_class()(model=model, args=targs, train_dataset=ds, data_collator=KDCollator(),
                                       processing_class=load_tokenizer(prepared_meta(data)["tokenizer"]["name"]),
                                       kd=kd)
        result = trainer.train()
    if trainer.is_world_process_zero():  # under torchrun, one rank writes
        save_student(model, args.out, data)
    print(f"hf_trainer: {args.max_steps} steps, final train loss {result.training_loss:.4f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
