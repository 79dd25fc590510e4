"""Stage 2: train a student against the cache (or plain cross-entropy without one).

    kdcache train --cache runs/demo/cache --student-config configs/students/tiny.json --out runs/demo/kd

The teacher is never loaded: everything the losses need streams from the cache
(`pipeline.data.stream`). Loss per optimizer step (methods.md §5):

    loss = alpha * ce + (1 - alpha) * kd_loss,   kd_loss = sum w T^2 D / sum w,   ce = sum ce_t / N

with both sums over the whole step, so micro-batching never changes the gradient. The KD
denominator is known only after every micro-batch's forward pass; it is handled exactly:
one micro-batch -> direct; pure KD (alpha = 0) -> backpropagate unnormalised sums and divide the
accumulated gradients once; mixed alpha with accumulation -> a no-grad pre-pass (same RNG
streams) computes the denominator first, costing one extra forward per micro-batch.

OUT holds metrics.jsonl (one row per step, `pipeline.training.metrics.step_row`; mirrored to --report-to trackers),
checkpoints/step_NNNNNN, final/ (`pipeline.training.final`: the model, the student's own tokenizer, its
bos/eos/pad ids in both configs, the model card of `pipeline.training.model_card`), best/ with --eval-every
(`pipeline.training.held_out`) and train_summary.json (tokens seen, step time, throughput of the whole run).
The optimizer and its schedule are in `pipeline.training.optimizer`, what the ranks agree on in
`pipeline.training.dist`.
"""

from __future__ import annotations

import dataclasses

import logging
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from pipeline.losses.adakd import LATF
from pipeline.cache import open_cache
from pipeline.training.checkpoint import (latest_checkpoint, load_state, recover_dir, rng_state, save_checkpoint,
                                         set_rng_state)
from pipeline.config import save_config, to_dict
from pipeline.errors import Interrupted, KdError
from pipeline.training.interrupts import StopRequest
from pipeline.losses.chunked import RowPlan
from pipeline.training.student import StudentObjective
from pipeline.identity import write_json
from pipeline.losses.objective import gate_generator, kd_fields
from pipeline.training.metrics import MetricsLog, check_reporters, step_row
from pipeline.models import load_causal_lm, model_vocab_size, pick_device, set_special_token_ids
from pipeline.ownership import TRAIN, Output, claim
from pipeline.storage import is_url
from pipeline.data.prepare import load_prepared, prepared_meta
from pipeline.data.stream import CacheStream, MicroBatch
from pipeline.training.student import build_student, check_inputs, student_tokenizer
from pipeline.training.config import TrainConfig
from pipeline.training.dist import all_finite, all_sum, any_rank, gather_per_rank, init_dist
from pipeline.training.final import check_push, push_final, save_final
from pipeline.training.inputs import check_cache_serves, check_temperatures, data_path
from pipeline.training.held_out import BEST_DIR, HeldOut
from pipeline.training.optimizer import load_model_and_optimizer, make_optimizer, optimizer_state, planned_steps
from pipeline.training.parallel import full_weights, parallelize
from pipeline.training.state import TrainState, continuing, read_state, refused, write_record
from pipeline.training.summary import SUMMARY_FILENAME, skipped_summary
from pipeline.training.tracking import RunTracker

log = logging.getLogger(__name__)

# Everything `kdcache train` writes in OUT (besides a nested eval/): declared before the run writes, so that
# each (and its NAME.tmp / NAME.old) is the run's own even after a kill -9 (`pipeline.ownership`).
WRITES = ("kdcache_train.json", "config.yaml", "metrics.jsonl", "train_summary.json", "checkpoints", "final", "best",
          "tensorboard", "wandb")


class Trainer:
    """One training run; `run()` trains to the end (or `stop_after`) and returns a summary."""

    def __init__(self, cfg: TrainConfig, workdir: Path | None = None, on_save: Callable[[], None] | None = None):
        """`workdir`: where the run's files are written when it is not --out (a local working copy of an --out
        URL, `pipeline.training.remote`); `on_save`: called on rank 0 after each checkpoint is written."""
        self.cfg = cfg
        if not cfg.out:
            raise KdError("no output directory given (--out DIR)")
        self.out = Path(workdir or cfg.out)
        self.on_save = on_save
        cfg.check_cache_given()
        self.rank, self.world = init_dist()
        check_reporters(cfg.report_to)  # before anything is loaded: a missing tracker is a one-line error
        if cfg.push_to_hub and self.rank == 0:
            check_push(cfg.push_to_hub)
        # Keep this order: it decides which check refuses a run first, and what draws from torch's RNG after
        # build_student seeds it (runs and resumes are compared bitwise with earlier ones).
        self._setup_data()
        self._setup_model()
        self._setup_tracking()
        self._setup_stream()
        self._setup_objective()
        self._setup_parallelism()
        self._setup_optimizer()

    def _setup_data(self) -> None:
        """The cache (if any) and the prepared data: --data, or the data the cache was made from."""
        self.cache = (open_cache(self.cfg.cache, local_cache=self.cfg.local_cache or None,
                                 local_cache_gb=self.cfg.local_cache_gb, prefetch=self.cfg.prefetch_shards)
                      if self.cfg.cache else None)
        self.data_path = data = data_path(self.cfg, self.cache)
        self.pmeta = prepared_meta(data)
        self.ds = load_prepared(data)

    def _setup_model(self) -> None:
        """The device and the student (loaded, or built from its config with cfg.seed), checked against the data."""
        cfg = self.cfg
        self.device = pick_device(cfg.device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" and cfg.dtype in ("auto", "bfloat16") else nullcontext())
        self.model = build_student(cfg.student, cfg.student_config, self.device, cfg.seed)
        check_inputs(self.model, self.pmeta, self.cache, follow=cfg.follow)
        # The student's own tokenizer (refused unless it is the data's) is saved with it, and its bos/eos/pad
        # ids go into config.json and generation_config.json of every checkpoint, best/ and final/.
        self.tokenizer = student_tokenizer(cfg.student, self.pmeta["tokenizer"])
        if self.tokenizer is not None:
            set_special_token_ids(self.model, self.tokenizer)
        self.online = None  # the benchmark's online reference: the teacher run on each micro-batch
        if cfg.online_teacher and cfg.distills:
            from pipeline.training.online import OnlineTeacher

            self.online = OnlineTeacher(cfg.online_teacher, self.device, self.pmeta["tokenizer"])
            if model_vocab_size(self.model) < self.online.vocab_size:
                raise KdError(f"the student has {model_vocab_size(self.model)} output ids but the online teacher's "
                              f"vocabulary has {self.online.vocab_size}")

    def _setup_tracking(self) -> None:
        """What the run tracks besides the weights (`pipeline.training.tracking`): counts, held-out scores, the best."""
        cfg = self.cfg
        held_out = (HeldOut(cfg.eval_data, cfg.eval_cache, cfg.batch_size, self.model, self.pmeta["tokenizer"])
                    if cfg.eval_every and self.rank == 0 else None)
        self.tracker = RunTracker(held_out, cfg.best_metric, cfg.eval_every, cfg.eval_cache)
        self.step = 0

    def _draws(self) -> tuple[int, bool]:
        """(tail draws per row, whether they carry log-probs) of the teacher's rows: none from the online teacher."""
        return (self.cache.tail_samples, self.cache.params.draw_logprobs) if self.cache is not None else (0, False)

    def _setup_stream(self) -> None:
        """The reader of the micro-batches with their cache rows (first: can the cache serve this objective?),
        and the run's length in optimizer steps."""
        cfg = self.cfg
        # --tail auto: sampled when the cache's draws serve the loss (KdOptions.resolved_tail); the online teacher
        # has no tail (K = V), any policy gives the same loss there.
        self.tail = cfg.resolved_tail(*self._draws())
        if cfg.distills and self.cache is not None:
            check_cache_serves(cfg, self.cache)
        fields = kd_fields(self.tail, self.cache.params.draw_logprobs if self.cache is not None else True)
        self.stream = CacheStream(self.ds, self.cache if cfg.distills else None, cfg.batch_size, seed=cfg.seed,
                                  shuffle=cfg.shuffle, threads=cfg.read_threads, rank=self.rank, world=self.world,
                                  fields=fields, batch_tokens=cfg.batch_tokens, follow=cfg.follow,
                                  follow_timeout=cfg.follow_timeout)
        self.total = planned_steps(cfg, self.stream)

    def _setup_objective(self) -> None:
        """LATF, the gate's random stream, the KD settings (their temperatures within the cache's grid), and the
        student with its loss as one module."""
        cfg = self.cfg
        self.latf = (LATF(self.total, warmup_fraction=cfg.latf_warmup, ema_decay=cfg.latf_ema_decay,
                          epsilon=cfg.latf_epsilon, sigma=cfg.latf_sigma, min_ratio=cfg.latf_min_ratio)
                     if cfg.distills and cfg.latf else None)
        self.gen = gate_generator(cfg.seed, self.rank, self.device)
        # a snapshot of the KD options (KdOptions is their one owner), with the tail policy resolved for this cache
        self.kd = cfg.for_cache(*self._draws())
        source = self.cache if self.cache is not None else self.online  # where the teacher's rows come from
        if source is not None:
            self.grid_betas = torch.tensor([1.0 / t for t in source.temperatures], dtype=torch.float32)
            if cfg.distills:
                check_temperatures(cfg, source.temperatures)
        # The student and its loss as one module (pipeline/losses/chunked.py): the loss is computed from the
        # hidden states in row chunks, so no [N, V] logits tensor exists; DDP wraps the whole objective.
        if cfg.activation_checkpointing:  # recompute each layer's activations in backward: memory for time
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.net: torch.nn.Module = StudentObjective(
            self.model, self.kd if cfg.distills else None, source.vocab_size if cfg.distills else None,
            self.grid_betas if cfg.distills else None, self.latf, self.gen, cfg.loss_chunk_rows)

    def _setup_parallelism(self) -> None:
        """FSDP with --fsdp, else DDP around the objective with several ranks (`pipeline.training.parallel`)."""
        self.net, bf16 = parallelize(self.net, self.model, self.device, self.cfg.fsdp, self.cfg.dtype, self.world)
        if bf16:
            self.autocast = nullcontext()  # FSDP's mixed-precision policy already computes in bf16

    def _setup_optimizer(self) -> None:
        # After sharding: FSDP turns the parameters into DTensors, which the optimizer must hold.
        self.optimizer, self.scheduler = make_optimizer(self.model, self.cfg, self.total)

    # ---- one optimizer step ---------------------------------------------------------------
    @property
    def alpha(self) -> float:
        """Weight of cross-entropy in the loss: ce_weight when distilling, 1 otherwise."""
        return self.cfg.ce_weight if self.cfg.distills else 1.0

    def _forward(self, mb: MicroBatch, scales: Callable[[RowPlan], tuple[float, float]] | None) -> tuple[Any, RowPlan, Any]:
        """(loss or None, the micro-batch's row plan, Σ w T² D) of one micro-batch; scales=None: pass 1 only."""
        ctx = nullcontext() if scales is not None else torch.no_grad()
        with ctx, self.autocast:
            loss, plan, _, kd = self.net(mb.input_ids, mb.attention_mask, mb.tgt_b, mb.tgt_t, mb.target_ids,
                                         mb.cache if self.cfg.distills else None, scales)
        return loss, plan, kd

    def train_step(self, mbs: list[MicroBatch], apply: bool = True) -> dict[str, Any]:
        """One optimizer step over micro-batches `mbs`; returns its metrics (computed before the update).

        With apply=False the normalised, unclipped gradients are left in `.grad` and nothing is
        updated (used by the micro-batch split test).
        """
        cfg, world, alpha = self.cfg, self.world, self.alpha
        if self.online is not None:  # the rows a cache would hold, exactly (K = V), computed once per micro-batch
            mbs = [dataclasses.replace(mb, cache=self.online.rows(mb.input_ids, mb.tgt_b, mb.tgt_t, mb.target_ids))
                   for mb in mbs]
        n_total = all_sum([float(sum(mb.num_targets for mb in mbs))], world, self.device)[0]
        # Σw of the step before any backward pass: needed with mixed alpha over several micro-batches.
        w_total = self._prepass_weight(mbs) if cfg.distills and 0.0 < alpha < 1.0 and len(mbs) > 1 else None
        scales = _Scales(alpha, world, n_total, cfg.distills, len(mbs), w_total, self.device)
        ce_sum = num_sum = w_sum = 0.0
        accepted = kept = 0
        temps = []
        self.optimizer.zero_grad(set_to_none=True)
        for i, mb in enumerate(mbs):
            sync = i == len(mbs) - 1 or world == 1
            ctx = nullcontext() if sync or not hasattr(self.net, "no_sync") else self.net.no_sync()
            with ctx:
                # Even when nothing is kept the loss is a (zero) function of the parameters: backward runs,
                # so DDP ranks stay in step.
                loss, plan, kd = self._forward(mb, scales)
                loss.backward()
            ce_sum += float(plan.ce_rows.sum())
            if cfg.distills:
                num_sum += float(kd)
                w_sum += plan.denominator
                accepted += plan.accepted
                kept += plan.kept
                temps.append(plan.temps[plan.keep].detach().float().cpu())
        ce_sum, num_sum, w_sum, acc_sum, kept_sum = all_sum([ce_sum, num_sum, w_sum, accepted, kept], world, self.device)
        if cfg.distills and scales.w_total is None and alpha == 0.0:  # unnormalised sums: divide the gradients once
            _scale_grads(self.model.parameters(), (world / w_sum) if w_sum > 0 else 0.0)
        if not math.isfinite(ce_sum) or not math.isfinite(num_sum):
            what = "KD loss" if not math.isfinite(num_sum) else "cross-entropy"
            raise _non_finite(what, num_sum if what == "KD loss" else ce_sum, self.step, mbs, self.stream, self.out)
        if not apply:
            return {}
        # The norm is computed whether or not it clips: a non-finite gradient must stop the run before
        # the optimizer writes it into the weights (and before anything is saved from them).
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or math.inf)
        norm = float(norm.full_tensor()) if hasattr(norm, "full_tensor") else float(norm)  # a DTensor under FSDP
        if not math.isfinite(norm):
            raise _non_finite("gradient norm", norm, self.step, mbs, self.stream, self.out)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        row = step_row(ce_sum, num_sum, w_sum, n_total, alpha=alpha, distills=cfg.distills, lr=lr, accepted=acc_sum,
                       kept=kept_sum, temps=torch.cat(temps) if temps else None, latf=self.latf)
        if self.latf is not None:  # after the row: it reports the focus ratio this step used
            self.latf.update(row["kd_loss"])
        return row

    def _prepass_weight(self, mbs: list[MicroBatch]) -> float:
        """Sum of KD weights over the step, from no-grad forwards that replay the same RNG draws."""
        total = 0.0
        with _replayed_draws(self.gen, self.device):
            for mb in mbs:
                total += self._forward(mb, None)[1].denominator
        return all_sum([total], self.world, self.device)[0]

    # ---- the run --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The checkpoint's trainer state. With several ranks every rank must call this (`_checkpoint` does):
        each rank's RNG states are gathered, and under FSDP the optimizer's state."""
        optim = optimizer_state(self.model, self.optimizer, self.cfg.fsdp)
        rng = rng_state(self.gen)
        if self.world > 1:  # every rank's own streams (the gate draws per rank; dropout too): a collective
            rng = {"per_rank": gather_per_rank(rng, self.world)}
        return {"step": self.step, "optimizer": optim, "scheduler": self.scheduler.state_dict(),
                "rng": rng, "reader": self.stream.state_dict(),
                "latf": self.latf.state_dict() if self.latf else None, "total_steps": self.total,
                **self.tracker.state_dict()}

    def resume_from(self, path: Path) -> None:
        st = load_state(path)
        if st["total_steps"] != self.total:
            raise KdError(f"checkpoint {path.name} plans {st['total_steps']} steps, this run {self.total}: "
                          "resume with the same --max-steps/--epochs")
        weights = load_causal_lm(str(path), torch.device("cpu") if self.cfg.fsdp else self.device,
                                 torch.float32).state_dict()
        load_model_and_optimizer(self.model, self.optimizer, weights, st["optimizer"], self.cfg.fsdp)
        self.scheduler.load_state_dict(st["scheduler"])
        self.stream.load_state_dict(st["reader"])
        if self.latf and st["latf"]:
            self.latf.load_state_dict(st["latf"])
        set_rng_state(_own_rng(st["rng"], self.rank, self.world, path), self.gen)
        self.step = st["step"]
        self.tracker.load_state_dict(st)
        recover_dir(self.out / BEST_DIR)

    def run(self, progress: bool = False, echo: Callable[[str], None] | None = None,
            state: TrainState | None = None, own: Output | None = None) -> dict[str, Any]:
        """Train to the end (or `stop_after`); returns a summary.

        What OUT already holds decides how (`pipeline.training.state`): the same settings continue from
        the newest checkpoint, so re-running the same command after an interruption continues;
        other settings need --overwrite (start over) or --resume. `echo` gets the line saying which.
        `own`: rank 0's claim on OUT (`pipeline.ownership`: the lock, and its files checked to be train's);
        taken here when not given.
        """
        if self.rank == 0 and own is None:
            with claim(self.out, TRAIN) as own:
                return self.run(progress, echo, state, own)
        cfg = self.cfg
        say = echo or (lambda m: log.info("train: %s", m))
        if self.rank != 0:
            say = lambda m: None  # noqa: E731
        state = state or read_state(self.out, cfg)
        if state.kind == "final" and not (cfg.overwrite or cfg.resume):
            return skipped_summary(self.out, state)  # summary_line says so
        ckpt, line = _start(self.out, cfg, state, self.total)
        if self.rank == 0:
            self._prepare_out(fresh=ckpt is None, own=own)
        if ckpt is not None:
            self.resume_from(ckpt)
        if line:
            say(line)
        metrics = (MetricsLog(self.out, self.step if ckpt is not None else None, cfg.report_to, run_config=to_dict(cfg),
                              bar=(self.total, self.step) if progress else None) if self.rank == 0 else None)
        stop_at = min(self.total, self.step + cfg.stop_after) if cfg.stop_after else self.total
        it = iter(self.stream)
        last: dict[str, Any] = {}
        stop = StopRequest.install()  # Ctrl-C ends the current step, then checkpoints (see interrupts.py)
        try:
            while self.step < stop_at:
                t0 = time.perf_counter()
                mbs = [next(it).to(self.device) for _ in range(cfg.grad_accum)]
                row = self.train_step(mbs)
                self.step += 1
                ntok = sum(int(mb.attention_mask.sum()) for mb in mbs) * self.world
                dt = time.perf_counter() - t0
                self.tracker.add_step(ntok, dt)
                row = {"step": self.step, **row, "tokens_per_s": ntok / max(dt, 1e-9),
                       "tokens_seen": self.tracker.tokens_seen}
                if self.tracker.due(self.step, self.total):
                    row.update(self.tracker.evaluate(self.out, self.model, self.tokenizer, self.device, self.autocast,
                                                     self.step))
                last = row
                if metrics:
                    metrics.write(row)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < stop_at:
                    self._checkpoint()
                if any_rank(stop.requested, self.world, self.device):  # ranks must stop at the same step
                    break
        except KeyboardInterrupt:
            # A second Ctrl-C, or one outside the main thread: it may have landed inside the optimizer
            # step, so the newest complete checkpoint is where the run continues from.
            raise Interrupted(_interrupted(self.out, self.step, f"interrupted during step {self.step + 1} of "
                                                                f"{self.total}")) from None
        finally:
            stop.restore()
            if metrics:
                metrics.close()
            if self.cache is not None and self.cache.mirror is not None:
                self.cache.mirror.close(wait=False)  # queued prefetches cancelled: the process exits without them
        interrupted = stop.requested and self.step < stop_at
        # Weights gone non-finite must not become the checkpoint a re-run continues from.
        keep = not interrupted or all_finite(self.model.parameters(), self.world, self.device)
        if keep:
            weights = self._checkpoint()
            if self.step >= self.total and self.rank == 0:
                save_final(self.out, cfg, self.model, self.tokenizer, steps=self.step,
                           tokens_seen=self.tracker.tokens_seen, data_path=self.data_path, prepared_meta=self.pmeta,
                           cache=self.cache, held_out_last=self.tracker.held_out_last, weights=weights)
        if interrupted:
            raise Interrupted(_stopped(self.out, self.step, self.total, checkpointed=keep))
        summary = {"out": str(self.cfg.out), "steps": self.step, "total_steps": self.total,
                   "finished": self.step >= self.total, "last": last, **self.tracker.totals()}
        if cfg.distills:
            summary["tail"] = self.tail  # the policy --tail auto resolved to (the report names the method with it)
        if self.rank == 0:
            write_json(self.out / SUMMARY_FILENAME, summary)  # the report's throughput, among others
            if summary["finished"] and cfg.push_to_hub:
                summary["pushed"] = push_final(self.out, cfg.push_to_hub)
        return summary

    def _checkpoint(self) -> dict[str, torch.Tensor] | None:
        """Write checkpoint `step` (rank 0). Under FSDP every rank gathers the full states first (collective);
        returns the full weights then, for `final/`."""
        weights = full_weights(self.model, self.cfg.fsdp)
        state = self.state() if (self.world > 1 or self.rank == 0) else None  # collective with several ranks
        if self.rank == 0:
            save_checkpoint(self.out, self.step, self.model, state, state_dict=weights)
            if self.on_save is not None:
                self.on_save()
        return weights

    def _prepare_out(self, fresh: bool, own: Output | None = None) -> None:
        """Make OUT and record the run's inputs. A fresh start removes only what an earlier `kdcache train`
        wrote there (its manifest; `claim` refused anything else before); everything the run writes from now
        on is declared first, so a kill -9 leaves it train's own. `own`: the run's claim on OUT (without one,
        one is held for this call only: a caller driving steps itself, tests/training/fsdp_worker.py)."""
        if own is None:
            with claim(self.out, TRAIN) as own:
                return self._prepare_out(fresh, own)
        if fresh:
            own.remove_owned()
        own.writing(*WRITES)
        self.out.mkdir(parents=True, exist_ok=True)
        write_record(self.out, self.cfg)  # first: a directory without it holds nothing of ours but leftovers
        save_config(self.cfg, self.out / "config.yaml")


def _start(out: Path, cfg: TrainConfig, state: TrainState, total: int) -> tuple[Path | None, str | None]:
    """How a run starts from what OUT holds (`pipeline.training.state`): (the checkpoint it continues from,
    None for a fresh start; the line saying so, if any). Other settings need --overwrite or --resume."""
    if state.kind == "changed" and not (cfg.overwrite or cfg.resume):
        raise refused(cfg.out, state)
    continues = cfg.resume or (state.kind == "partial" and not cfg.overwrite)
    ckpt = latest_checkpoint(out) if continues else None
    if ckpt is not None:
        return ckpt, continuing(state, total) + (f" ({state.why()}, continuing as --resume asks)"
                                                 if state.kind == "changed" else "")
    if state.kind == "changed":
        return None, f"{state.why()}: retraining from scratch"
    if state.kind in ("partial", "final"):  # --overwrite, or a run killed before its first checkpoint
        return None, ("--overwrite: retraining from scratch" if cfg.overwrite
                      else continuing(replace(state, checkpoint_step=None), total))
    return None, None


class _Scales:
    """(CE scale, KD scale) of each micro-batch's sums in one step, called between its two passes: both sums
    over the whole step, so micro-batching never changes the gradient. DDP averages gradients over ranks, so
    both are multiplied by `world`: the result is the global sum over the global normaliser. w_total is the
    step's Σw: from the pre-pass, or (one micro-batch) from its own plan; with alpha = 0 and accumulation it stays
    None: the KD sums are backpropagated unnormalised and the gradients divided once after the loop."""

    def __init__(self, alpha: float, world: int, n_total: float, distills: bool, micro_batches: int,
                 w_total: float | None, device: torch.device):
        self.alpha, self.world, self.n_total, self.distills = alpha, world, n_total, distills
        self.micro_batches, self.w_total, self.device = micro_batches, w_total, device

    def __call__(self, plan: RowPlan) -> tuple[float, float]:
        alpha, world = self.alpha, self.world
        ce_scale = alpha * world / self.n_total if alpha > 0.0 else 0.0
        if not self.distills or alpha >= 1.0:
            return ce_scale, 0.0
        if self.micro_batches == 1:
            self.w_total = all_sum([plan.denominator], world, self.device)[0]
        if self.w_total is not None:
            return ce_scale, ((1 - alpha) * world / self.w_total) if self.w_total > 0 else 0.0
        return ce_scale, 1.0  # alpha = 0 with accumulation: unnormalised now, divided once after the loop


def _scale_grads(params: Iterable[torch.Tensor], scale: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)


@contextmanager
def _replayed_draws(gen: torch.Generator, device: torch.device) -> Iterator[None]:
    """Run the block, then put torch's (and CUDA's) RNG and the gate's generator back: the next passes draw the same."""
    cpu, gate = torch.get_rng_state(), gen.get_state()
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    yield
    torch.set_rng_state(cpu)
    gen.set_state(gate)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _own_rng(rng: dict[str, Any], rank: int, world: int, path: Path) -> dict[str, Any]:
    """This rank's RNG states from checkpoint `path`'s (several ranks store theirs per rank)."""
    if "per_rank" not in rng:
        return rng
    if len(rng["per_rank"]) != world:
        raise KdError(f"checkpoint {path.name} was made by {len(rng['per_rank'])} ranks, this run has "
                      f"{world}: resume with the same number of processes")
    return rng["per_rank"][rank]


def _interrupted(out: Path, step: int, where: str) -> str:
    """The interrupt message when step `step` is not checkpointed: where the re-run continues."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return f"{where}; no checkpoint yet: re-run the same command to start again from step 0"
    c = int(ckpt.name.split("_")[1])
    return (f"{where}; the newest checkpoint is step {c}: re-run the same command to continue from it "
            f"({step - c} step(s) redone)")


def _stopped(out: Path, step: int, total: int, checkpointed: bool) -> str:
    """The message of a run stopped by Ctrl-C after step `step`: checkpointed there, or not (weights not finite)."""
    if checkpointed:
        return (f"interrupted at step {step} of {total}; saved a checkpoint there: re-run the same command to "
                "continue (no steps redone)")
    return _interrupted(out, step, f"interrupted at step {step} of {total}; its weights are not finite, so it was "
                                   "not checkpointed")


def _non_finite(what: str, value: float, step: int, mbs: list[MicroBatch], stream: CacheStream,
                out: Path) -> KdError:
    """The error that stops the run in the step after `step`, naming the rows it came from (nothing is saved)."""
    where = _where(sorted(e for mb in mbs for e in mb.examples), stream)
    last = latest_checkpoint(out)
    return KdError(f"step {step + 1}: non-finite {what} ({value}) from {where}; stopped without saving "
                   f"(last good checkpoint: {last.name if last else 'none'})")


def _where(examples: list[int], stream: CacheStream) -> str:
    """Where rows came from: their examples, and their cache rows when `stream` reads a cache."""
    where = f"examples {_ranges(examples)}"
    if stream.row_start is not None:
        rows = sorted((int(stream.row_start[e]), int(stream.row_start[e] + stream.row_count[e])) for e in examples)
        where = f"cache rows {', '.join(f'{a}-{b - 1}' for a, b in rows[:6])}{' ...' if len(rows) > 6 else ''} ({where})"
    return where


def _ranges(ids: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (the first few runs)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:6])
    return text + (" ..." if len(runs) > 6 else "")


def train(cfg: TrainConfig, progress: bool = False, echo: Callable[[str], None] | None = None,
          retrain_if_changed: bool = False) -> dict[str, Any]:
    """Train a student per `cfg`; returns a summary dict (`skipped` when OUT/final is already done).

    A finished run is recognised before the model and data are loaded, so re-running a finished
    command costs nothing (with --push-to-hub it pushes final/: the way to retry a failed upload).
    `retrain_if_changed`: a run made with other settings or inputs is retrained, not refused (`kdcache run`,
    which owns its students' directories).
    """
    if not cfg.out:
        raise KdError("no output directory given (--out DIR)")
    if is_url(cfg.out):
        from pipeline.training.remote import train_at_url

        return train_at_url(cfg, WRITES, lambda local, state, own, on_save: Trainer(
            replace(cfg, overwrite=True) if retrain_if_changed and state.kind == "changed" else cfg, local,
            on_save).run(progress=progress, echo=echo, state=state, own=own))
    # Rank 0 holds OUT (the lock; every file in it checked to be train's) before anything in it is read.
    with claim(cfg.out, TRAIN) if int(os.environ.get("RANK", "0")) == 0 else nullcontext(None) as own:
        state = read_state(Path(cfg.out), cfg)
        if retrain_if_changed and state.kind == "changed":
            cfg = replace(cfg, overwrite=True)
        if state.kind == "final" and not (cfg.overwrite or cfg.resume):
            summary = skipped_summary(Path(cfg.out), state)
            if cfg.push_to_hub:
                check_push(cfg.push_to_hub)
                summary["pushed"] = push_final(Path(cfg.out), cfg.push_to_hub)
            return summary
        return Trainer(cfg).run(progress=progress, echo=echo, state=state, own=own)
