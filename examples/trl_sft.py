"""Distil a student with TRL's `SFTTrainer`, the loss being kdcache's `KDLoss`.

    python examples/trl_sft.py --data runs/demo/prepared --cache runs/demo/cache \
        --student runs/demo/ce/final --out runs/trl_student --max-steps 50

(`kdcache run configs/demo.yaml` makes the inputs.) Writes a `save_pretrained` directory with the
tokenizer to --out. Needs `pip install -e '.[trl]'` (tested with trl 1.16).

SFTTrainer takes only Hugging Face datasets, so the examples come through `to_hf_iterable`. They
are already tokenized and carry cache rows, so SFTTrainer's own preparation is skipped
(`dataset_kwargs={"skip_prepare_dataset": True}`), its column filter is off
(`remove_unused_columns=False`) and `KDCollator` builds the batches. `compute_loss` replaces
SFTTrainer's (which would compute its own token-level cross-entropy); as in examples/hf_trainer.py,
the per-batch KDLoss is divided by the accumulation steps and LATF moves once per optimizer step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.api import (KDCollator, KDExampleDataset, KDLoss, KDLossConfig, KdError, gather_target_logits, save_student,
                          to_hf_iterable)


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
    """The SFTTrainer subclass (built in a function: importing this file does not need trl)."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class KDSFTTrainer(SFTTrainer):
        def __init__(self, *args, kd: KDLoss, **kwargs):
            super().__init__(*args, **kwargs)
            self.kd = kd
            self.model_accepts_loss_kwargs = False  # KDLoss is a per-batch mean: Trainer divides by accumulation
            self.add_callback(EndStep(kd))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            self.kd.train(model.training)  # evaluation batches must not count towards LATF's step loss
            out = self.kd(gather_target_logits(outputs.logits, inputs), inputs)
            if model.training:
                mode = self._metrics["train"]  # SFTTrainer averages these into its log lines
                for k in ("kd_loss", "ce_loss", "tar", "focus_ratio", "kept_fraction"):
                    mode[k].append(out.metrics[k])
            return (out.loss, outputs) if return_outputs else out.loss

    class EndStep(TrainerCallback):
        def __init__(self, kd: KDLoss):
            self.kd = kd

        def on_step_end(self, args, state, control, **kwargs):
            self.kd.end_step()

    return KDSFTTrainer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except KdError as e:
        print(f"trl_sft: error: {e}", file=sys.stderr)
        return 1


def train(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from pipeline.models import load_tokenizer
    from pipeline.data.prepare import prepared_meta
    from pipeline.training.student import check_inputs

    if Path(args.out).exists():
        raise KdError(f"{args.out} already exists; choose a new --out")
    ds = KDExampleDataset(args.data or None, args.cache)
    data = args.data or ds.cache.meta["data"]["path"]
    model = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    check_inputs(model, prepared_meta(data), ds.cache)
    with tempfile.TemporaryDirectory(prefix="kdcache-trl-") as scratch:
        cfg = SFTConfig(output_dir=scratch, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, seed=args.seed,
                        logging_steps=1, save_strategy="no", report_to="none", remove_unused_columns=False,
                        dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=not torch.cuda.is_available(),
                        disable_tqdm=True)
        # each DDP rank gets its own gate stream, as in `kdcache train`
        kd = KDLoss.from_cache(ds.cache, KDLossConfig(loss=args.loss, gate=args.gate, latf=args.latf, idts=args.idts,
                                                      ce_weight=args.ce_weight, total_steps=args.max_steps,
                                                      seed=args.seed, rank=cfg.process_index,
                                                      auto_step=False))
        # SFTTrainer takes only Hugging Face datasets: the same examples as a streaming one, reshuffled each epoch.
        train = to_hf_iterable(ds).shuffle(seed=args.seed, buffer_size=1024)
        trainer = make_trainer_class()(model=model, args=cfg, train_dataset=train, data_collator=KDCollator(),
                                       processing_class=load_tokenizer(prepared_meta(data)["tokenizer"]["name"]),
                                       kd=kd)
        result = trainer.train()
    if trainer.is_world_process_zero():  # under torchrun, one rank writes
        save_student(model, args.out, data)
    print(f"trl_sft: {args.max_steps} steps, final train loss {result.training_loss:.4f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
