"""report.html: one self-contained page of a run's (or blend's) out-of-fold results, for when a model
is wrong: figures per fold with their spread, learning curves, the confusion matrix, the worst-
classified images, the worst retrieval queries with their top 5, the groups the folds were built from,
the settings behind the figures, and a blend's members side by side.

It is built from the run directory's files alone, plus the release's images as inlined thumbnails,
so `python -m entrep.report RUN` rebuilds it; no network, no script, no file beside it."""
from __future__ import annotations

import base64
import html
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from entrep import rundir
from entrep.config import load_config, recipe_switches
from entrep.data.images import refuse_bomb
from entrep.io import FileSet, atomic_write_text, read_json
from entrep.model.checkpoint import fold_dir

log = logging.getLogger(__name__)

THUMB = 96            # px, the longer side of an inlined thumbnail
WORST_PER_CLASS = 4   # worst-classified images shown per true class
GROUPS_SHOWN = 12     # largest fold groups shown
GROUP_THUMBS = 10     # images shown per group
FOLD_COLUMNS = (("classification", "accuracy"), ("classification", "f1_macro"), ("i2i", "mrr"), ("i2i", "recall@1"),
                ("t2i", "mrr"), ("t2i", "recall@1"))


@dataclass
class PageData:
    """What the page shows, read from a run or blend directory."""
    run_dir: Path
    report: dict
    is_blend: bool = False
    oof: pd.DataFrame | None = None            # oof.csv: every labelled image's OOF probabilities
    folds: pd.DataFrame | None = None          # folds.csv: the groups the folds were built from
    failures: dict = field(default_factory=dict)   # failures.json: the worst OOF queries per track
    histories: dict[int, pd.DataFrame] = field(default_factory=dict)
    switches: dict[str, str] | None = None     # a run's recipe switches
    members: list[tuple[str, dict, dict | None]] = field(default_factory=list)  # a blend's (name, report, switches)
    tuned: dict = field(default_factory=dict)


NAMES = {"image": str, "label": str, "pred": str, "fold_group": str}  # names stay names: class "1", image "1e5"


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=NAMES) if path.is_file() else None


def _switches(run: Path) -> dict | None:
    return recipe_switches(load_config(run / rundir.CONFIG)) if (run / rundir.CONFIG).is_file() else None


def read_page_data(run_dir: Path, staged: dict[str, Path] | None = None, blend: dict | None = None) -> PageData:
    """The page's data from a run or blend directory; `staged` (name -> temp file): the files of a set
    being written (io.atomic_files), read in place of the folder's own; `blend`: the blend.json about to
    be written with them."""
    run_dir = Path(run_dir)

    def at(name: str) -> Path:
        return (staged or {}).get(name, run_dir / name)

    def json_or_empty(name: str) -> dict:
        return read_json(at(name)) if at(name).is_file() else {}

    if blend is None and at(rundir.BLEND).is_file():
        blend = read_json(at(rundir.BLEND))
    d = PageData(run_dir, read_json(at(rundir.REPORT)), blend is not None, _csv(at(rundir.OOF_TABLE)),
                 _csv(at(rundir.FOLDS)), json_or_empty(rundir.FAILURES), tuned=json_or_empty(rundir.TUNED))
    if blend is not None:
        for ref in blend["members"]:
            member = (run_dir / ref).resolve()
            rep = read_json(member / rundir.REPORT) if (member / rundir.REPORT).is_file() else {}
            d.members.append((member.name, rep, _switches(member)))
    else:
        d.switches = _switches(run_dir)
        for row in d.report.get("folds", []):
            if (h := _csv(fold_dir(run_dir, row["fold"]) / rundir.HISTORY)) is not None and len(h):
                d.histories[row["fold"]] = h
    return d


class Thumbs:
    """Inlined JPEG thumbnails of the release's images, each encoded once per page."""

    def __init__(self, paths: dict[str, Path] | None):
        self.paths = paths or {}
        self.cache: dict[str, str | None] = {}
        self.missing = 0

    def uri(self, name: str) -> str | None:
        if name not in self.cache:
            self.cache[name] = self._encode(self.paths.get(name))
            self.missing += self.cache[name] is None
        return self.cache[name]

    @staticmethod
    def _encode(path: Path | None) -> str | None:
        from PIL import Image, UnidentifiedImageError

        if path is None:
            return None
        try:
            with Image.open(path) as im:
                im = refuse_bomb(im).convert("RGB")
                im.thumbnail((THUMB, THUMB))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=80)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return None  # the page shows the name instead; the report's figures never depended on it
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def figure(self, name: str, caption: str = "", mark: str = "") -> str:
        uri = self.uri(name)
        img = (f'<img src="{uri}" alt="{_e(name)}" title="{_e(name)}">' if uri
               else f'<div class="noimg" title="{_e(name)}">{_e(name[:18])}</div>')
        return f'<figure class="{mark}">{img}<figcaption>{caption}</figcaption></figure>'


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _f(x, digits: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def pooled_section(rep: dict) -> str:
    rows = []
    for part in ("classification", "i2i", "t2i", "t2i_pairs", "t2i_any"):
        f = rep.get(part) or {}
        if part == "classification":
            figs = ", ".join(f"{m} {_f(f.get(m))}" for m in ("accuracy", "f1_macro", "f1_weighted") if m in f)
            n = f.get("n", 0)
        else:
            figs = ", ".join(f"{m} {_f(f.get(m))}" for m in ("mrr", "recall@1", "recall@5", "recall@10") if m in f)
            n = f.get("n_queries", 0)
        rows.append([_e(part), _e(figs or "none"), _e(n), _e(rep.get("how", {}).get(part, f.get("relevance", "")))])
    return "<h2>Out-of-fold figures, pooled</h2>" + _table(["part", "figures", "n", "how"], rows)


def fold_values(rep: dict, columns=FOLD_COLUMNS) -> np.ndarray:
    """(folds, columns) of a report's per-fold figures; NaN where a fold has none."""
    return np.array([[(row.get(p) or {}).get(m, np.nan) for p, m in columns] for row in rep.get("folds", [])],
                    float).reshape(-1, len(columns))


def fold_spread(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the mean over folds and the standard deviation (ddof=1: folds are a sample); NaN
    where no fold (or one, for the deviation) has the figure."""
    with warnings.catch_warnings():  # a part no fold scores (t2i of an image-only run) is an all-NaN column
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, 0), np.nanstd(values, 0, ddof=1)


def fold_section(rep: dict) -> str:
    """Each fold's figures, then their mean and standard deviation over folds."""
    folds = rep.get("folds", [])
    if not folds:
        return ""
    header = ["fold", "images", "labelled"] + [f"{p} {m}" for p, m in FOLD_COLUMNS]
    values = fold_values(rep)
    rows = [[_e(r["fold"]), _e(r.get("n_images", "")), _e(r.get("n_labelled", ""))] + [_f(v) for v in vals]
            for r, vals in zip(folds, values)]
    mean, std = fold_spread(values)
    rows.append(["<b>mean &plusmn; std</b>", "", ""] + [f"{_f(m)} &plusmn; {_f(s)}" if not np.isnan(m) else ""
                                                      for m, s in zip(mean, std)])
    return ("<h2>Per fold</h2><p>Each fold scored by the models that never saw it (a blend: its members' fold "
            "models, mixed) with settings tuned on the other folds; the spread over folds is the noise band a "
            "change must beat.</p>" + _table(header, rows, "num"))


def curves_section(d: PageData) -> str:
    if not d.histories:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in ("loss", "ce", "val_f1_macro") if any(c in h for h in d.histories.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3), squeeze=False)
    try:
        for ax, m in zip(axes[0], metrics):
            for k, h in sorted(d.histories.items()):
                if m in h and h[m].notna().any():
                    ax.plot(h["epoch"], h[m], marker="o", ms=3, label=f"fold {k}")
            ax.set_title(m)
            ax.set_xlabel("epoch")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
    finally:
        plt.close(fig)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<h2>Learning curves</h2><p>From each fold\'s history.csv (val_f1_macro is watched, it picks no '
            f'epoch).</p><img class="plot" src="{uri}" alt="learning curves">')


def confusion_section(rep: dict) -> str:
    cls = rep.get("classification") or {}
    if "confusion" not in cls:
        return ""
    names = list(cls["per_class"])
    cm = np.array(cls["confusion"])
    top = max(int(cm.max()), 1)
    rows = []
    for i, n in enumerate(names):
        cells = [f'<span style="background:rgba(30,90,200,{cm[i, j] / top:.2f})" class="{"diag" if i == j else ""}">'
                 f'{cm[i, j]}</span>' for j in range(len(names))]
        pc = cls["per_class"][n]
        rows.append([f"<b>{_e(n)}</b>"] + cells + [_f(pc["f1"]), _e(pc["support"])])
    return ("<h2>Confusion matrix</h2><p>Rows: true class; columns: predicted, out of fold.</p>"
            + _table(["true \\ predicted", *names, "F1", "support"], rows, "cm"))


def worst_classified_section(d: PageData, thumbs: Thumbs) -> str:
    if d.oof is None or not len(d.oof):
        return ""
    out = ["<h2>Worst-classified images</h2><p>Per true class, the images its fold's model gave the lowest "
           "probability of their class.</p>"]
    for label, rows in d.oof.groupby("label", sort=True):
        p_true = rows.apply(lambda r: r[f"p_{r['label']}"], axis=1)
        worst = rows.assign(p_true=p_true).sort_values("p_true").head(WORST_PER_CLASS)
        figs = [thumbs.figure(r["image"], f"fold {r['fold']}<br>p({_e(label)}) {r['p_true']:.2f}<br>&rarr; "
                                          f"{_e(r['pred'])} {r['p_' + r['pred']]:.2f}", "" if r["pred"] == label else "wrong")
                for r in worst.to_dict("records")]
        out.append(f'<h3>{_e(label)}</h3><div class="row">{"".join(figs)}</div>')
    return "".join(out)


def worst_queries_section(d: PageData, thumbs: Thumbs, track: str) -> str:
    cases = d.failures.get(track) or []
    if not cases:
        return ""
    out = [f"<h2>Worst {track} queries</h2><p>Out of fold: the query, its top 5 (green: a right answer) and "
           "the right answers. Rank '&gt; 10' means none in the ranked top 10.</p>"]
    for c in cases:
        rank = c["rank"] if c["rank"] is not None else "&gt; 10"
        query = (thumbs.figure(c["query"], "query") if track == "i2i"
                 else f'<div class="caption">&ldquo;{_e(c["query"])}&rdquo;</div>')
        top = "".join(thumbs.figure(n, f"#{i}", "right" if n in c["relevant"] else "")
                      for i, n in enumerate(c["top"], 1))
        right = "".join(thumbs.figure(n, "right answer", "right") for n in c["relevant"][:3])
        out.append(f'<div class="case"><div class="meta">fold {c["fold"]}, rank {rank}</div>{query}'
                   f'<span class="sep">&rarr;</span>{top}<span class="sep">|</span>{right}</div>')
    return "".join(out)


def groups_section(d: PageData, thumbs: Thumbs) -> str:
    if d.folds is None or "fold_group" not in d.folds:
        return ""
    sizes = d.folds["fold_group"].value_counts()
    sizes = sizes[sizes > 1]
    shape = d.report.get("grouping") or {}
    cap = f" (a group over {shape['cap']} images is split further)" if "cap" in shape else ""
    out = [f"<h2>Groups the folds were built from</h2><p>{len(sizes)} groups of alike images (i2i links, patients, "
           f"near-duplicates) hold {int(sizes.sum())} of {len(d.folds)} images; each group sits in one fold. "
           f"Largest first{cap}. Judge them: a group of images that "
           "are not alike leaks nothing but costs folds balance; alike images in two groups leak.</p>"]
    for g in sizes.index[:GROUPS_SHOWN]:
        rows = d.folds[d.folds["fold_group"] == g]
        figs = "".join(thumbs.figure(r["image"], _e(r["label"])) for r in rows.head(GROUP_THUMBS).to_dict("records"))
        more = f'<span class="sep">+{len(rows) - GROUP_THUMBS} more</span>' if len(rows) > GROUP_THUMBS else ""
        out.append(f'<h3>group {_e(g)}: {len(rows)} images, fold {_e(rows["fold"].iloc[0])}</h3>'
                   f'<div class="row">{figs}{more}</div>')
    return "".join(out)


def settings_section(d: PageData) -> str:
    out = []
    if d.switches:
        out.append("<h2>Recipe switches</h2>" + _table(["switch", "value"], [[_e(k), _e(v)]
                                                                           for k, v in d.switches.items()]))
    rows = [[_e(r["fold"]), f"<code>{_e(r.get('settings', ''))}</code>"] for r in d.report.get("folds", [])]
    if rows:
        out.append("<h2>Settings that scored each fold</h2><p>Chosen on the other folds (cross-fitted).</p>"
                   + _table(["fold", "settings"], rows))
    if versions := d.report.get("versions"):
        out.append("<h2>Versions</h2>" + _table(["package", "version"], [[_e(k), _e(v)] for k, v in versions.items()]))
    return "".join(out)


def members_section(d: PageData) -> str:
    """A blend's members side by side with their weights, and what a weight is."""
    if not d.members:
        return ""
    weights = d.tuned.get("weights", {})
    header = ["member", "accuracy", "f1_macro", "i2i mrr", "t2i mrr", "weight cls", "weight i2i", "weight t2i"]
    rows = []
    for i, (name, rep, _) in enumerate(d.members):
        figs = [(rep.get(p) or {}).get(m) for p, m in (("classification", "accuracy"), ("classification", "f1_macro"),
                                                       ("i2i", "mrr"), ("t2i", "mrr"))]
        w = [weights.get(p, [None] * len(d.members))[i] for p in ("cls", "i2i", "t2i")]
        rows.append([_e(name)] + [_f(x) for x in figs] + [_f(x, 2) for x in w])
    rep = d.report
    rows.append(["<b>blend</b>"] + [_f((rep.get(p) or {}).get(m)) for p, m in (
        ("classification", "accuracy"), ("classification", "f1_macro"), ("i2i", "mrr"), ("t2i", "mrr"))] + ["", "", ""])
    switches = [n for n, _, s in d.members if s]
    diff = ""
    if len(switches) > 1:
        sw = {n: s for n, _, s in d.members if s}
        keys = [k for k in next(iter(sw.values())) if len({s.get(k) for s in sw.values()}) > 1]
        diff = ("<h3>Where the members differ</h3>" + _table(["switch", *sw], [[_e(k)] + [_e(s.get(k)) for s in
                                                                                          sw.values()] for k in keys]))
    return ("<h2>Members</h2><p>A weight is a member's share of the ensemble-selection picks on the out-of-fold "
            "mix (probabilities for cls, similarities for i2i and t2i): what the mix needed, not how good the "
            "member is alone. A member with near-uniform probabilities moves the mix little per unit of weight, "
            "so it can take a large weight and still count for little; read each member's own figures beside it."
            "</p>" + _table(header, rows, "num") + diff)


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:14px;margin:10px 0 4px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;
vertical-align:top}table.num td{text-align:right}table.cm td span{display:block;min-width:28px;text-align:center}
table.cm td span.diag{font-weight:bold}.row,.case{display:flex;flex-wrap:wrap;gap:6px;align-items:center;margin:4px 0}
figure{margin:0;text-align:center;font-size:11px;border:3px solid transparent}figure.wrong{border-color:#d33}
figure.right{border-color:#2a2}figure img{display:block;max-width:96px;max-height:96px}
.noimg{width:96px;height:64px;background:#eee;font-size:10px;overflow:hidden;word-break:break-all}
.caption{flex:0 0 260px;font-style:italic}.meta{flex:0 0 110px;font-size:12px;color:#555}.sep{color:#888;padding:0 6px}
img.plot{max-width:100%}code{font-size:11px}
"""


def render(d: PageData, thumbs: Thumbs) -> str:
    kind = "blend" if d.is_blend else "run"
    body = [pooled_section(d.report), fold_section(d.report), members_section(d), curves_section(d),
            confusion_section(d.report), worst_classified_section(d, thumbs),
            worst_queries_section(d, thumbs, "i2i"), worst_queries_section(d, thumbs, "t2i"),
            groups_section(d, thumbs), settings_section(d)]
    note = (f"<p class='meta'>{thumbs.missing} images could not be shown (the release was not found or not "
            f"readable): their names stand in.</p>" if thumbs.missing else "")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(d.run_dir.name)}: "
            f"out-of-fold report</title><style>{CSS}</style></head><body><h1>{_e(d.run_dir.name)} ({kind}): "
            f"out-of-fold report</h1>{note}{''.join(body)}</body></html>\n")


def write_page(run_dir: Path, image_paths: dict[str, Path] | None) -> Path:
    """report.html from the run directory's files; `image_paths`: image name -> file, for thumbnails."""
    path = Path(run_dir) / rundir.PAGE
    atomic_write_text(path, render(read_page_data(run_dir), Thumbs(image_paths)))
    return path


def write_page_into(files: FileSet, image_paths: dict[str, Path] | None, blend: dict | None = None) -> None:
    """report.html into the set being written (io.atomic_files), from that set's files (`blend`: the
    blend.json written after it): the page and the report it shows are replaced as one unit."""
    try:
        html = render(read_page_data(files.folder, files.temps, blend), Thumbs(image_paths))
    except Exception as e:  # noqa: BLE001 - the figures it would show are written; folds must not be lost to it
        log.warning("%s not written (%s: %s); the report is; rebuild the page with: python -m entrep.report %s",
                    rundir.PAGE, type(e).__name__, e, files.folder)
        files.remove(rundir.PAGE)  # no page of an earlier report beside this one
        return
    files.write_text(rundir.PAGE, html)
