"""Distil a student in a plain PyTorch loop: kdcache's iterable dataset, collator and `KDLoss`, nothing else.

    python examples/plain_loop.py --data runs/demo/prepared --cache runs/demo/cache \
        --student runs/demo/ce/final --out runs/loop_student --max-steps 50

(`kdcache run configs/demo.yaml` makes the inputs.) Writes a `save_pretrained` directory with the
tokenizer to --out. With one batch per optimizer step and no DataLoader workers this is the loss and
the data order of `kdcache train` (same seed, batch size and KD settings); the optimizer and
schedule here are plain AdamW at a constant rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline.api import (KDCollator, KDIterableDataset, KDLoss, KDLossConfig, KdError, move_batch, save_student,
                          student_target_logits)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="", help="prepared data (default: the one the cache records)")
    p.add_argument("--cache", required=True, help="teacher cache (`kdcache teacher` output)")
    p.add_argument("--student", required=True, help="student model directory to start from")
    p.add_argument("--out", required=True, help="where the trained student is written (must not exist)")
    p.add_argument("--max-steps", type=int, default=50, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate (AdamW, constant)")
    p.add_argument("--loss", default="fkl", help="divergence: fkl rkl jsd tvd skl srkl akl")
    p.add_argument("--gate", default="none", help="SpecKD rule: none topk spec threshold")
    p.add_argument("--latf", action="store_true", help="AdaKD token focusing")
    p.add_argument("--idts", action="store_true", help="AdaKD per-token temperatures")
    p.add_argument("--ce-weight", type=float, default=0.0, help="alpha: loss = alpha*CE + (1-alpha)*KD")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and the gate")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except KdError as e:
        print(f"plain_loop: error: {e}", file=sys.stderr)
        return 1


def train(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from pipeline.data.prepare import prepared_meta
    from pipeline.training.student import check_inputs

    if Path(args.out).exists():
        raise KdError(f"{args.out} already exists; choose a new --out")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = KDIterableDataset(args.data or None, args.cache, seed=args.seed)
    data = args.data or ds.cache.meta["data"]["path"]
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=KDCollator(),
                                         num_workers=args.workers)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).to(device).train()
    check_inputs(model, prepared_meta(data), ds.cache)  # one-line errors for a student that does not fit
    kd = KDLoss.from_cache(ds.cache, KDLossConfig(loss=args.loss, gate=args.gate, latf=args.latf, idts=args.idts,
                                                  ce_weight=args.ce_weight, total_steps=args.max_steps,
                                                  seed=args.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step, epoch = 0, 0
    while step < args.max_steps:
        ds.set_epoch(epoch)  # a new shuffle each epoch, as `kdcache train` does
        for batch in loader:
            batch = move_batch(batch, device)
            out = kd(student_target_logits(model, batch), batch)  # one call = one optimizer step (auto_step)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            m = out.metrics
            print(f"step {step}: loss {m['loss']:.4f} kd {m['kd_loss']:.4f} ce {m['ce_loss']:.4f} "
                  f"tar {m['tar']:.3f} focus {m['focus_ratio']:.3f} kept {m['kept_fraction']:.3f}")
            if step == args.max_steps:
                break
        epoch += 1
    save_student(model, args.out, data)
    print(f"plain_loop: {step} steps -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
