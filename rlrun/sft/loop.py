"""The SFT loop: a cross-entropy step per batch of prompt/completion pairs, weights out at the end.

Per step, in `SftTrainer.step`: take the next batch (every rank builds the same one and
keeps its rows, `i % world == rank`), compute the token-mean cross-entropy of the completion
tokens over the whole batch (DDP averages the ranks' gradients), clip and step, log `loss`,
`grad_norm`, `lr`, `num_loss_tokens` (this step's), `num_tokens` (cumulative) and `tokens/s`; every `sft.eval_interval` steps
and at the last, greedy completions of the task's held-out prompts (`eval/*`, the same
evaluation the orchestrator runs). At the end rank 0 writes `<run>/sft/model` (weights,
tokenizer and the optimizer's state, atomically): the policy RL starts from.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from rlrun.job import StopFlag, StopRequested
from rlrun.sft import SFT_OPTIMIZER_FILE, sft_model_dir
from rlrun.trainer.dist import Ranks, any_rank, barrier, sum_ranks
from rlrun.trainer.precision import compute_dtype, describe, master_dtype


class _Scorer:
    """The env-worker pool's `score` in this process (SFT scores only its few eval prompts)."""

    def __init__(self, env: Any) -> None:
        self.env = env

    def score(self, texts: list[str], examples: list[Any]) -> list[dict[str, float]]:
        return [self.env.score(t, ex) for t, ex in zip(texts, examples, strict=True)]


class _LocalSampler:
    """The inference client's `complete`, on the model being trained (greedy eval only)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def complete(self, prompt_ids: list[list[int]], n: int, max_tokens: int, temperature: float,
                 seed: int | None = None, logit_bias: dict[int, float] | None = None):  # fmt: skip
        return self.engine.generate(prompt_ids, n, max_tokens, temperature, seed, logit_bias)


class SftTrainer:
    """The policy, its optimizer, the data and the tracker on one rank; `run()` to `sft.max_steps`."""

    def __init__(self, cfg: Any, run_dir: Path, stop: StopFlag, ranks: Ranks) -> None:
        from rlrun.envs import load_task
        from rlrun.inference.engine import Engine
        from rlrun.log import get_logger
        from rlrun.model import load_model, resolve_model_path, special_token_bias
        from rlrun.orchestrator.eval import Evaluator
        from rlrun.sft.data import batches
        from rlrun.tracking import Tracker

        self.cfg, self.scfg, self.run_dir, self.stop, self.ranks = cfg, cfg.sft, run_dir, stop, ranks
        self.log = get_logger()
        torch.manual_seed(cfg.seed)
        if ranks.rank == 0:  # rank 0 first: with model=tiny it builds <run>/model unless another job has
            resolve_model_path(cfg.model, run_dir, cfg.seed)
        barrier(ranks)
        self.model_path = resolve_model_path(cfg.model, run_dir, cfg.seed)
        self.compute_dtype = compute_dtype(cfg.model.dtype)  # bf16: fp32 master weights, bf16 autocast
        model, self.tokenizer = load_model(self.model_path, master_dtype(cfg.model.dtype), str(ranks.device),
                                           cfg.model.trust_remote_code)  # fmt: skip
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.scfg.lr, weight_decay=self.scfg.weight_decay)
        if ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.env = load_task(cfg.task)
        self.data = batches(self.env, self.scfg.data, self.scfg.batch_size, cfg.seed)
        bias = {} if cfg.orchestrator.allow_special_tokens else special_token_bias(self.tokenizer)  # as RL samples
        self.evaluator = Evaluator(self.env, self.tokenizer, self.env.num_eval_prompts, cfg.orchestrator.max_tokens,
                                   cfg.orchestrator.num_val_samples_to_print, bias)  # fmt: skip
        self.sampler = _LocalSampler(Engine(model, self.tokenizer, device=str(ranks.device)))
        self.num_tokens = 0.0
        self.tracker = Tracker(cfg.logger, job="sft", output_dir=run_dir, run_name=cfg.name, doctor=cfg.doctor,
                               on_stop=stop.request)  # fmt: skip

    def run(self) -> None:
        """Train `sft.max_steps` steps, then publish the model; raises StopRequested on a stop signal."""
        scfg = self.scfg
        try:
            self.tracker.log_hyperparams(self.cfg)
            self.log.info(f"sft rank {self.ranks.rank}/{self.ranks.world} ({describe(self.cfg.model.dtype)}): "
                          f"{self.model_path}, {scfg.max_steps} steps "
                          f"of {scfg.batch_size} pairs, lr {scfg.lr}, data {scfg.data or 'the task reference answers'}")
            for step in range(1, scfg.max_steps + 1):
                if any_rank(bool(self.stop), self.ranks):  # every rank stops at the same step
                    raise StopRequested(f"{self.stop.why()} (before sft step {step})")
                self.step(step)
            if self.ranks.rank == 0:
                self._publish()
            barrier(self.ranks)
            self.log.info(f"sft done: {scfg.max_steps} steps; policy in {sft_model_dir(self.run_dir)}")
        finally:
            self.tracker.finish()

    def step(self, step: int) -> None:
        """One supervised step on the next batch; evaluation on its steps."""
        from rlrun.batch import pad_sequences
        from rlrun.sft.data import tokenize_pair
        from rlrun.trainer.step import optimizer_step, token_logprobs

        scfg, tracker, ranks = self.scfg, self.tracker, self.ranks
        step_start = time.perf_counter()
        pairs = [tokenize_pair(self.tokenizer, p, c) for p, c in next(self.data)]
        batch = {k: v[ranks.rank :: ranks.world].to(ranks.device) for k, v in pad_sequences(pairs, self.pad_id).items()}
        mask = batch["loss_mask"][:, 1:]
        with tracker.timer("forward_backward") as fwd_bwd:
            tokens_per_rank = max(sum_ranks(float(mask.sum()), ranks) / ranks.world, 1.0)
            logprobs, _ = token_logprobs(self.model, batch["input_ids"], batch["attention_mask"], 1.0,
                                         compute_dtype=self.compute_dtype)  # fmt: skip
            loss = -(logprobs * mask).sum() / tokens_per_rank  # the whole batch's token mean, after DDP's average
            loss.backward()
        with tracker.timer("optimizer_step") as opt_step:
            grad_norm = optimizer_step(self.model, self.optimizer, scfg.max_grad_norm, self.log, step)
        tokens = float(mask.sum())
        self.num_tokens += tokens_per_rank * ranks.world  # every rank's, as TRL's cumulative `num_tokens`
        metrics = {
            "loss": float(loss.detach()),
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens/s": tokens / max(fwd_bwd.seconds + opt_step.seconds, 1e-9),
            "num_loss_tokens": tokens,
            "num_tokens": self.num_tokens,
        }
        if (scfg.eval_interval and step % scfg.eval_interval == 0) or step == scfg.max_steps:
            with tracker.timer("eval"):
                metrics.update(self._evaluate(step))
        metrics["time/step"] = time.perf_counter() - step_start
        m = tracker.log_metrics(metrics, step, {"num_loss_tokens": "sum", "tokens/s": "sum"})
        if step % 10 == 0 or step == scfg.max_steps or "eval/reward" in m:
            extra = f" | eval reward {m['eval/reward']:.3f}" if "eval/reward" in m else ""
            self.log.info(f"sft step {step}/{scfg.max_steps} | loss {m['loss']:.4f} | grad_norm {m['grad_norm']:.3f} | "
                          f"tokens {self.num_tokens:.0f}{extra}")  # fmt: skip

    # ------------------------------------------------------------ the step's parts

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id)

    def _evaluate(self, step: int) -> dict[str, float]:
        """Greedy completions of the held-out prompts by the model as it is now (every rank alike)."""
        model = getattr(self.model, "module", self.model)
        try:
            return self.evaluator.evaluate(step, self.sampler, _Scorer(self.env), self.log)
        finally:
            model.train()  # the engine samples in eval mode

    def _publish(self) -> None:
        """`<run>/sft/model`: weights, tokenizer and AdamW's moments (RL may go on with them)."""
        from rlrun.model import export_pretrained

        export_pretrained(self.model, self.tokenizer, sft_model_dir(self.run_dir),
                          extra=lambda tmp: torch.save(self.optimizer.state_dict(), tmp / SFT_OPTIMIZER_FILE))  # fmt: skip

