"""The one table of bench/gpu_check.sh, from the files its steps left in OUT; also OUT/check.json.

    python3 bench/gpu_summary.py OUT [FOLD_LABEL]

Exit 1 when a step failed or was skipped, or a bench row failed.
"""
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


out = Path(sys.argv[1])
fold_label = sys.argv[2] if len(sys.argv) > 2 else "ViT-B/16 bf16, 1 fold x 1 epoch"
card = (out / "card.txt").read_text().strip() if (out / "card.txt").is_file() else "unknown card"
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()] if (out / "steps.jsonl").is_file() else []
failed = [s["step"] for s in steps if s["exit"] != 0]
t = Table(title=f"entrep GPU check: {card}")
for col in ("check", "figure"):
    t.add_column(col, overflow="fold")
imports = load(out / "imports.json")
if imports:
    pk = imports.get("packages", {})
    versions = ", ".join(f"{n} {pk[n]['version']}" for n in ("torch", "open-clip-torch", "peft", "accelerate", "numpy")
                         if "version" in pk.get(n, {}))
    carried = ", ".join(n for n, r in pk.items() if r.get("from") == "carried") or "none"
    t.add_row("imports", f"Python {imports['python']}; {versions}; carried wheels: {carried}; "
              f"{imports['entrep_modules']} entrep modules; " +
              ("; ".join(imports["failures"]) if imports["failures"] else "all APIs present"))
pf = load(out / "preflight.json")
for k in ("mixed precision", "batch", "estimate"):
    t.add_row(f"preflight {k}", str(pf.get("checks", {}).get(k, "did not run")))
for tr in pf.get("trials", []):
    t.add_row(f"preflight step, batch {tr['batch_size']}", f"{tr['img_per_s']:.1f} img/s, peak {tr['peak_mib']:,.0f} MiB"
              if tr["fits"] else "out of memory")
metrics = out / "runs/gpu_check/fold0/metrics.json"
if metrics.is_file():
    m = json.loads(metrics.read_text())
    ep = m["epochs"][0]
    wall = (out / "fold_wall_s.txt").read_text().strip() if (out / "fold_wall_s.txt").is_file() else "?"
    t.add_row(fold_label, f"{m['seconds']:.0f} s in the fold ({ep['img_per_s']:.1f} img/s training), {wall} s with start-up")
else:
    t.add_row(fold_label, "did not finish: see fold.txt")
bench = load(out / "bench.json")
bad_rows = []
for name, r in bench.items():
    if "error" in r:
        bad_rows.append(name)
    if name.startswith(("train", "infer", "pipeline")):
        # ratio: median over rounds of row / r["ref"] timed in alternating windows, [min-max of the rounds]
        ratio = (f", {r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] x {r['ref']}"
                 if "ratio" in r else "")
        need = f", {r['feed/need']:.2g} of the {r['need_img/s']:,.0f} img/s an H100 needs" if "feed/need" in r else ""
        extra = ", ".join(f"{k} {r[k]:.3g}" for k in ("TFLOP/s", "MFU", "gpu_peak_MiB") if k in r)
        t.add_row(f"bench {name}", r.get("error") or f"{r['img/s']:,.1f} img/s" + ratio + need +
                  (f", {extra}" if extra else ""))
    elif "error" in r:
        t.add_row(f"bench {name}", r["error"])
if bad_rows:
    failed.append(f"bench rows ({', '.join(bad_rows)})")
t.caption = "; ".join(f"{s['step']} {'skipped' if s['exit'] is None else 'exit ' + str(s['exit'])} "
                      f"{s['seconds']} s" for s in steps) + f"; total {sum(s['seconds'] for s in steps)} s"
Console(width=160).print(t)
print("check: " + ("FAILED: " + ", ".join(failed) if failed else "every step passed"))
(out / "check.json").write_text(json.dumps({"card": card, "steps": steps, "failed": failed, "imports": imports,
                                            "preflight": pf, "bench": bench}, indent=1) + "\n")
sys.exit(1 if failed or not steps else 0)
