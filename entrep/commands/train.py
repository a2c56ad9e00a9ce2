"""k-fold training: every fold (or `train.folds`) in one process, OOF report at the end.

    accelerate launch train.py --config C.yaml [--data DIR] [--name NAME] [key=value ...]
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from entrep import rundir
from entrep.cli import console, parser, setup_logging
from entrep.config import Config, ConfigError, describe, load_config, parse_override
from entrep.errors import EntrepError


def parse(argv):
    """The config: --config + overrides; without --config, an existing run's own config.yaml + overrides
    (so resuming or adding folds needs only --name and the keys that steer this invocation)."""
    ap = parser("train.py", "Fit the model with k-fold cross-validation.",
                config="YAML config; optional when --name names an existing run")
    ap.add_argument("--data", help="training release folder (overrides data.root)")
    ap.add_argument("--name", help="run name: the run directory is output_dir/NAME")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config, every key with its help, and exit")
    args = ap.parse_intermixed_args(argv)
    extra = ([f"data.root={args.data}"] if args.data else []) + ([f"name={args.name}"] if args.name else [])
    base = args.config
    if base is None:
        given = dict(parse_override(o) for o in args.overrides)
        run = Path(str(given.get("output_dir", Config.output_dir))) / (args.name or Config.name)
        if not (run / rundir.CONFIG).is_file():
            raise ConfigError(f"--config is required for a new run ({run} has no config.yaml)")
        base = run / rundir.CONFIG
    cfg = load_config(base, list(args.overrides) + extra)
    if args.print_config:
        print(describe(cfg))
        raise SystemExit(0)
    return cfg


def main(argv=None) -> int:
    run_in_process(argv)
    return 0


def refuse_run_dir(cfg) -> None:
    """Before anything is written: a blend's folder is not a run, and a run folder inside the release
    would be read back as training data (its submission/cls.json is a cls.json)."""
    if rundir.is_blend(cfg.run_dir):
        raise EntrepError(f"{cfg.run_dir} is a blend (it holds {rundir.BLEND}), not a training run; give the run "
                          f"another --name")
    data, out = Path(cfg.data.root).resolve(), Path(cfg.output_dir).resolve()
    if out == data or data in out.parents:
        raise EntrepError(f"output_dir={cfg.output_dir} lies inside the training release {cfg.data.root}: the kit would "
                          f"read its own outputs (submission/cls.json) as annotations; put runs elsewhere, e.g. "
                          f"output_dir=runs")


def run_in_process(argv, library: bool = False) -> list:
    """train.py's work in this process (what `entrep.train_fold` calls too, `library`): the folds it trained."""
    cfg = parse(argv)
    refuse_run_dir(cfg)
    from entrep.model.backbone import set_offline

    set_offline(cfg.model.offline)  # before anything imports huggingface_hub
    from entrep import training  # torch, open_clip, accelerate: after the arguments are known good

    # run-level files and each fold are held by one call at a time (entrep/training.py run_files, fold_held)
    share, picked = training.fold_share(cfg)  # train.parallel=folds: before any Accelerator, out of the launch's group
    accelerator = training.run_accelerator(cfg)
    setup_logging(accelerator.is_main_process, library)
    if picked:
        training.log.info(picked)
    training.check_launch(accelerator)
    training.start_trackers(accelerator, cfg)
    results, report = training.train_run(cfg, accelerator, console, started=call_started(), share=share)
    if report is not None:
        figures = {"oof/accuracy": report["classification"].get("accuracy"),
                   "oof/f1_macro": report["classification"].get("f1_macro"),
                   "oof/i2i_mrr": report["i2i"].get("mrr"), "oof/t2i_mrr": report["t2i"].get("mrr")}
        accelerator.log({k: v for k, v in figures.items() if v is not None})
        accelerator.end_training()
        print_report(report, cfg.run_dir)
    if accelerator.is_main_process and (timing := cfg.run_dir / rundir.TIMING).is_file():
        t = json.loads(timing.read_text())
        console.print(f"wall time {t['total_s']:.0f} s, {t['outside_train_steps']:.0%} of it outside train steps "
                      f"({', '.join(f'{k} {v:.0f} s' for k, v in sorted(t['stages'].items(), key=lambda kv: -kv[1])[:4])}"
                      f"): {timing}", highlight=False)
    return results


_calls = [0]  # train.py calls made in this process so far (the ablation ladder and entrep.train_fold make several)


def call_started() -> float:
    """When this call's start-up began: the process's start for its first call (the interpreter and
    imports count), now for a later one (an ablation rung counts itself, not the rungs before it)."""
    import psutil

    _calls[0] += 1
    return psutil.Process().create_time() if _calls[0] == 1 else time.time()


def print_report(rep: dict, run_dir) -> None:
    from rich.table import Table

    from entrep.settings import Settings

    t = Table(title="out-of-fold scores")
    for col in ("task", "metric", "value"):
        t.add_column(col, justify="right" if col == "value" else "left")
    for m in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted"):
        if m in rep["classification"]:
            t.add_row("classification", m, f"{rep['classification'][m]:.4f}")
    for track in ("i2i", "t2i"):
        r = rep[track]
        for m in ("recall@1", "recall@5", "recall@10", "mrr"):
            if m in r:
                t.add_row(track, m, f"{r[m]:.4f}")
        t.add_row(track, "queries", str(r.get("n_queries", 0)) + (f" ({r['n_groups']} fold captions, each weighed "
                                                                     f"once)" if "n_groups" in r else ""))
    if "recall@1" in rep.get("t2i_pairs", {}):
        t.add_row("t2i, every pair once", "recall@1 / mrr", f"{rep['t2i_pairs']['recall@1']:.4f} / "
                                                            f"{rep['t2i_pairs']['mrr']:.4f} (a caption of k images "
                                                            f"counts k times)")
    if "recall@1" in rep.get("t2i_any", {}):
        t.add_row("t2i, any carrier", "recall@1 / mrr", f"{rep['t2i_any']['recall@1']:.4f} / {rep['t2i_any']['mrr']:.4f} "
                                                        f"(not the leaderboard's rule)")
    tuned = Settings.parse(rep.get("tuned", {}))
    per_track = "; ".join(f"{tr}: alpha={tuned.track(tr).alpha} re-ranking {list(tuned.track(tr).rerank) or 'none'}"
                          for tr in ("i2i", "t2i"))
    t.caption = (f"{run_dir}. Figures cross-fitted (each fold scored with settings tuned on the others; report.json "
                 f"'how'). For infer.py, tuned on all folds: head_weight={tuned.head_weight}; {per_track}")
    console.print(t)
