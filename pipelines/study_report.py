"""The study's report: a row per run and evaluation point from MLflow, results.csv, mean and spread over
seeds, summary.md with its verdicts, and the FID plots."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from pipelines.study_plan import PAPER

# ---------------------------------------------------------------------------------------------
# Results: CSV, summary, plots
# ---------------------------------------------------------------------------------------------

METRICS = ("fid", "sfid", "is", "precision", "recall", "class_agreement")
LOSSES = ("loss_gen", "loss_mae", "loss_cls", "loss_patch", "loss_repa", "target_entropy_cls", "target_entropy_patch",
          "agreement_cls", "agreement_patch", "teacher_cls_token_std", "teacher_cls_logit_std", "loss_layersync",
          "loss_dispersive", "loss_sra", "sra_cosine", "loss_unmasked", "loss_masked_patches")


def collect_rows(client, run_id: str, run: dict, plan: dict) -> list[dict]:
    """A row per evaluation point of one run, from its MLflow metric history (complete across restarts)."""
    suffix = plan["extractor"]
    keys = {f"proxy_{m}_{suffix}": m for m in METRICS} | {k: k for k in LOSSES} | {"images_per_s": "images_per_s"}
    history = {name: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key, name in keys.items()}
    batch = plan["base"].optim.batch_size
    rows, train_seconds = [], 0.0
    for step in sorted(history["fid"]):
        # the loop's img/s excludes evaluation time, so this is the training wall clock
        train_seconds += plan["every"] * batch / max(history["images_per_s"].get(step, float("nan")), 1e-9)
        row = {"study": plan["name"], "arm": run["arm"], "seed": run["seed"], "step": step,
               "images_seen": step * batch, "train_seconds": round(train_seconds, 2)}
        row.update({name: values.get(step, "") for name, values in history.items()})
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = ["study", "arm", "seed", "step", "images_seen", "train_seconds", *METRICS, *LOSSES, "images_per_s"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def aggregate(rows: list[dict], arms: list[str]) -> dict:
    """{arm: {images_seen: {column: (mean, std, n)}}} over seeds."""
    out = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        out[arm] = {}
        for images in sorted({r["images_seen"] for r in mine}):
            at = [r for r in mine if r["images_seen"] == images]
            stats = {}
            for column in ("train_seconds", *METRICS, *LOSSES, "images_per_s"):
                values = np.array([float(r[column]) for r in at if r[column] != ""], dtype=float)
                if len(values):
                    stats[column] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                     len(values))
            out[arm][images] = stats
    return out


def exceeds_spread(a: tuple, b: tuple) -> bool:
    """Whether two arms' means differ by more than twice the standard error of the difference over seeds."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if na < 2 or nb < 2:
        return False
    return abs(ma - mb) > 2 * math.sqrt(sa ** 2 / na + sb ** 2 / nb)


def fmt(stat: tuple | None, digits: int = 2) -> str:
    return "n/a" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def arms_without_cls_signal(rows: list[dict], arms: list[str], num_prototypes: int) -> list[str]:
    """The arms with a CLS term whose every recorded CLS target entropy (every seed, every point) is ln K."""
    from sddit.diagnostics import cls_carries_no_signal
    return [arm for arm in arms if cls_carries_no_signal(
        [r["target_entropy_cls"] for r in rows if r["arm"] == arm and r["target_entropy_cls"] != ""], num_prototypes)]


def write_summary(path: Path, plan: dict, args, agg: dict, outcomes: dict, flat_cls: list[str] = ()) -> None:
    """`flat_cls`: arms flagged by arms_without_cls_signal."""
    from sddit.diagnostics import NO_SIGNAL_TOLERANCE
    arms, suffix = plan["arms"], plan["extractor"]
    lines = [f"# Study `{plan['name']}`", "",
             f"Arms: {', '.join(arms)}; seeds 0..{args.seeds - 1}; {plan['images']} images per run "
             f"({plan['steps']} steps at batch {plan['base'].optim.batch_size}); evaluated every {plan['every']} "
             f"steps on {args.eval_samples} samples, {args.eval_heun_steps} Heun steps, CFG 1, {suffix} extractor "
             f"(judge and reference: {args.reference or args.data}). Base preset `{plan['preset']}`"
             + (f" with {' '.join(args.overrides)}" if args.overrides else "") + f"; data {args.data} at "
             f"{plan['base'].data.resolution} px, {plan['base'].model.input_size ** 2 // plan['base'].model.patch_size ** 2}"
             f" tokens. Values are mean ± standard deviation over seeds.", ""]
    judge = plan.get("judge") or {}
    if "weights_sha256" in judge:
        lines += [f"Judge: the domain classifier with weights sha256 `{judge['weights_sha256'][:12]}`, held-out "
                  f"accuracy {judge['held_out_accuracy']:.3f}. FIDs compare only with runs scored by this judge "
                  f"(the same checksum): a judge trained on the same images in another order scales FID otherwise.",
                  ""]
    if plan["name"] in PAPER:
        lines += [f"Paper: {PAPER[plan['name']]}.", ""]
    if plan["pretrain"]:
        pre = plan["pretrain"]
        lines += [f"The -transfer arms start from a run of their family at {pre['resolution']} px ({pre['images']} "
                  f"images, {pre['steps']} steps, on {args.pretrain_data}), its position table resampled onto the "
                  f"{plan['base'].data.resolution} px grid; that pre-training is extra compute, not in 'images seen'.",
                  ""]
    failed = {label: o for label, o in outcomes.items() if o["status"] != "completed"}
    if failed:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- `{label}`: {o['status']} at step {o['last_step']}" + (f": {o['error']}" if o.get("error") else "")
                  + (f" ({o['note']})" if o.get("note") else "")
                  for label, o in sorted(failed.items())]
        lines += [""]
    lines += [f"## FID ({suffix}) vs images seen", "", "| images | " + " | ".join(arms) + " |",
              "| --- |" + " --- |" * len(arms)]
    points = sorted({images for arm in arms for images in agg[arm]})
    for images in points:
        lines.append(f"| {images} | " + " | ".join(fmt(agg[arm].get(images, {}).get("fid")) for arm in arms) + " |")
    final = {arm: agg[arm][max(agg[arm])] for arm in arms if agg[arm]}
    lines += ["", f"## At the last point ({max(points) if points else 0} images)", "",
              "| arm | seeds | FID | sFID | precision | recall | class agreement | loss_gen | loss_cls (ln K = "
              f"{math.log(plan['base'].model.head_out_size):.3f}) | target entropy CLS | teacher CLS token std | "
              "teacher CLS logit std | loss_patch | target entropy patch | agreement CLS | loss_repa (-cos) | "
              "loss_layersync (-cos) | loss_dispersive | SRA cos | MDT loss_unmasked | MDT loss_masked_patches | "
              "img/s | train s |",
              "| --- |" + " --- |" * 22]
    for arm, stats in final.items():
        cells = [str(stats.get("fid", (0, 0, 0))[2])] + [
            fmt(stats.get(c), d) for c, d in (("fid", 2), ("sfid", 2), ("precision", 3), ("recall", 3),
                                              ("class_agreement", 3), ("loss_gen", 4), ("loss_cls", 4),
                                              ("target_entropy_cls", 4), ("teacher_cls_token_std", 4),
                                              ("teacher_cls_logit_std", 4), ("loss_patch", 4),
                                              ("target_entropy_patch", 4), ("agreement_cls", 3), ("loss_repa", 3),
                                              ("loss_layersync", 3), ("loss_dispersive", 3), ("sra_cosine", 3),
                                              ("loss_unmasked", 4), ("loss_masked_patches", 4),
                                              ("images_per_s", 0), ("train_seconds", 0))]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if flat_cls:
        lines += ["", f"**CLS term carries no signal** in {', '.join(flat_cls)}: every recorded CLS target entropy "
                      f"(each seed, each evaluation point) lies within {NO_SIGNAL_TOLERANCE} of ln K, so the teacher's "
                      f"CLS targets were uniform and that term trained nothing image-specific."]
    lines += ["", "## Differences at the last point", "",
              "A difference *exceeds the seed spread* when |mean a - mean b| > 2 sqrt(s_a^2/n_a + s_b^2/n_b) "
              "(twice the standard error of the difference; s over seeds). Lower FID is better.", ""]
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            if a in final and b in final and "fid" in final[a] and "fid" in final[b]:
                fa, fb = final[a]["fid"], final[b]["fid"]
                verdict = "exceeds the seed spread" if exceeds_spread(fa, fb) else "within the seed spread"
                better = a if fa[0] < fb[0] else b
                lines.append(f"- {a} vs {b}: FID {fa[0]:.2f} vs {fb[0]:.2f} (difference {fa[0] - fb[0]:+.2f}); "
                             f"{better} lower, {verdict}")
    path.write_text("\n".join(lines) + "\n")


def plot(agg: dict, arms: list[str], x_key: str, path: Path, xlabel: str, suffix: str) -> Path:
    """Mean FID per arm, with a band of ± one standard deviation over seeds, against images seen or wall clock."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        points = [(images, s) for images, s in sorted(agg[arm].items()) if "fid" in s]
        if not points:
            continue
        x = [images if x_key == "images" else s["train_seconds"][0] for images, s in points]
        mean = np.array([s["fid"][0] for _, s in points])
        std = np.array([s["fid"][1] for _, s in points])
        ax.plot(x, mean, marker="o", label=arm)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"FID ({suffix}, CFG 1)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(args, plan: dict, client, done: dict, parent_run_id: str, outcomes: dict, out: Path) -> dict:
    """`done`: evaluated_steps() after the grid; each run's rows come from its MLflow history."""
    import mlflow
    from PIL import Image

    rows = []
    for label, (run_id, _) in done.items():
        if run_id:
            rows += collect_rows(client, run_id, plan["runs"][label], plan)
    write_csv(out / "results.csv", rows)
    agg = aggregate(rows, plan["arms"])
    write_summary(out / "summary.md", plan, args, agg, outcomes,
                  arms_without_cls_signal(rows, plan["arms"], plan["base"].model.head_out_size))
    plots = [plot(agg, plan["arms"], "images", out / "fid_vs_images.png", "images seen", plan["extractor"]),
             plot(agg, plan["arms"], "seconds", out / "fid_vs_wallclock.png", "training wall clock (s, per run)",
                  plan["extractor"])]
    with mlflow.start_run(run_id=parent_run_id, nested=mlflow.active_run() is not None):
        for artifact in ("results.csv", "summary.md", "outcomes.json"):
            mlflow.log_artifact(str(out / artifact))
        for picture in plots:
            with Image.open(picture) as image:
                mlflow.log_image(image.convert("RGB"), artifact_file=f"plots/{picture.name}")
        mlflow.log_metrics({"runs_completed": sum(o["status"] == "completed" for o in outcomes.values()),
                            "runs_failed": sum(o["status"] == "error" for o in outcomes.values())})
    return {"rows": rows, "aggregate": agg, "outcomes": outcomes, "out": str(out)}
