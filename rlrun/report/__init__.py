"""Plots and a summary of a run (or a sweep) from its own record: `python -m rlrun.report`.

    python -m rlrun.report outputs/2026-11-23/14-05-09            # -> <run>/report.png, report.html
    python -m rlrun.report outputs/multirun/2026-11-23/15-00-00   # a sweep: its jobs overlaid
    python -m rlrun.report runA runB -o compare/                  # any runs overlaid, written to compare/
    python -m rlrun.report outputs/2026-11-23/14-05-09 --samples  # -> <run>/samples.html, the token browser

Reads only `metrics/{orchestrator,trainer,monitor}.jsonl` (no tracker, no server), so it
works on a finished, crashed or still-running run. Panels whose metrics a run does not have
are left out. A sweep's jobs are labelled by the overrides that differ between them
(`.hydra/overrides.yaml`).

- `data.py`: runs and sweeps read back from their record.
- `panels.py`: what each panel plots, alone or with runs overlaid.
- `render.py`: the PNG (matplotlib, imported only when plotting) and the html page.
- `samples.py`: the token browser: the rollouts still on disk, token by token, coloured by
  logprob, advantage, importance ratio or mismatch (trainer logprobs recomputed).
- `__main__.py`: the command line.
"""

from rlrun.report.data import load_run
from rlrun.report.render import plot, report

__all__ = ["load_run", "plot", "report"]
