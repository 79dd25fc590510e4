"""Run by tests/training/test_fsdp.py under torchrun: a few FSDP training steps on fixed micro-batches, rank r taking
micro-batch 2 * step + r of a fixed list, then a collective checkpoint (rank 0 writes).

    torchrun --nproc_per_node 2 tests/training/fsdp_worker.py CONFIG_JSON
"""

import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.data.prepare import load_prepared  # noqa: E402
from pipeline.data.stream import CacheStream  # noqa: E402
from pipeline.training.trainer import Trainer  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402


def fixed_microbatches(trainer: Trainer, n: int) -> list:
    """The first n micro-batches of the data in order, the same list in every process."""
    stream = CacheStream(load_prepared(trainer.data_path), trainer.cache, trainer.cfg.batch_size, shuffle=False,
                         fields=trainer.stream.fields)
    it = iter(stream)
    return [next(it) for _ in range(n)]


def main() -> None:
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    steps = cfg.max_steps
    t = Trainer(cfg)
    mbs = fixed_microbatches(t, 2 * steps)
    t._prepare_out(fresh=True) if t.rank == 0 else None
    for step in range(steps):
        t.train_step([mbs[2 * step + t.rank].to(t.device)])
        t.step += 1
    t._checkpoint()


if __name__ == "__main__":
    main()
