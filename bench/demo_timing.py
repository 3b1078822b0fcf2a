"""The demo's wall time, measured as the README's table is: `pipelines/full_run.py` from an empty run
directory, several times back to back, timed from outside the process (as the shell's `time` does).
Each console line is timestamped as it arrives and the machine's idle share is sampled every second,
so a run's overhead can be read off its timeline: where a stage starts, how long the sweep's trials
take to report, how long the final training takes to its first step, what the exit costs.

    python bench/demo_timing.py --repeats 3 --out bench/results/demo_timing.jsonl --timelines runs/timelines
    python bench/demo_timing.py --repeats 1 -- --train-steps 200      # arguments after -- go to full_run

One JSON record per run is appended to --out as soon as the run ends (a stopped session keeps the runs
before it), and a Markdown row in the README's columns is printed. A run that fails is recorded with its
exit status, the next one still runs, and the script exits non-zero at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from sddit import code_version
from bench.records import append_record
from pipelines.common import at_least

STAGE_LINE = re.compile(r"full_run: (encode|tune|train|evaluate) (started|done)")
PROGRESS_LINE = re.compile(r"final-\S+: step \d+/\d+, ([0-9.]+) img/s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=at_least(1), default=3, help="runs back to back (default 3)")
    parser.add_argument("--run-dir", default="runs/demo-timing",
                        help="run directory, deleted before each run (default runs/demo-timing)")
    parser.add_argument("--out", default="bench/results/demo_timing.jsonl", help="JSON lines, one per run")
    parser.add_argument("--timelines", default=None,
                        help="directory for each run's timeline: console lines and idle shares by second")
    parser.add_argument("full_run_args", nargs="*", help="after --: arguments for pipelines/full_run.py")
    args = parser.parse_args(argv)
    return args


def cpu_ticks() -> tuple[int, int]:
    """(idle, total) clock ticks of the whole machine since boot, from /proc/stat (idle includes iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)


class IdleSampler(threading.Thread):
    """The machine's idle share over each second while a run goes on: [(seconds since start, percent)]."""

    def __init__(self, start: float):
        super().__init__(daemon=True)
        self.start_time, self.samples, self.stopped = start, [], threading.Event()

    def run(self):
        if not Path("/proc/stat").exists():   # not Linux: the run is timed, its idle share is not
            return
        before, next_second = cpu_ticks(), time.monotonic() + 1
        # on a fixed clock, not 1 s after the last sample: on a busy machine each sample came a little late, and
        # the series fell behind the wall clock by more than its test allows
        while not self.stopped.wait(max(next_second - time.monotonic(), 0)):
            next_second += 1
            after = cpu_ticks()
            total = max(after[1] - before[1], 1)
            self.samples.append((round(time.time() - self.start_time, 1), round(100 * (after[0] - before[0]) / total, 1)))
            before = after


def timed_run(command: list[str]) -> tuple[float, int, list[tuple[float, str]], list]:
    """(wall seconds until the process exited, exit status, [(seconds, console line)], idle samples)."""
    start = time.time()
    sampler = IdleSampler(start)
    sampler.start()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                               cwd=ROOT)
    lines, exited = [], []
    # timed to the process's exit, as the shell's `time` does, not to the pipe's end: Ray's processes may
    # hold the pipe open a little longer
    def wait_for_exit():
        process.wait()
        exited.append(time.time())
    waiter = threading.Thread(target=wait_for_exit, daemon=True)
    waiter.start()
    for line in process.stdout:
        lines.append((round(time.time() - start, 2), line.rstrip("\n")))
        sys.stdout.write(line)
    waiter.join()
    wall = exited[0] - start
    sampler.stopped.set()
    sampler.join()
    return wall, process.returncode, lines, sampler.samples


def stage_marks(lines: list[tuple[float, str]]) -> dict:
    """{stage: {"started": s, "done": s}} from full_run's own stage lines."""
    marks: dict = {}
    for seconds, line in lines:
        found = STAGE_LINE.search(line)
        if found:
            marks.setdefault(found.group(1), {})[found.group(2)] = seconds
    return marks


def record_of(run: int, wall: float, status: int, lines, idle, summary: dict | None) -> dict:
    rates = [float(m.group(1)) for _, line in lines if (m := PROGRESS_LINE.search(line))]
    record = {"run": run, "exit_status": status, "wall_s": round(wall, 2), "stages_by_clock": stage_marks(lines),
              "final_img_per_s_median": statistics.median(rates) if rates else None,
              "idle_percent_by_second": idle, "machine": machine()}
    if summary:
        steps = summary.get("step_seconds", 0.0)
        record.update({
            "summary_wall_s": round(summary["wall_s"], 2), "stages_s": summary["stages"],
            "training_steps_s": round(steps, 2), "steps_share": round(steps / wall, 4),
            "overhead_s": round(wall - steps, 2), "summary_overhead_s": round(summary["wall_s"] - steps, 2),
            "fid_cfg1": summary.get("metrics_cfg1", {}).get("fid_domain"),
            "fid_untrained_cfg1": summary.get("metrics_untrained_cfg1", {}).get("fid_domain"),
            "class_agreement": summary.get("metrics_cfg", {}).get("class_agreement_domain"),
            "guided_samples": summary.get("guided_samples")})
    return record


def machine() -> dict:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):       # not Linux, or no model line
        model = platform.processor() or platform.machine()
    return {"code_version": code_version(), "cpu": model, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def markdown_row(record: dict) -> str:
    """A row in the README's columns: wall time, the summary's stages, training steps and their share
    (in brackets the summary's own share), final training img/s, FID vs untrained, agreement."""
    minutes, seconds = divmod(round(record["wall_s"]), 60)
    if "stages_s" not in record:
        return f"| {record['run']} | {minutes} min {seconds} s | failed (exit status {record['exit_status']}) |"
    stages = " / ".join(f"{record['stages_s'].get(s, 0):.0f}" for s in ("encode", "tune", "train", "evaluate"))
    share = 100 * record["training_steps_s"] / record["summary_wall_s"]
    fid, fid0 = record["fid_cfg1"], record["fid_untrained_cfg1"]
    quality = f"{fid:.1f} vs {fid0:,.0f} = {100 * fid / fid0:.1f}%" if fid and fid0 else "-"
    agreement = f"{100 * record['class_agreement']:.1f}%" if record.get("class_agreement") is not None else "-"
    rate = f"{record['final_img_per_s_median']:.0f}" if record["final_img_per_s_median"] else "-"
    return (f"| {record['run']} | {minutes} min {seconds} s | {record['summary_wall_s'] / 60:.1f} min ({stages} s) | "
            f"{record['training_steps_s']:.0f} s, {100 * record['steps_share']:.0f}% ({share:.0f}%) | {rate} | "
            f"{quality} | {agreement} |")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    run_dir = (ROOT / args.run_dir).resolve()
    out = (ROOT / args.out).resolve()
    records = []
    for run in range(1, args.repeats + 1):
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [sys.executable, str(ROOT / "pipelines" / "full_run.py"), "--run-dir", str(run_dir),
                   *args.full_run_args]
        print(f"demo_timing: run {run} of {args.repeats}: {' '.join(command)}", flush=True)
        wall, status, lines, idle = timed_run(command)
        summaries = sorted(run_dir.glob("*_summary.json"))
        summary = json.loads(summaries[0].read_text()) if status == 0 and summaries else None
        record = record_of(run, wall, status, lines, idle, summary)
        append_record(out, record)
        if args.timelines:
            timeline = Path(args.timelines) / f"run-{run}.txt"
            timeline.parent.mkdir(parents=True, exist_ok=True)
            timeline.write_text("".join(f"{s:8.2f} | {line}\n" for s, line in lines)
                                + "".join(f"{s:8.1f} idle {p:5.1f}%\n" for s, p in idle))
        records.append(record)
        print(f"demo_timing: {markdown_row(record)}", flush=True)
    print("\n".join(["", "| run | wall time | summary (encode / sweep / final training / evaluation) | training steps "
                     "| final training img/s (median) | FID (CFG 1) vs untrained | agreement (CFG 5) |",
                     "| --- | --- | --- | --- | --- | --- | --- |"] + [markdown_row(r) for r in records]))
    return records


if __name__ == "__main__":
    failed = [r["run"] for r in main() if r["exit_status"] != 0]
    if failed:
        sys.exit(f"demo_timing: run(s) {', '.join(map(str, failed))} failed; their output is above and in --out")
