"""The orchestrator job: prompts -> completions -> rewards -> advantages -> a batch per step.

- `loop.py`: `Orchestrator`, set-up and the step loop (`Orchestrator.step` reads top to bottom).
- `rollout.py`: the `Rollout` record and the math of one step's data (advantages, batch, metrics).
- `eval.py`: greedy evaluation on held-out prompts; `extras.py`: sample tables and distributions.
- `__main__.py`: `python -m rlrun.orchestrator --config <run>/config.yaml`.
"""
