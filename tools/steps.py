"""Count a run's optimizer steps and saves from its flags, exactly as the trainer will (nothing is trained).

    python tools/steps.py --dataset_config dataset.toml --train_batch_size 4 --gradient_accumulation_steps 2 \
        --max_train_epochs 10 --save_every_n_epochs 2 --num_processes 2

Takes every flag of sd3_train.py / sd3_train_network.py (and --config_file), so a launch command can be
pasted as it is. Prints images x repeats per bucket, batches per epoch, optimizer steps per epoch
(per process, after gradient accumulation), the total, the lr warmup, every save and what retention
keeps. Only image headers are read. --num_processes is the number of training processes
(accelerate launch --num_processes / GPUs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    from library.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                       epilog="All other flags are the trainers' (see python sd3_train_network.py --help).")
    p.add_argument("--num_processes", type=int, default=1, help="training processes (GPUs), default 1")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return p


def plan_of(ns: argparse.Namespace, trainer_argv: list[str]) -> dict:
    from library.cli import data as data_flags
    from library.cli.train import parse_train_args
    from library.data.dataset import TrainingData
    from library.data.debug_view import bucket_report
    from library.errors import UserError
    from library.training.engine import save_policy
    from library.training.schedulers import resolve_steps
    from library.training.step_plan import kept_outputs, plan_steps, save_events

    if ns.num_processes < 1:
        raise UserError(f"--num_processes must be at least 1, got {ns.num_processes}")
    cfg, train_ns = parse_train_args(trainer_argv, network=True)
    data = TrainingData(data_flags.dataset_blueprint(train_ns), seed=cfg.train.seed or 0)
    if not data.samples:
        raise UserError("the dataset has no readable images; check --dataset_config / --train_data_dir")
    plan = plan_steps(data, processes=ns.num_processes, accumulation=cfg.train.gradient_accumulation_steps,
                      max_train_steps=cfg.train.max_train_steps, max_train_epochs=cfg.train.max_train_epochs)
    policy = save_policy(cfg)
    events = save_events(policy, plan, final_state=cfg.save.save_state_on_train_end)
    total = plan.total_steps
    return {
        "buckets": bucket_report(data).splitlines()[1:-1],
        "batches_per_epoch": plan.batches_per_epoch, "batches_per_process": plan.batches_per_process,
        "processes": plan.processes, "gradient_accumulation_steps": plan.accumulation,
        "steps_per_epoch": plan.steps_per_epoch, "total_steps": total, "epochs": plan.epochs,
        "by": "max_train_epochs" if cfg.train.max_train_epochs else "max_train_steps",
        "warmup_steps": resolve_steps(cfg.optimizer.lr_warmup_steps, total, "--lr_warmup_steps"),
        "saves": [{"step": e.step, "kind": e.kind, "name": e.name, "state": e.state} for e in events],
        "kept": kept_outputs(policy, events),
        "validation_split_note": any(s.validation_split for s in data.blueprint.datasets) and cfg.train.seed is None,
    }


def report(plan: dict) -> list[str]:
    lines = list(plan["buckets"])
    lines.append(f"batches per epoch: {plan['batches_per_epoch']}; per process ({plan['processes']}): "
                 f"{plan['batches_per_process']}")
    lines.append(f"optimizer steps per epoch: {plan['steps_per_epoch']} "
                 f"(gradient accumulation {plan['gradient_accumulation_steps']})")
    lines.append(f"total optimizer steps: {plan['total_steps']} over {plan['epochs']} epoch(s) (set by --{plan['by']})")
    lines.append(f"lr warmup: {plan['warmup_steps']} steps")
    saves = plan["saves"]
    shown = saves if len(saves) <= 12 else saves[:5] + [None] + saves[-5:]
    lines.append(f"saves ({len(saves)}):")
    for save in shown:
        lines.append("  ..." if save is None else f"  step {save['step']:>7} {save['kind']:>5}: {save['name']}"
                     + (f" + {save['state']}/" if save["state"] else ""))
    lines.append(f"kept at the end ({len(plan['kept'])}): " + ", ".join(plan["kept"]))
    if plan["validation_split_note"]:
        lines.append("note: validation_split without --seed: the held-out images, and so the counts, can vary per run")
    return lines


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    ns, rest = build_parser().parse_known_args(argv)

    def run() -> None:
        plan = plan_of(ns, rest)
        print(json.dumps(plan, sort_keys=True) if ns.json else "\n".join(report(plan)))

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
