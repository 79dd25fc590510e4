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

OUT holds metrics.jsonl (one row per step; `pipeline.training.metrics` mirrors it to --report-to trackers),
checkpoints/step_NNNNNN, final/ (the model, the student's own tokenizer, its bos/eos/pad ids in
both configs, the model card of `pipeline.training.model_card`), best/ with --eval-every
(`pipeline.training.held_out`) and train_summary.json (tokens seen, step time, throughput of the whole run).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.losses.adakd import LATF
from pipeline.cache import open_cache
from pipeline.training.checkpoint import (latest_checkpoint, load_state, recover_dir, replace_dir, rng_state, save_checkpoint,
                                 set_rng_state)
from pipeline.config import save_config, to_dict
from pipeline.errors import Interrupted, KdError
from pipeline.training.interrupts import StopRequest
from pipeline.losses.chunked import RowPlan
from pipeline.training.student import StudentObjective
from pipeline.identity import write_json
from pipeline.losses.objective import gate_generator
from pipeline.training.metrics import MetricsLog, check_reporters
from pipeline.models import pick_device, set_special_token_ids
from pipeline.ownership import TRAIN, remove_owned
from pipeline.data.prepare import load_prepared, prepared_meta
from pipeline.data.stream import CacheStream, MicroBatch
from pipeline.training.student import build_student, check_inputs, student_tokenizer
from pipeline.training.config import TrainConfig
from pipeline.training.held_out import BEST_DIR, Best, HeldOut, write_best
from pipeline.training.state import (IGNORED_KEYS, TrainState, continuing, read_state, refused, settings_digest,
                                  train_inputs, write_record)

log = logging.getLogger(__name__)


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Multiplier of cfg.lr at step s: linear warm-up, then constant / linear / cosine to min_lr_ratio."""

    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
        decay = 1.0 - frac if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    return f


SUMMARY_FILENAME = "train_summary.json"  # the end-of-run summary, read by `kdcache report`


def _dist() -> tuple[int, int]:
    """(rank, world) under torchrun, initialising the process group once."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _all_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class Trainer:
    """One training run; `run()` trains to the end (or `stop_after`) and returns a summary."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if not cfg.out:
            raise KdError("no output directory given (--out DIR)")
        self.out = Path(cfg.out)
        self.rank, self.world = _dist()
        check_reporters(cfg.report_to)  # before anything is loaded: a missing tracker is a one-line error
        if cfg.push_to_hub and self.rank == 0:
            from pipeline.training.hub import check_can_push

            check_can_push(cfg.push_to_hub)
        self.cache = open_cache(cfg.cache) if cfg.cache else None
        data = cfg.data or (self.cache.meta["data"]["path"] if self.cache else "")
        if not data:
            raise KdError("no training data: pass --data DIR (a `kdcache prepare` output)")
        if not cfg.data and not Path(data).is_dir():
            raise KdError(f"the cache's prepared data {data} is gone; pass --data DIR with the same prepared data")
        self.data_path = data
        self.pmeta = prepared_meta(data)
        self.ds = load_prepared(data)
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
        self.held_out = (HeldOut(cfg.eval_data, cfg.eval_cache, cfg.batch_size, self.model, self.pmeta["tokenizer"])
                         if cfg.eval_every and self.rank == 0 else None)
        self.best = Best(cfg.best_metric)
        self.held_out_last: dict[str, Any] | None = None  # the latest held-out figures, for the model card
        self.tokens_seen, self.train_seconds, self.eval_seconds = 0, 0.0, 0.0  # over the whole run, resumes included
        if cfg.distills and cfg.gate == "topk" and cfg.gate_k > self.cache.k:
            raise KdError(f"gate_k {cfg.gate_k} exceeds the cache's K = {self.cache.k}: the gate can only verify "
                          f"against cached ids (use --gate-k <= {self.cache.k} or a cache with a larger --top-k)")
        if cfg.distills and cfg.tail == "sampled" and not self.cache.tail_samples:
            raise KdError(f"tail 'sampled' needs a cache with tail samples; {cfg.cache} has none "
                          "(`kdcache teacher --tail-samples S`)")
        from pipeline.losses.objective import KD_FIELDS

        fields = KD_FIELDS + (("tail_ids", "tail_counts") if cfg.tail == "sampled" else ())
        self.stream = CacheStream(self.ds, self.cache if cfg.distills else None, cfg.batch_size, seed=cfg.seed,
                                  shuffle=cfg.shuffle, threads=cfg.read_threads, rank=self.rank, world=self.world,
                                  fields=fields, batch_tokens=cfg.batch_tokens, follow=cfg.follow,
                                  follow_timeout=cfg.follow_timeout)
        if cfg.max_steps:
            self.total = cfg.max_steps
        else:
            epochs = cfg.epochs or 1.0
            per_epoch = [self.stream.batches_in_epoch(e) for e in range(math.ceil(epochs))]
            micro = sum(per_epoch[:-1]) + per_epoch[-1] * (epochs - (len(per_epoch) - 1))
            self.total = max(1, int(micro // cfg.grad_accum))
        self.latf = (LATF(self.total, warmup_fraction=cfg.latf_warmup, ema_decay=cfg.latf_ema_decay,
                          epsilon=cfg.latf_epsilon, sigma=cfg.latf_sigma, min_ratio=cfg.latf_min_ratio)
                     if cfg.distills and cfg.latf else None)
        self.gen = gate_generator(cfg.seed, self.rank, self.device)
        self.kd = cfg.kd_settings()
        if self.cache is not None:
            from pipeline.losses.temperature import check_temperature_range

            self.grid_betas = torch.tensor([1.0 / t for t in self.cache.temperatures], dtype=torch.float32)
            lo, hi = (cfg.temperature * math.exp(-cfg.idts_c), cfg.temperature * math.exp(cfg.idts_c)) \
                if cfg.idts else (cfg.temperature, cfg.temperature)
            if cfg.distills and not (lo == hi == 1.0):
                try:
                    check_temperature_range([lo, hi], self.cache.temperatures)
                except ValueError as e:
                    raise KdError(f"{e}; cache the teacher with a wider --temperatures grid") from None
        self.step = 0
        # The student and its loss as one module (pipeline/losses/chunked.py): the loss is computed from the
        # hidden states in row chunks, so no [N, V] logits tensor exists; DDP wraps the whole objective.
        if cfg.activation_checkpointing:  # recompute each layer's activations in backward: memory for time
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.net: torch.nn.Module = StudentObjective(
            self.model, self.kd if cfg.distills else None, self.cache.vocab_size if cfg.distills else None,
            self.grid_betas if cfg.distills else None, self.latf, self.gen, cfg.loss_chunk_rows)
        if cfg.fsdp:  # pipeline/training/fsdp.py: layers and the root sharded over the ranks; bf16 compute on CUDA
            import pipeline.training.fsdp as fsdp

            bf16 = self.device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")
            fsdp.shard(self.net, self.model, self.device, bf16)
            if bf16:
                self.autocast = nullcontext()  # FSDP's mixed-precision policy already computes in bf16
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # After sharding: FSDP turns the parameters into DTensors, which the optimizer must hold.
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total))

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
        n_total = _all_sum([float(sum(mb.num_targets for mb in mbs))], world, self.device)[0]
        w_total = None
        if cfg.distills and 0.0 < alpha < 1.0 and len(mbs) > 1:
            w_total = self._prepass_weight(mbs)
        ce_sum = num_sum = w_sum = 0.0
        accepted = kept = 0
        temps = []

        def scales(plan: RowPlan) -> tuple[float, float]:
            """(CE scale, KD scale) of this micro-batch's sums. DDP averages gradients over ranks, so both are
            multiplied by `world`: the result is the global sum over the global normaliser."""
            nonlocal w_total
            ce_scale = alpha * world / n_total if alpha > 0.0 else 0.0
            if not cfg.distills or alpha >= 1.0:
                return ce_scale, 0.0
            if len(mbs) == 1:
                w_total = _all_sum([plan.denominator], world, self.device)[0]
            if w_total is not None:
                return ce_scale, ((1 - alpha) * world / w_total) if w_total > 0 else 0.0
            return ce_scale, 1.0  # alpha = 0 with accumulation: unnormalised now, divided once after the loop

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
        ce_sum, num_sum, w_sum, acc_sum, kept_sum = _all_sum([ce_sum, num_sum, w_sum, accepted, kept], world, self.device)
        if cfg.distills and w_total is None and alpha == 0.0:
            scale = (world / w_sum) if w_sum > 0 else 0.0
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        if not math.isfinite(ce_sum) or not math.isfinite(num_sum):
            what = "KD loss" if not math.isfinite(num_sum) else "cross-entropy"
            self._stop_non_finite(what, num_sum if what == "KD loss" else ce_sum, mbs)
        if not apply:
            return {}
        # The norm is computed whether or not it clips: a non-finite gradient must stop the run before
        # the optimizer writes it into the weights (and before anything is saved from them).
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or math.inf)
        norm = float(norm.full_tensor()) if hasattr(norm, "full_tensor") else float(norm)  # a DTensor under FSDP
        if not math.isfinite(norm):
            self._stop_non_finite("gradient norm", norm, mbs)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        ce_loss = ce_sum / n_total
        kd_loss = num_sum / w_sum if w_sum > 0 else 0.0
        row = {"loss": alpha * ce_loss + (1 - alpha) * kd_loss if cfg.distills else ce_loss,
               "kd_loss": kd_loss, "ce_loss": ce_loss, "lr": lr}
        if cfg.distills:
            t = torch.cat(temps) if temps else torch.zeros(0)
            row.update({"tar": acc_sum / n_total, "focus_ratio": self.latf.ratio if self.latf else 1.0,
                        "temp_mean": float(t.mean()) if t.numel() else None,
                        "temp_min": float(t.min()) if t.numel() else None,
                        "temp_max": float(t.max()) if t.numel() else None, "kept_fraction": kept_sum / n_total})
            if self.latf is not None:
                self.latf.update(kd_loss)
        return row

    def _stop_non_finite(self, what: str, value: float, mbs: list[MicroBatch]) -> None:
        """Stop the run with one line naming the step and the rows it came from (nothing is saved)."""
        ex = sorted(e for mb in mbs for e in mb.examples)
        where = f"examples {_ranges(ex)}"
        if self.cache is not None and self.stream.row_start is not None:
            rows = sorted((int(self.stream.row_start[e]), int(self.stream.row_start[e] + self.stream.row_count[e]))
                          for e in ex)
            where = f"cache rows {', '.join(f'{a}-{b - 1}' for a, b in rows[:6])}{' ...' if len(rows) > 6 else ''} ({where})"
        last = latest_checkpoint(self.out)
        raise KdError(f"step {self.step + 1}: non-finite {what} ({value}) from {where}; stopped without saving "
                      f"(last good checkpoint: {last.name if last else 'none'})")

    def _prepass_weight(self, mbs: list[MicroBatch]) -> float:
        """Sum of KD weights over the step, from no-grad forwards that replay the same RNG draws."""
        cpu, gate = torch.get_rng_state(), self.gen.get_state()
        cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        total = 0.0
        for mb in mbs:
            total += self._forward(mb, None)[1].denominator
        torch.set_rng_state(cpu)
        self.gen.set_state(gate)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        return _all_sum([total], self.world, self.device)[0]

    # ---- the run --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The checkpoint's trainer state. With several ranks every rank must call this (`_checkpoint` does):
        each rank's RNG states are gathered, and under FSDP the optimizer's state."""
        if self.cfg.fsdp:
            from pipeline.training.fsdp import full_optimizer_state

            optim = full_optimizer_state(self.model, self.optimizer)
        else:
            optim = self.optimizer.state_dict()
        rng = rng_state(self.gen)
        if self.world > 1:  # every rank's own streams (the gate draws per rank; dropout too): a collective
            import torch.distributed as dist

            per_rank: list[Any] = [None] * self.world
            dist.all_gather_object(per_rank, rng)
            rng = {"per_rank": per_rank}
        return {"step": self.step, "optimizer": optim, "scheduler": self.scheduler.state_dict(),
                "rng": rng, "reader": self.stream.state_dict(),
                "latf": self.latf.state_dict() if self.latf else None, "total_steps": self.total,
                "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                "best": self.best.state_dict(), "held_out_last": self.held_out_last}

    def resume_from(self, path: Path) -> None:
        from pipeline.models import load_causal_lm

        st = load_state(path)
        if st["total_steps"] != self.total:
            raise KdError(f"checkpoint {path.name} plans {st['total_steps']} steps, this run {self.total}: "
                          "resume with the same --max-steps/--epochs")
        weights = load_causal_lm(str(path), torch.device("cpu") if self.cfg.fsdp else self.device,
                                 torch.float32).state_dict()
        if self.cfg.fsdp:  # every rank reads the full states and keeps its shards
            from pipeline.training.fsdp import load_full_states

            load_full_states(self.model, self.optimizer, weights, st["optimizer"])
        else:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.stream.load_state_dict(st["reader"])
        if self.latf and st["latf"]:
            self.latf.load_state_dict(st["latf"])
        rng = st["rng"]
        if "per_rank" in rng:
            if len(rng["per_rank"]) != self.world:
                raise KdError(f"checkpoint {path.name} was made by {len(rng['per_rank'])} ranks, this run has "
                              f"{self.world}: resume with the same number of processes")
            rng = rng["per_rank"][self.rank]
        set_rng_state(rng, self.gen)
        self.step = st["step"]
        # Checkpoints written before these were recorded resume their counts from 0.
        self.tokens_seen = int(st.get("tokens_seen", 0))
        self.train_seconds, self.eval_seconds = float(st.get("train_seconds", 0.0)), float(st.get("eval_seconds", 0.0))
        self.best.load_state_dict(st.get("best"))
        self.held_out_last = st.get("held_out_last")
        recover_dir(self.out / BEST_DIR)

    def run(self, progress: bool = False, echo: Callable[[str], None] | None = None,
            state: TrainState | None = None) -> dict[str, Any]:
        """Train to the end (or `stop_after`); returns a summary.

        What OUT already holds decides how (`pipeline.training.state`): the same settings continue from
        the newest checkpoint, so re-running the same command after an interruption continues;
        other settings need --overwrite (start over) or --resume. `echo` gets the line saying which.
        """
        cfg = self.cfg
        say = echo or (lambda m: log.info("train: %s", m))
        if self.rank != 0:
            say = lambda m: None  # noqa: E731
        state = state or read_state(self.out, cfg)
        if state.kind == "final" and not (cfg.overwrite or cfg.resume):
            return skipped_summary(self.out, state)  # summary_line says so
        if state.kind == "changed" and not (cfg.overwrite or cfg.resume):
            raise refused(self.out, state)
        continues = cfg.resume or (state.kind == "partial" and not cfg.overwrite)
        ckpt = latest_checkpoint(self.out) if continues else None
        if self.rank == 0:
            self._prepare_out(fresh=ckpt is None)
        if ckpt is not None:
            self.resume_from(ckpt)
            say(continuing(state, self.total) + (f" ({state.why()}, continuing as --resume asks)"
                                                  if state.kind == "changed" else ""))
        elif state.kind == "changed":
            say(f"{state.why()}: retraining from scratch")
        elif state.kind in ("partial", "final"):  # --overwrite, or a run killed before its first checkpoint
            say("--overwrite: retraining from scratch" if cfg.overwrite
                else continuing(replace(state, checkpoint_step=None), self.total))
        resume_step = self.step if ckpt is not None else None
        metrics = (MetricsLog(self.out, resume_step, cfg.report_to, run_config=to_dict(cfg))
                   if self.rank == 0 else None)
        stop_at = min(self.total, self.step + cfg.stop_after) if cfg.stop_after else self.total
        bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step", leave=False)
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
                self.tokens_seen += ntok
                self.train_seconds += dt
                row = {"step": self.step, **row, "tokens_per_s": ntok / max(dt, 1e-9), "tokens_seen": self.tokens_seen}
                if self.held_out is not None and (self.step % cfg.eval_every == 0 or self.step == self.total):
                    row.update(self._evaluate_held_out())
                last = row
                if metrics:
                    metrics.write(row)
                if bar is not None:
                    post = {"loss": f"{row['loss']:.3f}"}
                    if "tar" in row:
                        post["tar"] = f"{row['tar']:.2f}"
                    post["tok/s"] = f"{row['tokens_per_s']:.0f}"
                    bar.set_postfix(post)
                    bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < stop_at:
                    self._checkpoint()
                if self._stop_requested(stop):
                    break
        except KeyboardInterrupt:
            # A second Ctrl-C, or one outside the main thread: it may have landed inside the optimizer
            # step, so the newest complete checkpoint is where the run continues from.
            raise Interrupted(self._interrupted(f"interrupted during step {self.step + 1} of {self.total}")) from None
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
            if metrics:
                metrics.close()
        interrupted = stop.requested and self.step < stop_at
        # Weights gone non-finite must not become the checkpoint a re-run continues from.
        keep = not interrupted or self._weights_finite()
        if keep:
            weights = self._checkpoint()
            if self.step >= self.total and self.rank == 0:
                self._save_final(weights)
        if interrupted and keep:
            raise Interrupted(f"interrupted at step {self.step} of {self.total}; saved a checkpoint there: re-run the "
                              "same command to continue (no steps redone)")
        if interrupted:
            raise Interrupted(self._interrupted(f"interrupted at step {self.step} of {self.total}; its weights are "
                                                "not finite, so it was not checkpointed"))
        summary = {"out": str(self.out), "steps": self.step, "total_steps": self.total,
                   "finished": self.step >= self.total, "last": last, **self._totals()}
        if self.rank == 0:
            write_json(self.out / SUMMARY_FILENAME, summary)  # the report's throughput, among others
            if summary["finished"] and cfg.push_to_hub:
                summary["pushed"] = push_final(self.out, cfg.push_to_hub)
        return summary

    def _weights_finite(self) -> bool:
        """Whether every parameter is finite, on every rank (each checks its own shard under FSDP; all agree)."""
        local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                    for p in self.model.parameters())
        return _all_sum([0.0 if local else 1.0], self.world, self.device)[0] == 0.0

    def _checkpoint(self) -> dict[str, torch.Tensor] | None:
        """Write checkpoint `step` (rank 0). Under FSDP every rank gathers the full states first (collective);
        returns the full weights then, for `final/`."""
        weights = None
        if self.cfg.fsdp:
            from pipeline.training.fsdp import full_model_state

            weights = full_model_state(self.model)
        state = self.state() if (self.world > 1 or self.rank == 0) else None  # collective with several ranks
        if self.rank == 0:
            save_checkpoint(self.out, self.step, self.model, state, state_dict=weights)
        return weights

    def _totals(self) -> dict[str, Any]:
        """Throughput and counts over the whole run (resumes included): total tokens / total step time."""
        return {"tokens_seen": self.tokens_seen, "seconds": self.train_seconds,
                "tokens_per_s": self.tokens_seen / self.train_seconds if self.train_seconds > 0 else 0.0,
                "eval_seconds": self.eval_seconds, "best": self.best.state_dict() if self.held_out else None}

    def _evaluate_held_out(self) -> dict[str, Any]:
        """Score the held-out split now; keep OUT/best when `best_metric` improved. Returns the row's eval_ keys."""
        t0 = time.perf_counter()
        figures = self.held_out.score(self.model, self.device, self.autocast)
        value = figures.get(self.cfg.best_metric)
        if self.best.improves(value):
            self.best.update(value, self.step)
            write_best(self.out, self.model, self.tokenizer,
                       {"step": self.step, "metric": self.best.metric, "value": value, "figures": figures,
                        "data": self.held_out.data, "cache": self.cfg.eval_cache or None})
        self.held_out_last = {"step": self.step, "data": self.held_out.data, "cache": self.cfg.eval_cache or None,
                              **figures}
        self.eval_seconds += time.perf_counter() - t0
        return {f"eval_{k}": v for k, v in figures.items() if k != "targets"}  # a count, the same every time

    def _stop_requested(self, stop: StopRequest) -> bool:
        """Whether any rank got Ctrl-C: ranks must stop at the same step or the next all-reduce hangs."""
        if self.world == 1:
            return stop.requested
        return _all_sum([float(stop.requested)], self.world, self.device)[0] > 0

    def _interrupted(self, where: str) -> str:
        """The interrupt message when the current state is not checkpointed: where the re-run continues."""
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            return f"{where}; no checkpoint yet: re-run the same command to start again from step 0"
        c = int(ckpt.name.split("_")[1])
        return (f"{where}; the newest checkpoint is step {c}: re-run the same command to continue from it "
                f"({self.step - c} step(s) redone)")

    def _prepare_out(self, fresh: bool) -> None:
        """Make OUT and record the run's inputs. A fresh start removes only what an earlier
        `kdcache train` wrote there (`pipeline.ownership.TRAIN`), refusing if anything else is present."""
        if fresh:
            remove_owned(self.out, TRAIN)
        self.out.mkdir(parents=True, exist_ok=True)
        write_record(self.out, self.cfg)  # first: a directory without it holds nothing of ours but leftovers
        save_config(self.cfg, self.out / "config.yaml")

    def _save_final(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        """OUT/final: a Hugging Face model directory with the student's tokenizer and model card, written
        under final.tmp and swapped in.

        Its kdcache_train.json carries the settings digest and inputs, so a student started from this
        model (`init_from`) is retrained when this one is retrained with other settings, and what the
        card says (`pipeline.training.model_card`).
        """
        from pipeline.training.model_card import card_record, write_card

        tmp = self.out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # weights: the gathered full state under FSDP (a copy: save_pretrained edits the dict it is given)
        self.model.save_pretrained(tmp, state_dict=dict(weights) if weights is not None else None)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        record = {"steps": self.step, "data": self.data_path, "cache": self.cfg.cache,
                  "tokenizer": self.pmeta["tokenizer"], "settings_sha256": settings_digest(self.cfg),
                  "inputs": train_inputs(self.cfg),
                  **card_record(self.cfg, IGNORED_KEYS, self.step, self.tokens_seen,
                                self.cache if self.cfg.distills else None, self.pmeta, self.held_out_last)}
        (tmp / "kdcache_train.json").write_text(json.dumps(record, indent=2))
        write_card(tmp, self.out.resolve().name)
        replace_dir(tmp, self.out / "final")


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


def train(cfg: TrainConfig, progress: bool = False, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a student per `cfg`; returns a summary dict (`skipped` when OUT/final is already done).

    A finished run is recognised before the model and data are loaded, so re-running a finished
    command costs nothing (with --push-to-hub it pushes final/: the way to retry a failed upload).
    """
    state = read_state(Path(cfg.out), cfg) if cfg.out else None
    if state is not None and state.kind == "final" and not (cfg.overwrite or cfg.resume):
        summary = skipped_summary(Path(cfg.out), state)
        if cfg.push_to_hub:
            from pipeline.training.hub import check_can_push

            check_can_push(cfg.push_to_hub)
            summary["pushed"] = push_final(Path(cfg.out), cfg.push_to_hub)
        return summary
    return Trainer(cfg).run(progress=progress, echo=echo, state=state)


def push_final(out: Path, repo: str) -> str:
    """Upload OUT/final to the Hub repo `repo` (see `pipeline.training.hub`); returns its URL."""
    from pipeline.training.hub import push

    return push(out / "final", repo, f"kdcache train: {out.resolve().name}")


def skipped_summary(out: Path, state: TrainState) -> dict[str, Any]:
    """The summary of a run that had nothing to do (OUT/final is complete for its settings)."""
    steps = state.final_steps or state.reached_step
    return {"out": str(out), "steps": steps, "total_steps": steps, "finished": True, "skipped": True,
            "last": {}, "seconds": 0.0, "tokens_per_s": 0.0}


def summary_line(s: dict[str, Any]) -> str:
    """One line for the end of `kdcache train`."""
    if s.get("skipped"):
        pushed = f"; pushed to {s['pushed']}" if s.get("pushed") else ""
        return f"train: {s['out']}/final is complete for these settings ({s['steps']} steps); nothing to do{pushed}"
    last = s["last"]
    parts = [f"train: {s['steps']}/{s['total_steps']} steps in {s['seconds']:.1f}s ({s['tokens_per_s']:,.0f} tok/s)"]
    if last:
        parts.append(f"loss {last['loss']:.4f}")
        if "tar" in last:
            parts.append(f"TAR {last['tar']:.3f}")
    b = s.get("best")
    if b and b.get("value") is not None:
        parts.append(f"best held-out {b['metric']} {b['value']:.4f} at step {b['step']}")
    parts.append(f"-> {s['out']}/{'final' if s['finished'] else 'checkpoints'}")
    if s.get("pushed"):
        parts.append(f"pushed to {s['pushed']}")
    return ", ".join(parts)
