"""The trainer loop: one GRPO step per batch the orchestrator writes, weights back out.

Per step `n` (from 1, or from the newest checkpoint + 1), in `Trainer.step`:

1. wait for `rollouts/step_<n>/` (a stop signal ends the wait on every rank together);
   each rank takes its rows (`i % world == rank`);
2. forward and backward (`step.forward_backward`): `log_softmax(logits / temperature)` of
   every completion token, the same distribution the sampler recorded in `old_logprobs`,
   the loss (`loss.py`, `trainer.loss_type`) and its gradient (DDP averages it across ranks);
3. clip the gradient norm and take an AdamW step;
4. rank 0 writes `weights/step_<n>/` for inference and, every `trainer.checkpoint_interval`
   steps and at the last, `checkpoints/step_<n>/` (`checkpoint.py`); where a tracker stores
   models (`logger.<backend>.log_model`), a complete model directory `exports/step_<n>/` too,
   handed to the tracker;
5. every rank logs the step's metrics (one collective reduces them across ranks); every
   `trainer.log_extras.interval` steps, with `log_extras.distributions`, the per-token
   entropy, importance ratio and loss of every masked token of the whole batch (gathered
   onto rank 0) as `distributions/<name>`. Other steps keep no per-token values at all.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from rlrun.batch import batch_ready, read_batch
from rlrun.job import StopFlag, StopRequested
from rlrun.model import bias_tensor
from rlrun.rundir import wait_for
from rlrun.trainer.checkpoint import load_checkpoint, publish_weights, save_checkpoint
from rlrun.trainer.dist import Ranks, any_rank, barrier, gather_token_values, sum_ranks
from rlrun.trainer.precision import compute_dtype, describe, inference_dtype, master_dtype
from rlrun.trainer.step import forward_backward, optimizer_step

# Metrics that are not a mean over ranks (timings `time/*` reduce with max by default).
REDUCTIONS = {
    "clip_ratio/low_min": "min",
    "clip_ratio/high_max": "max",
    "mismatch/logprob_diff_max": "max",
    "mismatch/token_ratio_min": "min",
    "mismatch/token_ratio_max": "max",
    "mismatch/seq_ratio_min": "min",
    "mismatch/seq_ratio_max": "max",
    "num_loss_tokens": "sum",
    "tokens/s": "sum",
    "perf/tokens_per_s": "sum",
    "perf/peak_memory_gb": "max",
}


EXPORTS_KEPT = 3  # model directories handed to trackers (uploaded in the background)


class Trainer:
    """The policy, its optimizer and tracker on one rank; `run()` trains to `max_steps`."""

    def __init__(self, cfg: Any, run_dir: Path, stop: StopFlag, ranks: Ranks) -> None:
        from rlrun.log import get_logger
        from rlrun.model import load_model, policy_path, resolve_model_path
        from rlrun.tracking import Tracker

        self.cfg, self.tcfg, self.run_dir, self.stop, self.ranks = cfg, cfg.trainer, run_dir, stop, ranks
        self.log = get_logger()
        torch.manual_seed(cfg.seed)
        # Rank 0 first: with model=tiny it builds <run>/model unless another job has.
        if ranks.rank == 0:
            resolve_model_path(cfg.model, run_dir, cfg.seed)
        barrier(ranks)
        self.model_path = policy_path(cfg, run_dir)  # the SFT stage's output when the run has one

        self.compute_dtype = compute_dtype(cfg.model.dtype)  # bf16: fp32 master weights, bf16 autocast
        self.weights_dtype = inference_dtype(cfg)  # what weights/step_<n> hold: inference's dtype

        def load() -> torch.nn.Module:
            return load_model(self.model_path, master_dtype(cfg.model.dtype), str(ranks.device),
                              cfg.model.trust_remote_code)[0]  # fmt: skip

        self.model = load().train()
        self.ref_model = load().requires_grad_(False) if self.tcfg.kl_coef > 0 else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.tcfg.lr, weight_decay=self.tcfg.weight_decay)
        state = load_checkpoint(run_dir, self.model, self.optimizer, ranks.device) or {}
        if not state and self.tcfg.optimizer_from_sft:
            self._optimizer_from_sft()
        self.start = int(state.get("step", 0)) + 1
        if ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=device_ids)
        self.xcfg = self.tcfg.log_extras  # the trainer logs distributions only (samples are the orchestrator's)
        resume_ids = {k: state[k] for k in ("wandb_run_id", "mlflow_run_id") if state.get(k)}
        self.tracker = Tracker(cfg.logger, job="trainer", output_dir=run_dir, run_name=cfg.name,
                               resume_ids=resume_ids, max_table_rows=self.xcfg.max_rows, doctor=cfg.doctor,
                               on_stop=stop.request)  # fmt: skip
        from rlrun.trainer.perf import FlopsPerToken, peak_flops

        self.peak_flops = peak_flops(ranks.device, cfg.perf.peak_flops)  # None on CPU unless perf.peak_flops
        self.flops_per_token = FlopsPerToken(self.model) if self.peak_flops else None
        self.tokenizer = None  # loaded for the first model export

    def run(self) -> None:
        """Train steps `start..max_steps`; raises StopRequested on a stop signal."""
        cfg, tcfg = self.cfg, self.tcfg
        try:
            if self.start == 1:
                self.tracker.log_hyperparams(cfg)
            else:
                self.log.info(f"resumed from checkpoints/step_{self.start - 1}")
                if self.ranks.rank == 0:  # the parent removed newer weights; the orchestrator syncs to these
                    publish_weights(self.model, self.run_dir, self.start - 1, tcfg.keep_last, self.weights_dtype)
            self.log.info(
                f"trainer rank {self.ranks.rank}/{self.ranks.world} on {self.ranks.device} "
                f"({describe(cfg.model.dtype)}): {self.model_path}, "
                f"steps {self.start}..{cfg.max_steps}, lr {tcfg.lr}, clip [{1 - tcfg.clip_eps_low:.2f}, "
                f"{1 + tcfg.clip_eps_high:.2f}], kl_coef {tcfg.kl_coef}"
            )
            for step in range(self.start, cfg.max_steps + 1):
                self.step(step)
            self.log.info(f"trainer done: {cfg.max_steps} steps")
        finally:
            self.tracker.finish()

    def step(self, step: int) -> None:
        """One GRPO step on batch `step`: wait, forward/backward, update, publish, log."""
        tcfg, tracker, ranks = self.tcfg, self.tracker, self.ranks
        step_start = time.perf_counter()
        with tracker.timer("wait_for_batch") as waited:
            batch, meta = self._wait_for_batch(step)
        token_values = {} if self._logs_distributions(step) else None  # per-token values only when logged
        with tracker.timer("forward_backward") as fwd_bwd:
            # DDP averages gradients over ranks: dividing by the mean token count per rank
            # makes the gradient the token mean over the whole batch, as in one process.
            tokens_per_rank = sum_ranks(float(batch["loss_mask"][:, 1:].sum()), ranks) / ranks.world
            stats = forward_backward(
                self.model, batch, meta["temperature"], tcfg.clip_eps_low, tcfg.clip_eps_high, tcfg.kl_coef,
                self.ref_model, tcfg.micro_batch_size, loss_tokens=max(tokens_per_rank, 1.0), token_values=token_values,
                loss_type=tcfg.loss_type, max_tokens=self.cfg.orchestrator.max_tokens,
                logit_bias=self._logit_bias(meta), is_correction=tcfg.is_correction, is_cap=tcfg.is_cap,
                compute_dtype=self.compute_dtype,
            )  # fmt: skip
        with tracker.timer("optimizer_step") as opt_step:
            grad_norm = optimizer_step(self.model, self.optimizer, tcfg.max_grad_norm, self.log, step)
        with tracker.timer("save_weights"):
            if ranks.rank == 0:
                publish_weights(self.model, self.run_dir, step, tcfg.keep_last, self.weights_dtype)
        final = step == self.cfg.max_steps
        checkpointing = tcfg.checkpoint_interval > 0 and (step % tcfg.checkpoint_interval == 0 or final)
        if checkpointing:
            with tracker.timer("checkpoint"):
                if ranks.rank == 0:
                    save_checkpoint(self.run_dir, step, self.model, self.optimizer, tracker.run_identity())
        if (checkpointing or final) and tracker.wants_model(final):  # only rank 0's tracker has backends
            tracker.log_model(self._export(step), step, final)

        step_s = time.perf_counter() - step_start
        metrics = {
            **stats,
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens/s": stats["num_loss_tokens"] / max(fwd_bwd.seconds + opt_step.seconds, 1e-9),
            **self._efficiency(batch, step_s, waited.seconds),
            "time/step": step_s,
        }
        m = tracker.log_metrics(metrics, step, REDUCTIONS)
        if token_values is not None:  # the whole batch's tokens, from every rank; rank 0 logs
            for name, values in gather_token_values(token_values, ranks).items():
                tracker.log_distribution(f"distributions/{name}", values, step)
        kl = f" | kl {m['kl']:.4f}" if "kl" in m else ""
        self.log.info(
            f"step {step}/{self.cfg.max_steps} | loss {m['loss']:+.4f} | grad_norm {m['grad_norm']:.3f} | "
            f"entropy {m['entropy']:.3f} | clipped {m['clip_ratio/region_mean']:.3f}{kl} | "
            f"tokens {m['num_loss_tokens']:.0f} | sampled by v{meta['policy_version']} | "
            f"wait {m['time/wait_for_batch']:.2f}s | train {m['time/forward_backward']:.2f}s"
        )

    # ------------------------------------------------------------ the step's parts

    def _wait_for_batch(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's rows of `rollouts/step_<step>/` on its device, and the batch's meta."""
        stop, ranks = self.stop, self.ranks
        wait_for(lambda: bool(stop) or batch_ready(self.run_dir, step), f"rollouts/step_{step}")
        if any_rank(bool(stop), ranks):  # every rank stops at the same point
            raise StopRequested(f"{stop.why()} (before step {step})")
        tensors, meta = read_batch(self.run_dir, step)
        if self.tcfg.mask_truncated_completions and "truncated" in tensors:  # TRL's: no loss on cut-off completions
            tensors["loss_mask"] = tensors["loss_mask"] * (1.0 - tensors["truncated"])[:, None]
        rows = tensors["input_ids"].shape[0]
        if rows < ranks.world:
            raise ValueError(f"rollouts/step_{step} has {rows} rows, fewer than the {ranks.world} trainer ranks")
        temperature = float(meta.get("temperature", self.cfg.orchestrator.temperature))
        meta["temperature"] = temperature if temperature > 0 else 1.0  # greedy sampling records T=1 logprobs
        meta.setdefault("policy_version", step - 1)
        return {k: v[ranks.rank :: ranks.world].to(ranks.device) for k, v in tensors.items()}, meta

    def _export(self, step: int) -> Path:
        """`exports/step_<step>/`: the policy with its config and tokenizer, for a tracker's model
        store; the newest EXPORTS_KEPT stay (a backend finds a pruned one gone and says so)."""
        from rlrun.model import export_pretrained, load_tokenizer
        from rlrun.rundir import prune, step_dir

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_path, self.cfg.model.trust_remote_code)
        out = export_pretrained(self.model, self.tokenizer, step_dir(self.run_dir / "exports", step))
        prune(self.run_dir / "exports", EXPORTS_KEPT)
        return out

    def _optimizer_from_sft(self) -> None:
        """Go on with the SFT stage's AdamW moments (a fresh state's first steps undo SFT), at RL's lr."""
        from rlrun.sft import SFT_OPTIMIZER_FILE

        path = Path(self.model_path) / SFT_OPTIMIZER_FILE
        if not path.is_file():
            return
        self.optimizer.load_state_dict(torch.load(path, map_location=self.ranks.device, weights_only=True))
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = self.tcfg.lr, self.tcfg.weight_decay
        self.log.info(f"optimizer state from {path} (lr {self.tcfg.lr})")

    def _efficiency(self, batch: dict[str, torch.Tensor], step_s: float, waited_s: float) -> dict[str, float]:
        """This rank's throughput over the whole step, MFU where the peak is known, CUDA memory,
        and the share of the step spent waiting for the orchestrator's batch."""
        tokens = float(batch["attention_mask"].sum())
        out = {"perf/tokens_per_s": tokens / max(step_s, 1e-9), "idle/trainer_wait_frac": waited_s / max(step_s, 1e-9)}
        if self.flops_per_token is not None:
            flops = self.flops_per_token(int(batch["input_ids"].shape[1])) * tokens
            out["perf/mfu"] = flops / max(step_s, 1e-9) / self.peak_flops
        if self.ranks.device.type == "cuda":
            out["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(self.ranks.device) / 1e9
        return out

    def _logit_bias(self, meta: dict[str, Any]) -> torch.Tensor | None:
        """The sampler's `logit_bias` (the batch's meta) over the logits' width; None when there is none."""
        if not meta.get("logit_bias"):
            return None
        width = getattr(self.model, "module", self.model).get_output_embeddings().weight.shape[0]
        return bias_tensor(meta["logit_bias"], int(width), self.ranks.device)

    def _logs_distributions(self, step: int) -> bool:
        return bool(self.xcfg.distributions) and step % self.xcfg.interval == 0
