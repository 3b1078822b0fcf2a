"""What a running pipeline's Ray processes hold in memory, by role: a snapshot of this machine's processes.

    python bench/ray_memory.py --label "study, 2 trials at once" --out bench/results/ray_memory.jsonl

Run it while a command runs (a study, a sweep, full_run). Memory is each process's proportional set size
(PSS, /proc/PID/smaps_rollup: a page shared by k processes counts 1/k in each), so the roles add up to what
the machine holds. Roles are Ray's process titles (ray::RayTrainWorker, ray::TrainController, ...; the
dashboard's helpers are one role), plus the driver, given by --driver-pattern. Prints a table and appends
one JSON line: {label, time, total_mib, roles: {role: {processes, pss_mib}}}.
"""
from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from pathlib import Path

from bench.records import append_record


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="what was running, in the record")
    parser.add_argument("--driver-pattern", default=r"pipelines/(study|full_run|train|encode|evaluate)\.py|"
                                                    r"tuning/sweep\.py|sddit-",
                        help="regular expression matching the driver's command line (default: our commands)")
    parser.add_argument("--out", default=None, help="JSON-lines file the snapshot is appended to")
    return parser.parse_args(argv)


def role_of(cmdline: str, driver: re.Pattern) -> str | None:
    """The role a process plays, from its command line (Ray sets its workers' titles), or None if not Ray's."""
    executable = cmdline.split(" ", 1)[0]
    if executable.endswith(("/raylet", "/gcs_server")):   # Ray's binaries (their flags name other parts of Ray)
        return executable.rsplit("/", 1)[1]
    if cmdline.startswith("ray::"):
        return cmdline.split()[0].split(".")[0]             # ray::TrainController.run -> ray::TrainController
    # before the driver: the dashboard's forked helpers repeat the driver's module list in their command lines
    if cmdline.startswith("ray-dashboard-") or "dashboard/dashboard.py" in cmdline or "ray.dashboard" in cmdline:
        return "dashboard"
    if driver.search(cmdline):
        return "driver"
    for name in ("log_monitor", "monitor.py"):
        if name in cmdline and "/ray/" in cmdline:
            return name
    return None


def pss_mib(pid: str) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def snapshot(driver_pattern: str) -> dict[str, dict]:
    driver = re.compile(driver_pattern)
    roles: dict[str, dict] = defaultdict(lambda: {"processes": 0, "pss_mib": 0.0})
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            role = role_of(cmdline, driver)
            if role is not None:
                roles[role]["pss_mib"] += pss_mib(proc.name)
                roles[role]["processes"] += 1
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue                                        # it ended while we looked
    return {role: {**value, "pss_mib": round(value["pss_mib"], 1)} for role, value in
            sorted(roles.items(), key=lambda item: -item[1]["pss_mib"])}


def main(argv=None) -> dict:
    args = parse_args(argv)
    roles = snapshot(args.driver_pattern)
    record = {"label": args.label, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "total_mib": round(sum(r["pss_mib"] for r in roles.values()), 1), "roles": roles}
    print(f"{'role':<36}{'processes':>10}{'PSS (MiB)':>12}")
    for role, value in roles.items():
        print(f"{role:<36}{value['processes']:>10}{value['pss_mib']:>12.1f}")
    print(f"{'total':<36}{sum(r['processes'] for r in roles.values()):>10}{record['total_mib']:>12.1f}")
    append_record(args.out, record)
    return record


if __name__ == "__main__":
    main()
