"""The ablation ladder, measured out of fold on the same frozen folds.

    python -m entrep.ablate --config C.yaml [--data DIR] [--name NAME] [--seeds N] [key=value ...]

Each rung switches one more component on and writes its own run directory under
runs/<name>_ablation/<rung>/. Rungs that change only scoring settings (slerp retrieval, flip TTA,
re-ranking, WiSE-FT scales, the known-pair memory) reuse the previous rung's trained folds and are
re-scored from its OOF files (what those lack, extra WiSE scales or the memory, is embedded from the
saved fold weights; nothing is retrained). Finished rungs are reused on a re-run while their resolved
config is unchanged, and run again otherwise. The table goes to ablation.md / ablation.csv / ablation.png.
--seeds N climbs the ladder once per training seed (under seed<i>/, the same frozen folds) and reports
each rung's mean and standard deviation over the seeds: a rung's gain inside that band is noise.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pandas as pd
from rich.table import Table

from entrep import rundir
from entrep.cli import console, parser, setup_logging
from entrep.commands.train import main as train_main
from entrep.commands.train import parse
from entrep.config import SCORING_KEYS, Config, in_keys, load_config, parse_override, to_dict
from entrep.io import atomic_files, atomic_write_json, kit_file, read_json


def default_ladder(cfg: Config) -> tuple[list[str], dict[str, list[str]]]:
    """(everything off, cumulative rungs), each rung restoring one component at the config's own values."""
    c = cfg
    base = ["model.lora.enabled=false", "model.lora.train_last_blocks=2", "model.fusion.enabled=false",
            "model.prompts=false", "loss.prompt=0", "loss.text=0", "loss.image=0", "model.slerp.train=false",
            "model.slerp.infer=false", "infer.tta_flip=false", "rerank.methods=[]"]
    rungs = {
        "1_baseline": [],
        "2_lora": ["model.lora.enabled=true", "model.lora.train_last_blocks=0"],
        "3_fusion": ["model.fusion.enabled=true"],
        "4_prompts_joint_loss": ["model.prompts=true", f"loss.prompt={c.loss.prompt}", f"loss.text={c.loss.text}",
                                 f"loss.image={c.loss.image}"],
        "5_slerp_train": ["model.slerp.train=true"],
        "6_slerp_retrieval": ["model.slerp.infer=true"],
        "7_flip_tta": ["infer.tta_flip=true"],
        "8_rerank": [f"rerank.methods=[{', '.join(c.rerank.methods)}]"],
    }
    return base, rungs


def recipe_rungs(root: str, pseudo_data: str | None = None, side: int = 64) -> dict[str, list[str]]:
    """The fine-tuning recipe's switches (issue 23), each rung adding one on top of the method's ladder.
    `root`: the ablation folder (the pseudo-label rung takes its labels from the last trained rung there);
    `side`: the model's own input side (the input-size rung trains at 1.5x it)."""
    rungs = {
        "9_ema": ["train.ema_decay=0.99"],
        "10_mixup_cutmix": ["train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.mix_prob=0.5"],
        "11_layer_decay": ["train.layer_decay=0.8"],
        "12_input_size": [f"model.image_size={8 * round(1.5 * side / 8)}"],  # 224 -> 336, 336 -> 504, 64 -> 96
        # inference-only rungs: they re-score rung 12's folds, embedding the extra scales out of fold
        "13_wise_ft": ["infer.wise_grid=[0.5,0.75,1.0]"],
        "14_memory": ["infer.memory_weight=[0.0,0.25,0.5,0.75]"],
    }
    if pseudo_data:  # last: its run must share the folds of the rung it learns from (every rung does)
        teacher = [rung for rung, switch in rungs.items() if not inference_only(switch)][-1]
        rungs["15_pseudo_labels"] = [f"train.pseudo_from={root}/{teacher}", f"train.pseudo_data={pseudo_data}",
                                     "train.pseudo_threshold=0.9"]
    return rungs


def rung_config(argv: list[str]) -> dict:
    """A rung's resolved config, as train.py will resolve it (JSON types): a finished rung is reused
    only while this is unchanged."""
    d = to_dict(parse(argv))
    d["train"].pop("resume")
    return json.loads(json.dumps(d))


def inference_only(overrides: list[str]) -> bool:
    return bool(overrides) and all(in_keys(parse_override(o)[0], SCORING_KEYS) for o in overrides)


def run_ladder(config: str | None, overrides: list[str], data: str | None, name: str | None,
               recipe: bool = False, pseudo_data: str | None = None, seeds: int = 1) -> pd.DataFrame:
    """The ladder under OUTPUT_DIR/NAME_ablation/, its table returned and written beside the rungs. With
    `seeds` > 1 the whole ladder runs once per training seed (train.seed, +1, ...; the same frozen folds)
    under seed<i>/, and the table gives each rung's mean over seeds and its standard deviation: the noise
    band a rung's gain must beat."""
    user = load_config(config, overrides)
    base, rungs = (user.ablation.base, user.ablation.rungs) if user.ablation.rungs else default_ladder(user)
    root = Path(user.output_dir) / f"{name or user.name}_ablation"
    side = None
    if recipe:
        from entrep.model.backbone import input_size

        side = input_size(user.model.name, user.model.pretrained, user.model.image_size)
    tables = []
    for i in range(seeds):
        here = root if seeds == 1 else root / f"seed{i}"
        if seeds > 1:
            console.rule(f"seed {i + 1}/{seeds}: train.seed={user.train.seed + i}")
        ladder = rungs | (recipe_rungs(str(here), pseudo_data, side) if recipe else {})
        seed = [f"train.seed={user.train.seed + i}"] if seeds > 1 else []
        extra = [f"output_dir={here}"] + ([f"data.root={data}"] if data else [])
        tables.append(climb(here, ladder, config, [*overrides, *seed], base, extra))
    table = tables[0] if seeds == 1 else over_seeds(tables)
    write_table(root, table)
    return table


def over_seeds(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Each rung's figures as the mean over the seeds' ladders, with `<figure>_std` (ddof=1) beside each."""
    both = pd.concat(tables)
    # a figure some seed lacks has no mean over the seeds: NaN (not the mean of the others under "seeds: N")
    out = both.groupby("rung", sort=False)[list(FIGURES)].agg(
        [("mean", lambda x: x.mean() if x.notna().all() else math.nan), ("std", "std")])
    out.columns = [c if stat == "mean" else f"{c}_std" for c, stat in out.columns]
    out = out[[c for f in FIGURES for c in (f, f"{f}_std")]].reset_index()
    rest = both.groupby("rung", sort=False).agg(trainable_params=("trainable_params", "first"),
                                                wall_s=("wall_s", "sum")).reset_index()
    return out.merge(rest, on="rung").assign(seeds=len(tables))


def climb(root: Path, rungs: dict[str, list[str]], config: str | None, overrides: list[str], base: list[str],
          extra: list[str]) -> pd.DataFrame:
    """One pass up the ladder under `root`: each rung trained (or re-scored from the previous rung's folds
    where it only changes scoring), reused while its resolved config is unchanged."""
    rows, cumulative, previous = [], [], None
    for i, (rung, switch) in enumerate(rungs.items(), 1):
        console.rule(f"rung {i}/{len(rungs)}: {rung} ({' '.join(switch) or 'everything off'})")
        cumulative += switch
        argv = ["--config", config] if config else []
        argv += ["--name", rung, *overrides, *base, *cumulative, *extra]
        run = root / rung
        reuse = previous is not None and inference_only(switch)
        resolved = rung_config(argv)
        if (run / "rung.json").is_file() and read_json(run / "rung.json").get("config") != resolved:
            print(f"{rung}: its resolved config differs from the one it ran with; running it again")
            shutil.rmtree(run)
        if not (run / "rung.json").is_file():
            t0 = time.time()
            if reuse:  # same trained folds, new inference settings: copy them and re-score from OOF
                shutil.rmtree(run, ignore_errors=True)
                shutil.copytree(previous, run, ignore=shutil.ignore_patterns("rung.json", "report.json", "config.yaml"))
            elif previous is not None and not (run / rundir.FOLDS).exists():
                run.mkdir(parents=True, exist_ok=True)
                shutil.copy(previous / rundir.FOLDS, run / rundir.FOLDS)  # the same frozen folds for every rung
            if rc := train_main(argv + ["train.resume=true"]):
                raise SystemExit(rc)
            atomic_write_json(run / "rung.json", {"overrides": switch, "reused_folds_of": previous.name if reuse
                                                  else None, "wall_s": time.time() - t0, "config": resolved})
        rows.append(row_for(rung, run))
        previous = run
    return pd.DataFrame(rows)


FIGURES = ("accuracy", "f1_macro", "i2i_R@1", "i2i_MRR", "t2i_R@1", "t2i_MRR")


def row_for(rung: str, run: Path) -> dict:
    rep = read_json(run / rundir.REPORT)
    info = read_json(run / "rung.json")
    metrics = [read_json(p) for p in sorted(run.glob("fold*/metrics.json"))]
    with kit_file(run / rundir.REPORT):
        return {
            "rung": rung,
            "accuracy": rep["classification"].get("accuracy"),
            "f1_macro": rep["classification"].get("f1_macro"),
            "i2i_R@1": rep["i2i"].get("recall@1"), "i2i_MRR": rep["i2i"].get("mrr"),
            "t2i_R@1": rep["t2i"].get("recall@1"), "t2i_MRR": rep["t2i"].get("mrr"),
            "trainable_params": metrics[0].get("trainable_params") if metrics else None,
            "wall_s": round(info["wall_s"], 1),  # training + OOF scoring; re-scoring only for reused folds
            "reused_folds_of": info["reused_folds_of"] or "",
        }


def write_table(root: Path, table: pd.DataFrame) -> None:
    """ablation.csv, .md and .png as one unit (io.atomic_files)."""
    fmt = table.copy()
    for col in [c for f in FIGURES for c in (f, f"{f}_std") if c in fmt]:
        fmt[col] = fmt[col].map(lambda v: "" if v is None or pd.isna(v) else f"{v:.3f}")
    header = "| " + " | ".join(fmt.columns) + " |\n|" + "---|" * len(fmt.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in r) + " |\n" for r in fmt.itertuples(index=False))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    cols = ["f1_macro", "i2i_MRR", "t2i_MRR"]
    width = 0.8 / len(cols)
    for j, col in enumerate(cols):
        err = table[f"{col}_std"].astype(float) if f"{col}_std" in table else None  # the spread over seeds
        ax.bar([i + j * width for i in range(len(table))], table[col].astype(float), width, label=col, yerr=err,
               capsize=2)
    ax.set_xticks([i + width for i in range(len(table))], table["rung"], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("out of fold")
    ax.legend(loc="upper left", ncols=3)
    fig.tight_layout()
    try:
        with atomic_files(root) as files:
            files.write_csv("ablation.csv", table)
            files.write_text("ablation.md", header + body)
            fig.savefig(files.path("ablation.png"), format="png", dpi=100)
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    ap = parser("python -m entrep.ablate", __doc__, config="the config every rung starts from", raw=True)
    ap.add_argument("--data", help="training release folder (overrides data.root)")
    ap.add_argument("--name", help="the ladder goes to OUTPUT_DIR/NAME_ablation/ (default: the config's name)")
    ap.add_argument("--recipe", action="store_true",
                    help="add the recipe's rungs on top: EMA, mixup+cutmix, layer decay, input size, WiSE-FT, "
                         "known-pair memory (and pseudo-labels with --pseudo-data)")
    ap.add_argument("--pseudo-data", help="with --recipe: an unlabelled test folder for the pseudo-label rung")
    ap.add_argument("--seeds", type=int, default=1, help="run the ladder once per training seed and report each "
                                                          "rung's mean and standard deviation (default 1)")
    args = ap.parse_intermixed_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: at least 1")
    setup_logging()
    table = run_ladder(args.config, list(args.overrides), args.data, args.name, args.recipe, args.pseudo_data,
                       args.seeds)
    t = Table(title="ablation (out of fold)")
    for col in table.columns:
        t.add_column(col, justify="left" if col == "rung" else "right")
    for r in table.itertuples(index=False):
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) and abs(v) <= 1 else str(v) for v in r])
    console.print(t)
    return 0
