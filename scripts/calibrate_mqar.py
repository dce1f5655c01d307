"""Calibrate the MQAR task: train one configuration for several seeds and print accuracy per seed and wall time.

Usage (one thread, as the quality suite runs)::

    PYTHONPATH=$PWD python scripts/calibrate_mqar.py            # the calibrated default, full, seeds 0 1 2
    PYTHONPATH=$PWD python scripts/calibrate_mqar.py --variant window --params '{"window_size": 8}'

    # a state-size curve (efficient_attn.quality.curves.run_curve): the variant's capacity knob over values
    PYTHONPATH=$PWD python scripts/calibrate_mqar.py --variant window --curve 4 8 16 32 64

Every run ends with one markdown table row (settings and results) to paste into
``reports/quality/mqar_calibration.md``; ``--log-every N`` prints the training loss every N steps (where the
induction-style solution appears, the loss falls from ln(num_values) towards 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from efficient_attn.quality.curves import MQAR_SEQ_LEN, MQAR_TRAIN
from efficient_attn.quality.tasks import MQAR_DEFAULTS
from efficient_attn.quality.train import TrainConfig, train_and_evaluate


def run_curve_command(
    args: argparse.Namespace, config: TrainConfig, task_params: dict, params: dict
) -> None:
    """Print one markdown row per knob value (mean ± std over the seeds, every seed's accuracy)."""
    from efficient_attn.quality.curves import run_curve

    if args.seeds != list(range(len(args.seeds))):
        raise SystemExit("--curve runs seeds 0 .. N-1: pass --seeds 0 1 2 ...")

    def show(row: dict) -> None:
        accuracies = " / ".join(f"{100 * a:.1f}" for a in json.loads(row["accuracies"]))
        print(
            f"| {row['variant']} {row['knob']}={row['value']} {row['attention_params']} | {row['status']} | "
            f"{accuracies} | {100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f} | "
            f"{row['train_s_mean']:.0f} | {row['note']} |",
            flush=True,
        )

    started = time.perf_counter()
    run_curve(args.variant, args.curve, seq_len=args.seq_len, config=config, param=args.knob,
              seeds=len(args.seeds), attention_params=params, task_params=task_params, on_row=show)
    print(f"curve done in {time.perf_counter() - started:.0f} s wall")


def parse_args() -> argparse.Namespace:
    defaults = MQAR_TRAIN  # the calibrated default: running with no options reproduces it
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="full")
    parser.add_argument("--params", default="{}", help="attention parameters as JSON, e.g. '{\"window_size\": 8}'")
    parser.add_argument("--seq-len", type=int, default=MQAR_SEQ_LEN)
    parser.add_argument("--num-pairs", type=int, default=MQAR_DEFAULTS["num_pairs"])
    parser.add_argument("--num-keys", type=int, default=MQAR_DEFAULTS["num_keys"])
    parser.add_argument("--num-values", type=int, default=MQAR_DEFAULTS["num_values"])
    parser.add_argument("--num-queries", type=int, default=None)
    parser.add_argument("--dim", type=int, default=defaults.dim)
    parser.add_argument("--depth", type=int, default=defaults.depth)
    parser.add_argument("--heads", type=int, default=defaults.num_heads)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup", type=int, default=defaults.warmup_steps)
    parser.add_argument("--positional", default=defaults.positional)
    parser.add_argument("--eval-size", type=int, default=defaults.eval_size)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--curve", type=int, nargs="+", default=None,
                        help="run the variant's capacity-knob curve over these values (seeds = --seeds count)")
    parser.add_argument("--knob", default=None, help="parameter the curve sweeps (default: the variant's KNOBS entry)")
    parser.add_argument("--log-every", type=int, default=0, help="print the training loss every N steps (0: never)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig(
        dim=args.dim,
        depth=args.depth,
        num_heads=args.heads,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        eval_size=args.eval_size,
        positional=args.positional,
    )
    task_params = {
        "num_pairs": args.num_pairs,
        "num_keys": args.num_keys,
        "num_values": args.num_values,
        "num_queries": args.num_queries,
    }
    params = json.loads(args.params)
    if args.curve is not None:
        run_curve_command(args, config, task_params, params)
        return
    accuracies, walls = [], []
    for seed in args.seeds:
        def log(step: int, loss: float, seed: int = seed) -> None:
            if args.log_every and step % args.log_every == 0:
                print(f"  seed {seed} step {step} loss {loss:.3f}", flush=True)

        started = time.perf_counter()
        result = train_and_evaluate(
            args.variant, "mqar", args.seq_len, seed, config, params, task_params=task_params, on_step=log
        )
        wall = time.perf_counter() - started
        accuracies.append(result.accuracy)
        walls.append(wall)
        print(
            f"seed {seed}: accuracy {result.accuracy:.4f} (chance-level majority {result.majority_accuracy:.3f}), "
            f"final loss {result.final_loss:.3f}, {wall:.1f} s wall, {result.train_cpu_s:.1f} s CPU, "
            f"{result.steps_per_s:.1f} steps/s",
            flush=True,
        )
    mean = statistics.fmean(accuracies)
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    settings = (
        f"{args.variant} {json.dumps(params) if params else ''} n={args.seq_len} P={args.num_pairs} "
        f"K={args.num_keys} V={args.num_values} Q={args.num_queries or args.num_pairs} d={args.dim} L={args.depth} "
        f"h={args.heads} pos={args.positional} B={args.batch_size} steps={args.steps} lr={args.lr:g} "
        f"wd={args.weight_decay:g} warmup={args.warmup}"
    )
    per_seed = " / ".join(f"{100 * a:.1f}" for a in accuracies)
    print(f"| {settings} | {per_seed} | {100 * mean:.1f} ± {100 * std:.1f} | {statistics.fmean(walls):.0f} |")


if __name__ == "__main__":
    main()
