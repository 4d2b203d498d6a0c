"""Cross-rank metric reduction with two real gloo ranks (two processes, file:// rendezvous).

Each rank runs this file as a script (`python tests/test_reduce.py <rank> <init file> <out dir>`):
it joins a gloo process group, counts every torch.distributed collective with a spy that
calls through to the real function, runs the scenarios below and writes what it saw to
`<out dir>/result_<rank>.json`. The tests only read those results, so the two processes
(and their torch imports) are started once per module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import ROOT, metrics

WORLD = 2
REDUCTIONS = {"a": "mean", "b": "max", "c": "min", "d": "sum", "time/summed": "sum"}
# Every collective torch.distributed offers; the spy counts calls to any of them.


def rank_metrics(rank: int, step: int) -> dict[str, float]:
    """What rank `rank` logs at `step` (values exact in float64, so results compare with ==)."""
    return {
        "a": [1.0, 4.0][rank] + step,
        "b": [3.0, -1.0][rank] * (step + 1),
        "c": [3.0, -1.0][rank] * (step + 1),
        "d": [0.25, 0.5][rank] + step,
        "loss": [2.0, 4.0][rank] + step,  # no declared reduction: mean
        "time/gen": [0.125, 0.375][rank] + step,  # time/*: max by default
        "time/summed": [0.125, 0.375][rank],  # a declared reduction wins over the time/ default
    }


def expected(step: int) -> dict[str, float]:
    return {
        "a": 2.5 + step,
        "b": 3.0 * (step + 1),
        "c": -1.0 * (step + 1),
        "d": 0.75 + 2 * step,
        "loss": 3.0 + step,
        "time/gen": 0.375 + step,
        "time/summed": 0.5,
    }


# ---------------------------------------------------------------- the rank side (a script)


def _rank_main(rank: int, init_file: str, out_dir: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    from omegaconf import OmegaConf

    from rlrun.config import LoggerConfig
    from rlrun.tracking import Tracker
    from collectives import count_collectives
    from rlrun.tracking.reduce import reduce_metrics

    counts: dict[str, int] = {}
    count_collectives(counts)
    result: dict = {"rank": dist.get_rank(), "world": dist.get_world_size()}

    # 1. reduce_metrics with declared reductions: the values, and the collectives per call.
    result["reduce"] = []
    for step in range(3):
        counts.clear()
        reduced = reduce_metrics(rank_metrics(rank, step), REDUCTIONS)
        result["reduce"].append({"values": reduced, "collectives": dict(counts)})

    # 2. Through the Tracker: it reduces on every rank and only rank 0 records.
    tracker = Tracker(OmegaConf.structured(LoggerConfig), job="trainer", output_dir=out_dir / f"run_{rank}")
    result["tracker_rank"] = tracker.rank
    result["tracker"] = []
    for step in range(1, 4):
        with tracker.timer("gen"):
            time.sleep(0.05 if rank == 1 else 0.0)  # the slow rank sets time/gen
        counts.clear()
        returned = tracker.log_metrics({"loss": rank + step, "n": 1.0}, step, reductions={"n": "sum"})
        result["tracker"].append({"values": returned, "collectives": dict(counts)})
    tracker.finish()

    # 3. Ranks that logged different names (same count) fail on every rank; later steps still work.
    def attempt(metrics: dict[str, float]) -> dict:
        counts.clear()
        try:
            return {"values": reduce_metrics(metrics), "collectives": dict(counts)}
        except Exception as exc:  # noqa: BLE001
            return {"error": type(exc).__name__, "message": str(exc), "collectives": dict(counts)}

    result["renamed"] = attempt({"x": 1.0, "y" if rank == 0 else "z": 2.0})
    result["after_mismatch"] = attempt({"x": float(rank)})
    # 4. ...and so do ranks that logged a different number of metrics.
    result["extra_key"] = attempt({"x": 1.0} if rank == 0 else {"x": 1.0, "extra": 2.0})
    result["after_extra_key"] = attempt({"x": float(rank)})

    dist.destroy_process_group()
    (out_dir / f"result_{rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the test side


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out_dir = tmp_path_factory.mktemp("reduce")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(out_dir / "rendezvous"), str(out_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=out_dir,
        )  # fmt: skip
        for rank in range(WORLD)
    ]
    outputs = []
    for proc in procs:  # one after the other: 2 x 120 s, within the test's 300 s
        try:
            outputs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the two ranks did not finish within 120 s")
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{output[-4000:]}"
    return out_dir, [json.loads((out_dir / f"result_{rank}.json").read_text()) for rank in range(WORLD)]


def test_declared_reductions_on_both_ranks(ranks):
    _, results = ranks
    for result in results:
        assert result["world"] == WORLD
        for step, call in enumerate(result["reduce"]):
            assert call["values"] == expected(step), f"rank {result['rank']}, step {step}"


def test_one_collective_per_call(ranks):
    _, results = ranks
    for result in results:
        for call in result["reduce"] + result["tracker"] + [result["renamed"], result["after_mismatch"]]:
            assert sum(call["collectives"].values()) == 1, call["collectives"]


def test_tracker_reduces_and_only_rank0_records(ranks):
    out_dir, results = ranks
    assert [r["tracker_rank"] for r in results] == [0, 1], "the Tracker takes its rank from the process group"
    assert not [p for p in (out_dir / "run_1").rglob("*") if p.is_file()], "rank 1 writes nothing"
    records = metrics(out_dir / "run_0", "trainer")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record, call0, call1 in zip(records, results[0]["tracker"], results[1]["tracker"]):
        step = record["step"]
        assert call0["values"] == call1["values"] == record["metrics"], "every rank gets what rank 0 records"
        assert record["metrics"]["loss"] == 0.5 + step, "mean over ranks (0 + step, 1 + step)"
        assert record["metrics"]["n"] == 2.0, "declared sum"
        assert record["metrics"]["time/gen"] >= 0.05, "the slowest rank's time (max), not the mean"


def test_mismatched_keys_raise_on_every_rank(ranks):
    _, results = ranks
    for result in results:
        for case in ("renamed", "extra_key"):
            assert result[case].get("error") == "RuntimeError", (case, result[case])
            assert "different metric names" in result[case]["message"]
        # Every rank issued its one collective, so the ranks stay in step afterwards.
        assert result["after_mismatch"]["values"] == {"x": 0.5}
        assert result["after_extra_key"]["values"] == {"x": 0.5}


def test_single_process_needs_no_torch():
    """Without a process group the values pass through, and torch is not even imported."""
    code = (
        "import sys\n"
        "from rlrun.tracking.reduce import reduce_metrics\n"
        "print(reduce_metrics({'a': 1, 'time/x': 2}, {'a': 'sum'}), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["{'a':", "1.0,", "'time/x':", "2.0}", "False"]
    from rlrun.tracking.reduce import reduce_metrics

    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_metrics({"a": 1.0}, {"a": "median"})


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
