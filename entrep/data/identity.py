"""What a run was trained on, per image: content, label, captions and i2i links. A run (and a blend of
runs) is tied to this, not to file names: the same names with other pixels or labels are other data."""
from __future__ import annotations

import hashlib

import pandas as pd


def data_identity(table: pd.DataFrame) -> dict[str, list]:
    """image -> [content sha1, label, captions digest, i2i partners digest]: what a run was trained on."""
    def digest(items) -> str:
        return hashlib.sha1("\n".join(sorted(items)).encode()).hexdigest()[:12]

    return {name: [sha1, label or "", digest(caps), digest(partners)] for name, sha1, label, caps, partners in
            zip(table["image"], table["sha1"], table["label"].where(table["label"].notna(), ""), table["captions"],
                table["partners"])}


def describe_data_change(before: dict, now: dict) -> str:
    """What differs between two data identities, with examples: '' when nothing does."""
    kinds = {0: "pixels", 1: "labels", 2: "captions", 3: "i2i links"}
    changed = {k: [n for n in now if n in before and before[n][k] != now[n][k]] for k in kinds}
    parts = [f"{len(v)} images' {kinds[k]} changed (e.g. {v[0]}"
             + (f": {before[v[0]][1] or 'unlabelled'} -> {now[v[0]][1] or 'unlabelled'})" if k == 1 else ")")
             for k, v in changed.items() if v]
    added, gone = sorted(set(now) - set(before)), sorted(set(before) - set(now))
    parts += [f"{len(added)} images new (e.g. {added[0]})"] if added else []
    parts += [f"{len(gone)} images gone (e.g. {gone[0]})"] if gone else []
    return "; ".join(parts)
