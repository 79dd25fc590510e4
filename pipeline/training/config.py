"""The typed settings of `kdcache train` (one dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.errors import KdError
from pipeline.losses.options import KdOptions

SCHEDULES = ("constant", "linear", "cosine")
REPORTERS = ("none", "jsonl", "tensorboard", "wandb")  # pipeline.training.metrics
BEST_METRICS = ("ce", "fkl_to_teacher", "teacher_top1_agreement")  # pipeline.training.held_out


@dataclass
class TrainConfig(KdOptions):
    """Settings of `kdcache train`: the distillation options (`KdOptions`: loss, gate, LATF, IDTS, SE-KD, ...)
    and the ones below. Without `cache` this is plain causal-LM training on the targets."""

    URL_FIELDS: ClassVar[tuple[str, ...]] = ("cache", "eval_cache", "data", "eval_data", "out", "student")  # may be fsspec URLs

    data: str = ""  # prepared data; may be omitted when the cache records where it lives
    cache: str = ""
    # A cache on an object store (`cache: s3://...`) is read through a local copy (pipeline/cache/mirror.py):
    local_cache: str = ""  # its directory (default $KDCACHE_LOCAL_CACHE or ~/.cache/kdcache/remote)
    local_cache_gb: float = 0.0  # at most this many GiB of shards kept, least recently used evicted (0: no bound)
    prefetch_shards: int = 2  # shards downloaded ahead of the reader, in the epoch's order
    # The benchmark's online reference (`kdcache run`: a student with `online: true`; pipeline/training/online.py):
    # this teacher model runs on every micro-batch and its full distribution is the KD target, instead of a cache.
    online_teacher: str = ""
    student: str = ""  # model directory or hub id to start from
    student_config: str = ""  # transformers config.json: a student built from scratch
    out: str = ""
    # --- optimisation ---
    lr: float = 3e-4
    warmup: int = 0  # warm-up steps (linear from 0)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # floor of linear/cosine decay, as a fraction of lr
    weight_decay: float = 0.0
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 0.0  # used when max_steps is 0 (default 1 epoch)
    batch_size: int = 8  # sequences per micro-batch (when batch_tokens is 0)
    batch_tokens: int = 0  # > 0: padded tokens per micro-batch, examples bucketed by length (pipeline/data/epoch_plan.py)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0
    shuffle: bool = True
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    stop_after: int = 0  # train N steps of the planned run, checkpoint, exit (time-limited jobs)
    resume: bool = False
    device: str = "auto"
    dtype: str = "auto"  # auto = bfloat16 autocast on GPU, float32 on CPU
    read_threads: int = 2
    loss_chunk_rows: int = 0  # target rows per chunk of the student's logits in the loss; 0 = auto (~64 MiB)
    fsdp: bool = False  # shard the student over torchrun's ranks (FSDP2; pipeline/training/fsdp.py) instead of DDP
    activation_checkpointing: bool = False  # recompute layer activations in backward (less memory, ~30% more time)
    follow: bool = False  # train while `kdcache teacher` still writes the cache: read each shard once committed
    follow_timeout: float = 3600.0  # --follow: seconds to wait for the next shard's commit before stopping
    overwrite: bool = False
    # --- tracking, held-out evaluation, publishing ---
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard / wandb; metrics.jsonl always
    eval_every: int = 0  # held-out evaluation every N steps and at the end (0: none)
    eval_data: str = ""  # prepared held-out split; may be omitted when eval_cache records it
    eval_cache: str = ""  # teacher cache of eval_data: adds teacher_top1_agreement and fkl_to_teacher
    best_metric: str = "ce"  # OUT/best keeps the model with the best held-out value of this figure
    push_to_hub: str = ""  # OWNER/NAME: upload final/ to the Hugging Face Hub when training ends

    def __post_init__(self) -> None:
        self.check_kd()
        if self.schedule not in SCHEDULES:
            raise KdError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.student and self.student_config:
            raise KdError("give either --student or --student-config, not both")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise KdError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_tokens < 0:
            raise KdError(f"batch_tokens must be >= 0 (0: batch_size sequences per micro-batch), got {self.batch_tokens}")
        if self.online_teacher and self.cache:
            raise KdError("give either a cache or an online teacher, not both")
        if self.online_teacher and self.tail == "sampled":
            raise KdError("tail 'sampled' estimates the tail from cached draws; the online teacher has no tail (K = V)")
        if self.follow and not self.cache:
            raise KdError("--follow reads a teacher cache as it is written: give --cache")
        if self.follow_timeout <= 0:
            raise KdError(f"follow_timeout must be positive, got {self.follow_timeout}")
        if self.max_steps < 0 or self.epochs < 0 or self.lr <= 0:
            raise KdError("max_steps and epochs must be >= 0 and lr > 0")
        bad = [r for r in self.report_to if r not in REPORTERS]
        if bad or ("none" in self.report_to and len(self.report_to) > 1):
            raise KdError(f"report_to must be none, or any of jsonl, tensorboard, wandb; got {','.join(self.report_to)}")
        if self.eval_every < 0:
            raise KdError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.eval_every and self.fsdp:
            raise KdError("--eval-every runs the held-out evaluation on rank 0 alone, which a student sharded with "
                          "--fsdp cannot do; evaluate the checkpoints with `kdcache eval` instead")
        if self.best_metric not in BEST_METRICS:
            raise KdError(f"best_metric must be one of {', '.join(BEST_METRICS)}, got {self.best_metric!r}")
        if self.eval_every and not (self.eval_data or self.eval_cache):
            raise KdError("--eval-every needs --eval-data (a `kdcache prepare` output of the held-out split)")
        if self.eval_every and self.best_metric != "ce" and not self.eval_cache:
            raise KdError(f"--best-metric {self.best_metric} compares with the teacher: it needs --eval-cache "
                          "(a teacher cache of the held-out split)")
        if self.push_to_hub:
            from pipeline.training.hub import check_repo_id

            check_repo_id(self.push_to_hub)

    def check_cache_given(self) -> None:
        """KD options without a teacher cache would be ignored (plain CE, silently): refuse them when training
        starts. Not in `__post_init__`: a config file may leave the cache to the command line or `kdcache run`."""
        if self.cache or self.online_teacher:
            return
        shaping = [name for name, on in (("--gate", self.gate != "none"), ("--latf", self.latf), ("--idts", self.idts),
                                         ("--select", self.select != "none"), ("--temperature", self.temperature != 1.0),
                                         ("--tail", self.tail not in ("auto", "bucket")), ("--ce-weight", self.ce_weight != 0.0))
                   if on]
        if shaping:
            raise KdError(f"{', '.join(shaping)} shape{'s' if len(shaping) == 1 else ''} the distillation loss, "
                          "which needs a teacher cache: give --cache DIR, or drop them to train on cross-entropy only")

    @property
    def distills(self) -> bool:
        return bool(self.cache or self.online_teacher) and self.loss != "none"

