"""`KDLoss`: the whole kdcache objective as one torch module, for trainers other than `kdcache train`.

    kd = KDLoss.from_cache("runs/demo/cache", KDLossConfig(loss="fkl", gate="topk", latf=True, idts=True,
                                                            ce_weight=0.1, total_steps=1000))
    logits = student_target_logits(model, batch)      # [N, Vs]: the student at the batch's target positions
    out = kd(logits, batch)                             # batch: a `KDCollator` dict or a `MicroBatch`
    out = kd.from_hidden(hidden, model, batch)          # the same from hidden states [N, H], head in row chunks
    out.loss.backward(); optimizer.step()               # out.metrics: kd_loss, ce_loss, tar, focus_ratio, ...

Per batch (methods.md §5): SpecKD gate -> LATF among the accepted positions -> IDTS temperatures ->
divergence on K + 1 buckets, through `pipeline.losses.objective.kd_terms` (the trainer's own code), then

    kd_loss = sum_t w_t T_t^2 D_t / sum_t w_t,   ce_loss = mean_t CE_t,   loss = a*ce_loss + (1-a)*kd_loss

Normalisation is per call (per batch). `kdcache train` normalises over a whole optimizer step
(both sums run over every micro-batch of the step), so the two agree exactly with one batch per
optimizer step; with gradient accumulation a trainer that averages per-batch losses (Hugging Face's
Trainer does) weights each micro-batch equally instead of each kept position.

LATF's focus ratio moves once per optimizer step from that step's kd_loss. With `auto_step` (the
default) every training-mode call is taken as one optimizer step; with gradient accumulation set
`auto_step=False` and call `kd.end_step()` once per optimizer step (it uses the kd_loss of all the
calls since the last one, summed as the trainer sums them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.losses.adakd import LATF
from pipeline.errors import KdError
from pipeline.losses.objective import gate_generator, kd_fields, kd_terms
from pipeline.losses.options import KdOptions
from pipeline.training.metrics import step_row


@dataclass
class KDLossConfig(KdOptions):
    """Settings of `KDLoss`: the KD options of `kdcache train` (`KdOptions`: the same names, defaults and rules),
    plus `total_steps` (LATF's warm-up is a fraction of it), the gate's `seed`/`rank` and `auto_step`."""

    total_steps: int = 0  # optimizer steps of the run (required with latf)
    seed: int = 0  # the gate's random stream (sampled proposals, the spec rule's uniforms)
    rank: int = 0  # DDP rank: each rank gets its own gate stream, as in `kdcache train`
    auto_step: bool = True  # every training-mode call is one optimizer step (see the module docstring)

    def __post_init__(self) -> None:
        if self.loss == "none":
            raise KdError("KDLoss needs a divergence (loss none is plain cross-entropy: use the model's own loss)")
        self.check_kd()
        if self.latf and self.total_steps < 1:
            raise KdError("latf needs total_steps (the run's optimizer steps): its warm-up is a fraction of them")
        if self.total_steps < 0:
            raise KdError(f"total_steps must be >= 0, got {self.total_steps}")

    @classmethod
    def from_train_config(cls, cfg: Any, total_steps: int, **over: Any) -> "KDLossConfig":
        """The KDLoss settings of a `TrainConfig` (the gate seeded by its seed)."""
        return cls(**cfg.kd_options(), total_steps=total_steps, seed=cfg.seed, **over)


@dataclass
class KDOutput:
    """What `KDLoss` returns: the differentiable `loss` and plain-float `metrics` (the keys `kdcache train`
    logs: loss, kd_loss, ce_loss, tar, focus_ratio, temp_mean, temp_min, temp_max, kept_fraction)."""

    loss: torch.Tensor
    metrics: dict[str, float | None]


class KDLoss(torch.nn.Module):
    """The kdcache distillation loss of one batch, holding LATF's state and the gate's generator.

    forward(logits [N, Vs], batch) -> KDOutput. logits: the student's logits at the batch's N target
    positions (row i predicts target_ids[i]; `student_target_logits`), Vs >= V; ids >= V are a padded
    head and belong to neither distribution. batch: a `KDCollator` dict or a `MicroBatch`.
    `state_dict()` / `load_state_dict()` carry LATF's state and the gate's generator (as extra state).
    """

    def __init__(self, config: KDLossConfig, vocab_size: int, temperatures: list[float] | tuple[float, ...],
                 top_k: int, tail_samples: int = 0, draw_logprobs: bool = True):
        super().__init__()
        self.config = config
        self.vocab_size, self.top_k = int(vocab_size), int(top_k)
        self.temperatures = [float(t) for t in temperatures]
        if config.gate == "topk" and config.gate_k > self.top_k:
            raise KdError(f"gate_k {config.gate_k} exceeds the cache's K = {self.top_k}: the gate can only verify "
                          f"against cached ids")
        config.check_grid(self.temperatures)
        # a snapshot (later edits of `config` change nothing), its tail policy resolved for this cache (auto)
        self.settings = config.for_cache(tail_samples, draw_logprobs)
        self.settings.check_tail_draws(tail_samples, draw_logprobs)
        self.fields = kd_fields(self.settings.tail, draw_logprobs)  # what each batch's cache rows must hold
        self.register_buffer("grid_betas", torch.tensor([1.0 / t for t in self.temperatures], dtype=torch.float32),
                             persistent=False)
        self.latf = None
        if config.latf:
            try:
                self.latf = LATF(config.total_steps, warmup_fraction=config.latf_warmup,
                                 ema_decay=config.latf_ema_decay, epsilon=config.latf_epsilon,
                                 sigma=config.latf_sigma, min_ratio=config.latf_min_ratio)
            except ValueError as e:
                raise KdError(f"LATF settings: {e}") from None
        self.generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None  # loaded before the first call
        self._pending = [0.0, 0.0]  # kd numerator and denominator since the last end_step()

    @classmethod
    def from_cache(cls, cache: Any, config: KDLossConfig | None = None) -> "KDLoss":
        """A KDLoss for the cache at `cache` (a path or `Cache`): V, K and the temperature grid from it."""
        from pipeline.cache import Cache, open_cache

        c = cache if isinstance(cache, Cache) else open_cache(cache)
        return cls(config or KDLossConfig(), c.vocab_size, c.temperatures, c.k, c.tail_samples, c.params.draw_logprobs)

    # ---- one batch --------------------------------------------------------------------------
    def forward(self, logits: torch.Tensor, batch: Any) -> KDOutput:
        cache, target_ids = self._unpack(batch)
        self._check(logits, cache, target_ids)
        cfg, n = self.config, logits.shape[0]
        alpha = cfg.ce_weight
        if alpha > 0.0:
            ce_sum = torch.nn.functional.cross_entropy(logits, target_ids, reduction="sum")
        else:  # logged only: a CE graph would cost a full [N, V] log-softmax backward (see pipeline/training/trainer.py)
            with torch.no_grad():
                ce_sum = torch.nn.functional.cross_entropy(logits.detach(), target_ids, reduction="sum")
        terms = kd_terms(logits, cache, self.settings, self.vocab_size, self.grid_betas, self.latf,
                         self._gate_generator(logits.device), groups=self._groups(batch))
        kd = terms.numerator / terms.denominator if terms.denominator > 0 else terms.numerator * 0.0
        ce = ce_sum / max(n, 1)
        loss = kd if alpha == 0.0 else alpha * ce + (1.0 - alpha) * kd
        return self._finish(loss, ce_sum.detach(), terms.numerator.detach(), terms.denominator, n, terms.accepted,
                            terms.kept, terms.temps)

    def from_hidden(self, hidden: torch.Tensor, model: Any, batch: Any, chunk_rows: int = 0) -> KDOutput:
        """The same loss from the student's final hidden states and its output head, in row chunks: no
        [N, Vs] logits tensor is ever built (`pipeline.losses.chunked`; at V = 151,936 one is 40 GB at
        64k targets). hidden [N, H] at the batch's target positions (`pipeline.training.student.target_hidden`),
        model the student (its head, bias, scaling and soft-cap are read from it), chunk_rows 0 = auto.
        Equal to `forward(head(hidden), batch)` in value and gradient (tests/interop/test_api.py)."""
        from pipeline.losses.chunked import auto_chunk_rows, chunked_loss, plan_rows
        from pipeline.models import model_vocab_size
        from pipeline.head import head_spec

        cache, target_ids = self._unpack(batch)
        head = head_spec(model, model_vocab_size(model))
        self._check_shapes(head.vocab_size, hidden.shape[0], cache, target_ids)
        cfg, n = self.config, hidden.shape[0]
        alpha = cfg.ce_weight
        chunk = chunk_rows or auto_chunk_rows(head.vocab_size)
        plan = plan_rows(hidden.detach(), head, target_ids, cache, self.settings, self.vocab_size, self.grid_betas,
                         self.latf, self._gate_generator(hidden.device), chunk, groups=self._groups(batch))
        den = plan.denominator
        kd_scale = (1.0 - alpha) / den if den > 0 else 0.0
        loss, _, kd_num = chunked_loss(hidden, head, target_ids, cache, plan, self.settings, self.vocab_size,
                                       alpha / max(n, 1), kd_scale, chunk)
        return self._finish(loss, float(plan.ce_rows.sum()), float(kd_num), den, n, plan.accepted, plan.kept,
                            plan.temps[plan.keep])

    def _finish(self, loss: torch.Tensor, ce_sum: Any, numerator: Any, denominator: float, n: int, accepted: int,
                kept: int, temps: torch.Tensor) -> KDOutput:
        """The metrics of one call (`step_row`: the row `kdcache train` logs, less lr, from the call's sums over
        its n targets) and, in training mode, the call's KD sums towards LATF's step (temps [kept]: the
        temperatures of the kept positions)."""
        metrics = step_row(ce_sum, numerator, denominator, n, alpha=self.config.ce_weight, accepted=accepted,
                           kept=kept, temps=temps, latf=self.latf)
        if self.training:
            self._pending[0] += float(numerator)
            self._pending[1] += denominator
            if self.config.auto_step:
                self.end_step()
        return KDOutput(loss, metrics)

    def end_step(self) -> float:
        """Close one optimizer step: feed LATF the step's kd_loss (sums of the calls since the last
        end_step, as `kdcache train` sums its micro-batches) and return it."""
        num, den = self._pending
        self._pending = [0.0, 0.0]
        kd_loss = num / den if den > 0 else 0.0
        if self.latf is not None:
            if not math.isfinite(kd_loss):
                raise KdError(f"non-finite KD loss ({kd_loss}) at LATF update {self.latf.step + 1}")
            self.latf.update(kd_loss)
        return kd_loss

    # ---- checks -----------------------------------------------------------------------------
    @staticmethod
    def _unpack(batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if isinstance(batch, dict):
            if "cache" not in batch or "target_ids" not in batch:
                raise KdError(f"a KDLoss batch needs 'cache' and 'target_ids' (a KDCollator batch); got keys "
                              f"{sorted(batch)}")
            return batch["cache"], batch["target_ids"]
        if getattr(batch, "cache", None) is None:
            raise KdError("a KDLoss batch needs the cache rows of its targets (a MicroBatch read with a cache)")
        return batch.cache, batch.target_ids

    @staticmethod
    def _groups(batch: Any) -> torch.Tensor | None:
        """The sequence of each target row (tgt_b), which SE-KD selects within; None if the batch lacks it."""
        return batch.get("tgt_b") if isinstance(batch, dict) else getattr(batch, "tgt_b", None)

    def _check(self, logits: torch.Tensor, cache: dict[str, torch.Tensor], target_ids: torch.Tensor) -> None:
        """One-line `KdError`s naming the teacher's V and the cache's K when a batch does not fit."""
        if logits.dim() != 2:
            raise KdError(f"logits must be [N, V] at the target positions (see student_target_logits), "
                          f"got shape {tuple(logits.shape)}")
        self._check_shapes(logits.shape[1], logits.shape[0], cache, target_ids)

    def _check_shapes(self, vs: int, n: int, cache: dict[str, torch.Tensor], target_ids: torch.Tensor) -> None:
        """The checks of `_check` for a student with `vs` ids and n target rows (logits or hidden states)."""
        fields = self.fields
        need = [f for f in fields if f != "target_rank" and f not in cache]
        if need:
            raise KdError(f"the batch's cache rows lack {need}; make the dataset with fields={fields}")
        ids = cache["topk_ids"]
        if ids.dim() != 2 or ids.shape[1] != self.top_k:
            raise KdError(f"the batch holds {tuple(ids.shape)} top-K ids per target, but this KDLoss was built for a "
                          f"cache with K = {self.top_k} (and teacher vocabulary V = {self.vocab_size})")
        if ids.shape[0] != n or target_ids.shape[0] != n:
            raise KdError(f"{n} rows of logits for {ids.shape[0]} cached target positions: pass the student's logits "
                          "at the batch's targets (logits[tgt_b, tgt_t - 1])")
        if vs < self.vocab_size:
            raise KdError(f"the student's logits have {vs} ids but the teacher's vocabulary (the cache's V) has "
                          f"{self.vocab_size}: the student must score every teacher id")
        if n and int(ids.max()) >= self.vocab_size:
            raise KdError(f"the batch holds top-K id {int(ids.max())}, outside the teacher's vocabulary V = "
                          f"{self.vocab_size}: rows from another cache")
        g = cache["tail_log_partition"].shape[-1] if cache["tail_log_partition"].dim() == 2 else -1
        if g != len(self.temperatures):
            raise KdError(f"the batch's tail_log_partition has {g} temperatures, the cache this KDLoss was built "
                          f"for has {len(self.temperatures)}")

    def _gate_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = gate_generator(self.config.seed, self.config.rank, device)
            if self._generator_state is not None:
                self.generator.set_state(self._generator_state)
                self._generator_state = None
        elif self.generator.device.type != torch.device(device).type:
            raise KdError(f"KDLoss was first called on {self.generator.device.type} and now on {device}: its gate "
                          "stream lives on one device (make a new KDLoss, or load its state_dict into one)")
        return self.generator

    # ---- state ------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        gen = self.generator.get_state() if self.generator is not None else self._generator_state
        return {"latf": self.latf.state_dict() if self.latf else None, "gate": gen, "pending": list(self._pending)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.latf is not None:
            if not state.get("latf"):
                raise KdError("this KDLoss uses LATF but the state holds none (saved without latf?)")
            self.latf.load_state_dict(state["latf"])
        if state.get("gate") is not None:
            if self.generator is not None:
                self.generator.set_state(state["gate"])
            else:
                self._generator_state = state["gate"]
        self._pending = list(state.get("pending", [0.0, 0.0]))


def gather_target_logits(logits: torch.Tensor, batch: Any) -> torch.Tensor:
    """Full-sequence logits [B, L, V] (e.g. `model(...).logits`) -> [N, V] at the batch's targets:
    target t of sequence b is predicted from position t - 1."""
    tgt_b, tgt_t = (batch["tgt_b"], batch["tgt_t"]) if isinstance(batch, dict) else (batch.tgt_b, batch.tgt_t)
    return logits[tgt_b, tgt_t - 1]


def student_target_logits(model: Any, batch: Any) -> torch.Tensor:
    """The student's logits [N, Vs] at the batch's targets, applying the output head only there
    (`pipeline.training.student.TargetLogits`, what `kdcache train` does: no [B, L, V] tensor is built).

    Calls the model's submodules directly; under DDP wrap a `TargetLogits(model)` instead, so the
    forward runs through the wrapper."""
    from pipeline.training.student import TargetLogits

    get = (lambda k: batch[k]) if isinstance(batch, dict) else (lambda k: getattr(batch, k))  # noqa: E731
    return TargetLogits(model)(get("input_ids"), get("attention_mask"), get("tgt_b"), get("tgt_t"))
