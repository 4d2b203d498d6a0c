"""`python -m rlrun.doctor RUN [doctor=strict] [doctor.key=value ...]`: the doctor's rules
over a finished run's records, e.g. to see what a threshold would have found. Starts from
`RUN/config.yaml`'s `doctor` section (or the `doctor=<option>` given), applies the overrides,
prints each finding; exit code 1 when there is one."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf


def main(argv: list[str] | None = None) -> int:
    from rlrun.config import CONF_DIR
    from rlrun.doctor.config import DoctorConfig, check_doctor
    from rlrun.doctor.doctor import Doctor
    from rlrun.tracking.base import Alert, MetricPoint
    from rlrun.tracking.record import read_metrics

    parser = argparse.ArgumentParser(prog="python -m rlrun.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory")
    parser.add_argument("overrides", nargs="*", help="e.g. doctor.no_eos.steps=5")
    args = parser.parse_args(argv)
    logging.getLogger("rlrun.doctor").disabled = True  # each finding is printed below
    saved = OmegaConf.load(args.run / "config.yaml") if (args.run / "config.yaml").is_file() else OmegaConf.create()
    option = [o.split("=", 1)[1] for o in args.overrides if o.startswith("doctor=")]
    chosen = OmegaConf.load(CONF_DIR / "doctor" / f"{option[-1]}.yaml") if option else None
    keys = [o.removeprefix("doctor.") for o in args.overrides if not o.startswith("doctor=")]
    cfg = OmegaConf.merge(OmegaConf.structured(DoctorConfig),
                          chosen or OmegaConf.select(saved, "doctor", default={}), OmegaConf.from_dotlist(keys))  # fmt: skip
    check_doctor(cfg)
    alerts: list[Alert] = []
    for path in sorted((args.run / "metrics").glob("*.jsonl")):
        doctor = Doctor(cfg, path.stem, alerts.append)
        doctor([MetricPoint(r["step"], r["metrics"], r["time"]) for r in read_metrics(path)])
    for alert in alerts:
        print(alert.text())
    print(f"{len(alerts)} finding(s) in {args.run}")
    return 1 if alerts else 0


if __name__ == "__main__":
    sys.exit(main())
