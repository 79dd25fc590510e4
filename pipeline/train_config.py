"""The typed settings of `kdcache train` (one dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pipeline.errors import KdError
from pipeline.kd_loss import KdSettings
from pipeline.selection import SELECTIONS

LOSSES = ("none", "fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl")
TAILS = ("bucket", "renorm", "ignore", "sampled")
GATES = ("none", "topk", "spec", "threshold")
SCHEDULES = ("constant", "linear", "cosine")
REPORTERS = ("none", "jsonl", "tensorboard", "wandb")  # pipeline.metrics
BEST_METRICS = ("ce", "fkl_to_teacher", "teacher_top1_agreement")  # pipeline.train_eval


@dataclass
class TrainConfig:
    """Settings of `kdcache train`. Without `cache` this is plain causal-LM training on the targets."""

    data: str = ""  # prepared data; may be omitted when the cache records where it lives
    cache: str = ""
    student: str = ""  # model directory or hub id to start from
    student_config: str = ""  # transformers config.json: a student built from scratch
    out: str = ""
    # --- distillation (methods.md §2-5) ---
    loss: str = "fkl"
    tail: str = "bucket"  # bucket | renorm | ignore | sampled (tail bucket split over cached draws)
    gate: str = "none"  # SpecKD verification rule: none | topk | spec | threshold
    proposal: str = "greedy"  # greedy | sample
    gate_k: int = 5  # topk rule: accept when the proposal is among the teacher's top gate_k
    gate_threshold: float = 0.1  # threshold rule: accept when p(proposal) >= this
    reject_weight: float = 0.0  # weight of rejected positions (0 = masked)
    latf: bool = False
    latf_warmup: float = 0.05  # fraction of the run before the reference EMA is taken
    latf_ema_decay: float = 0.99
    latf_epsilon: float = 0.05
    latf_sigma: float = 0.05
    latf_min_ratio: float = 0.1
    idts: bool = False
    idts_c: float = 0.5
    temperature: float = 1.0  # T_base
    select: str = "none"  # SE-KD: none | student_entropy (distil only each sequence's most uncertain positions)
    select_ratio: float = 0.2  # SE-KD: fraction of each sequence's positions kept (the authors' 20%)
    ce_weight: float = 0.0  # alpha: loss = alpha * ce + (1 - alpha) * kd_loss
    # --- optimisation ---
    lr: float = 3e-4
    warmup: int = 0  # warm-up steps (linear from 0)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # floor of linear/cosine decay, as a fraction of lr
    weight_decay: float = 0.0
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 0.0  # used when max_steps is 0 (default 1 epoch)
    batch_size: int = 8  # sequences per micro-batch (when batch_tokens is 0)
    batch_tokens: int = 0  # > 0: padded tokens per micro-batch, examples bucketed by length (pipeline/epoch_plan.py)
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
    fsdp: bool = False  # shard the student over torchrun's ranks (FSDP2; pipeline/fsdp.py) instead of DDP
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
        for name, allowed in (("loss", LOSSES), ("tail", TAILS), ("gate", GATES), ("schedule", SCHEDULES),
                              ("proposal", ("greedy", "sample")), ("select", SELECTIONS)):
            if getattr(self, name) not in allowed:
                raise KdError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.student and self.student_config:
            raise KdError("give either --student or --student-config, not both")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise KdError(f"ce_weight must be in [0, 1], got {self.ce_weight}")
        if not 0.0 <= self.reject_weight <= 1.0:
            raise KdError(f"reject_weight must be in [0, 1], got {self.reject_weight}")
        if not 0.0 < self.select_ratio <= 1.0:
            raise KdError(f"select_ratio must be in (0, 1], got {self.select_ratio}")
        if self.temperature <= 0:
            raise KdError(f"temperature must be positive, got {self.temperature}")
        for name in ("batch_size", "grad_accum", "gate_k"):
            if getattr(self, name) < 1:
                raise KdError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_tokens < 0:
            raise KdError(f"batch_tokens must be >= 0 (0: batch_size sequences per micro-batch), got {self.batch_tokens}")
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
            from pipeline.hub import check_repo_id

            check_repo_id(self.push_to_hub)
        if self.tail == "sampled" and self.loss != "fkl":
            raise KdError("tail 'sampled' is defined for loss fkl only (its gradient is the unbiased one)")
        if self.tail == "sampled" and (self.idts or self.temperature != 1.0):
            raise KdError("tail 'sampled' is exact only at T = 1 (its draws come from p, not p^T): it cannot be "
                          "combined with --idts or --temperature != 1; use --tail bucket")

    @property
    def distills(self) -> bool:
        return bool(self.cache) and self.loss != "none"

    def kd_settings(self) -> KdSettings:
        return KdSettings(**{f.name: getattr(self, f.name) for f in fields(KdSettings)})
