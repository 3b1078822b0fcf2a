"""Time one full training step (forward, backward, AdamW, EMA updates) of DiT, MaskDiT and SD-DiT.

Same backbone size for all three; prints img/s, counted FLOPs per image (torch.utils.flop_counter),
the activation memory of a step (bytes autograd saves for backward) and of the weights, EMA and AdamW
moments, and the SD-DiT / DiT step-time ratio, and appends a JSON record to bench/results/step_time.jsonl.
With --repa each family is also timed with REPA's term (lambda 0.5, DINOv2-B's 768-wide features on
the token grid, REPA's tap depth for the size), and the cost of the term is reported per family.

    python bench/step_time.py --size S/2 --batch-size 8 --steps 5          # CPU
    python bench/step_time.py --size S/2 --batch-size 256 --device cuda    # GPU
    python bench/step_time.py --size B/2 --batch-size 8 --repa             # the REPA term's cost
    python bench/step_time.py --size S/2 --batch-size 8 --self-supervision # LayerSync's, Dispersive Loss's, SRA's; MDT
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sddit.config import Config
from sddit.models import model_config
from sddit.training import build_training, compile_model, train_step
from bench.records import append_record
from pipelines.common import at_least

FAMILIES = ("DiT", "MaskDiT", "SD-DiT")
REPA_DEPTH = {"S": 4, "B": 4, "L": 8, "XL": 8}              # REPA's tapped block per size
REPA_FEATURES = 768                                          # DINOv2 ViT-B/14
# the study's self-supervision switches, at their references' weights (blocks from the model's depth)
SELF_SUPERVISION = {"layersync": dict(layersync_weight=0.2), "dispersive": dict(dispersive_weight=0.25),
                    "sra": dict(sra_weight=0.2)}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def count_flops_and_activations(fn, model) -> tuple[int, int]:
    """FLOPs of `fn` (one training step) and the bytes autograd keeps for its backward pass: the distinct
    storages saved by the forward, parameters excluded. That is the activation memory a step holds at its
    peak on any device, which on a CPU (no allocator statistics) is the comparable memory figure."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return counter.get_total_flops(), sum(saved.values())


def state_bytes(*modules_or_optimizers) -> int:
    """Bytes of the weights and optimiser moments that live through training (model, EMA, AdamW)."""
    total = 0
    for item in modules_or_optimizers:
        tensors = (item.parameters() if isinstance(item, torch.nn.Module) else
                   (t for state in item.state.values() for t in state.values() if torch.is_tensor(t)))
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def measure_training(name: str, *, batch_size: int, device, precision: str = "fp32", compile: bool = False,
                     input_size: int = 32, steps: int = 5, warmup: int = 2, repa: bool = False,
                     term: str | None = None) -> dict:
    """Seconds per training step of model `name` (with REPA's term if `repa`, with a self-supervision term of
    SELF_SUPERVISION if `term`), with its counted FLOPs; synthetic latents and features."""
    config = Config()
    extra = dict(SELF_SUPERVISION[term]) if term else {}
    if repa:
        size = name.split("-")[-1].split("/")[0]
        extra.update(repa_weight=0.5, repa_depth=REPA_DEPTH[size], repa_feature_dim=REPA_FEATURES)
    config.model = model_config(name, input_size=input_size, num_classes=1000, **extra)
    config.optim.batch_size = batch_size
    config.optim.precision = precision
    config.train.steps = warmup + steps + 1
    torch.manual_seed(0)
    model, optimizer, ema, schedules = build_training(config, device)
    x0 = torch.randn(batch_size, 4, input_size, input_size, device=device)
    labels = torch.randint(0, 1000, (batch_size,), device=device)
    tokens = (input_size // config.model.patch_size) ** 2
    features = torch.randn(batch_size, tokens, REPA_FEATURES, device=device).half() if repa else None

    def step(i):
        return train_step(model, optimizer, ema, x0, labels, step=i, config=config, schedules=schedules,
                          features=features)

    flops_per_step, activation_bytes = count_flops_and_activations(lambda: step(0), model)  # in eager mode
    if compile:
        compile_model(model)
    for i in range(1, warmup + 1):                          # warm-up (and compilation)
        step(i)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(warmup + 1, warmup + 1 + steps):
        result = step(i)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    row = {
        "model": name + (" + REPA" if repa else "") + (f" + {term}" if term else ""), "repa": repa, "term": term,
        "batch_size": batch_size, "precision": precision, "compile": compile,
        "step_s": seconds, "img_per_s": batch_size / seconds, "steps_per_s": 1 / seconds,
        "flops_per_step": flops_per_step, "gflops_per_image": flops_per_step / batch_size / 1e9,
        "student_params_m": sum(p.numel() for p in model.student_parameters()) / 1e6,
        "activation_mib": activation_bytes / 2**20, "state_mib": state_bytes(model, ema, optimizer) / 2**20,
        "loss_finite": bool(torch.isfinite(result.parts["loss"])),
    }
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="S/2", help="backbone size/patch shared by the three models (default S/2)")
    parser.add_argument("--batch-size", type=at_least(1), default=None, help="images per step (default 8 on CPU, 256 on GPU)")
    parser.add_argument("--input-size", type=int, default=32, help="latent side length (32 = ImageNet 256 via SD-VAE)")
    parser.add_argument("--steps", type=at_least(1), default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (one of them counted for FLOPs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32 or bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (train.compile)")
    parser.add_argument("--repa", action="store_true", help="also time each family with REPA's term")
    parser.add_argument("--self-supervision", action="store_true",
                        help=f"also time DiT with each self-supervision term ({', '.join(SELF_SUPERVISION)})")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_time.jsonl"),
                        help="JSON-lines file the record is appended to")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 8)

    rows = [measure_training(f"{family}-{args.size}", batch_size=batch_size, device=device,
                             precision=args.precision, compile=args.compile, input_size=args.input_size,
                             steps=args.steps, warmup=max(args.warmup, 1), repa=repa)
            for family in FAMILIES for repa in ((False, True) if args.repa else (False,))]
    if args.self_supervision:
        rows += [measure_training(f"DiT-{args.size}", batch_size=batch_size, device=device, precision=args.precision,
                                  compile=args.compile, input_size=args.input_size, steps=args.steps,
                                  warmup=max(args.warmup, 1), term=term) for term in SELF_SUPERVISION]
        # MDT, the study's other arm that is not DiT plus a term: its side-interpolater and second, unmasked pass
        rows.append(measure_training(f"MDT-{args.size}", batch_size=batch_size, device=device,
                                     precision=args.precision, compile=args.compile, input_size=args.input_size,
                                     steps=args.steps, warmup=max(args.warmup, 1)))
    plain = [row for row in rows if not row["repa"] and not row["term"]]
    dit, sddit = plain[0], plain[2]
    ratio = sddit["step_s"] / dit["step_s"]
    flop_ratio = sddit["gflops_per_image"] / dit["gflops_per_image"]
    print(f"device: {device_name(device)}  batch {batch_size}  precision {args.precision}  "
          f"compile {args.compile}  threads {torch.get_num_threads()}")
    print(f"{'model':<20}{'img/s':>10}{'steps/s':>10}{'GFLOPs/img':>12}{'params (M)':>12}"
          f"{'activations (MiB)':>19}{'state (MiB)':>13}")
    for row in rows:
        print(f"{row['model']:<20}{row['img_per_s']:>10.1f}{row['steps_per_s']:>10.2f}"
              f"{row['gflops_per_image']:>12.1f}{row['student_params_m']:>12.1f}"
              f"{row['activation_mib']:>19.1f}{row['state_mib']:>13.1f}")
    print(f"SD-DiT / DiT step time: {ratio:.2f}x (FLOPs {flop_ratio:.2f}x; paper: 5.03/9.2 = 0.55x)")
    record = {"device": device_name(device), "size": args.size, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "threads": torch.get_num_threads(), "sddit_over_dit_step_time": ratio,
              "sddit_over_dit_flops": flop_ratio, "rows": rows}
    if args.self_supervision:
        record["term_over_dit_step_time"] = {}
        for row in rows:
            if row["term"]:
                cost = row["step_s"] / dit["step_s"]
                record["term_over_dit_step_time"][row["term"]] = cost
                print(f"{row['term']} term on {dit['model']}: step time {cost:.2f}x, activations "
                      f"{row['activation_mib'] / dit['activation_mib']:.2f}x")
        mdt = rows[-1]
        record["mdt_over_dit_step_time"] = mdt["step_s"] / dit["step_s"]
        print(f"{mdt['model']} / {dit['model']} step time: {record['mdt_over_dit_step_time']:.2f}x, parameters "
              f"{mdt['student_params_m'] / dit['student_params_m']:.2f}x")
    if args.repa:
        record["repa_over_plain_step_time"] = {}
        with_families = [row for row in rows if not row["term"]]
        for base, with_repa in zip(with_families[0::2], with_families[1::2]):
            cost = with_repa["step_s"] / base["step_s"]
            record["repa_over_plain_step_time"][base["model"]] = cost
            print(f"REPA term on {base['model']}: step time {cost:.2f}x, FLOPs "
                  f"{with_repa['gflops_per_image'] / base['gflops_per_image']:.2f}x, +"
                  f"{with_repa['student_params_m'] - base['student_params_m']:.1f}M parameters, activations "
                  f"{with_repa['activation_mib'] / base['activation_mib']:.2f}x")
    append_record(args.out, record)


if __name__ == "__main__":
    main()
