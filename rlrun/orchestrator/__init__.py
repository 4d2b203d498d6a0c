"""The orchestrator job: prompts -> completions -> rewards -> advantages -> a batch per step.

- `rollout.py`: the math of one step's data (GRPO advantages, batch tensors, metrics).
- `__main__.py`: `python -m rlrun.orchestrator --config <run>/config.yaml`, the step loop.
"""
