"""The one table of bench/gpu_check.sh, from the files its steps left in OUT."""
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

out = Path(sys.argv[1])
card = (out / "card.txt").read_text().strip()
t = Table(title=f"entrep GPU check: {card}")
for col in ("check", "figure"):
    t.add_column(col, overflow="fold")
pf = json.loads((out / "preflight.json").read_text()) if (out / "preflight.json").is_file() else {}
for k in ("mixed precision", "batch", "estimate"):
    t.add_row(f"preflight {k}", str(pf.get("checks", {}).get(k, "did not run")))
for tr in pf.get("trials", []):
    t.add_row(f"preflight step, batch {tr['batch_size']}", f"{tr['img_per_s']:.1f} img/s, peak {tr['peak_mib']:,.0f} MiB"
              if tr["fits"] else "out of memory")
bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
for name, r in bench.items():
    if name.startswith(("train", "infer")):
        extra = ", ".join(f"{k} {r[k]:.3g}" for k in ("TFLOP/s", "MFU", "gpu_peak_MiB") if k in r)
        t.add_row(f"bench {name}", r.get("error") or f"{r['img/s']:,.1f} img/s" + (f", {extra}" if extra else ""))
metrics = out / "runs/gpu_check/fold0/metrics.json"
if metrics.is_file():
    m = json.loads(metrics.read_text())
    ep = m["epochs"][0]
    t.add_row("ViT-B/16 bf16, 1 fold x 1 epoch", f"{m['seconds']:.0f} s in the fold ({ep['img_per_s']:.1f} img/s "
              f"training), {(out / 'fold_wall_s.txt').read_text().strip()} s with start-up")
else:
    t.add_row("ViT-B/16 bf16, 1 fold x 1 epoch", "did not finish: see fold.txt")
t.caption = (out / "status.txt").read_text().replace("\n", "; ")
Console(width=160).print(t)
