"""Gathers the rows' metrics.json of ablation tables into Markdown tables next to the published numbers.

    python scripts/ablations/gather.py paper_t4                       # one table
    python scripts/ablations/gather.py --all --out output/ablations   # every table with results

Columns: the row, its flags (named groups: BootMAE = the release's ViT-B flags, MAE = pixel target, random
masks, MAE's decoder; MAE feature = MAE with a feature target; see tables.py), the published numbers ("-": not
in the source's text), and ours: best fine-tuning top-1, linear top-1 (report tables), and for Table 5 the
median seconds per pretraining step. Rows not run yet show "-".
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import tables  # noqa: E402

GROUPS = (("MAE feature", tables.MAE_FEATURE), ("MAE", tables.MAE), ("BootMAE", tables.BOOTMAE),
          ("MAE decoder", tables.MAE_DECODER))


def describe_flags(flags):
    """Row flags with the named groups folded: 'BootMAE + `--target_fraction 0.25`'."""
    if flags is None:
        return "no pretraining"
    rest = [f"<{'/'.join(tables.dependency(f))} checkpoint>" if tables.dependency(f) else f for f in flags]
    names = []
    for name, group in GROUPS:
        group = list(group)
        for i in range(len(rest) - len(group) + 1):
            if rest[i:i + len(group)] == group:
                names.append(name)
                del rest[i:i + len(group)]
                break
    parts = names + ([f"`{' '.join(rest)}`"] if rest else [])
    return " + ".join(parts) if parts else "(defaults)"


def _fmt(value, digits=2):
    """A measured number, '-' when the run has not produced it."""
    return "-" if value is None else f"{value:.{digits}f}"


def render(table, out):
    ours = ["fine-tune"] + (["linear"] if table.setting == "cifar10" else [])
    timing = "iter time (s)" in table.columns
    header = ["row", "flags"] + [f"{c} (published)" for c in table.columns] + [f"{c} (ours)" for c in ours]
    if timing:
        header.append("s/step (ours)")
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in table.rows:
        path = os.path.join(out, table.key, row.key, "metrics.json")
        metrics = {}
        if os.path.isfile(path):
            with open(path) as f:
                metrics = json.load(f)
        cells = [row.label, describe_flags(row.flags)]
        # published numbers with the source's precision: the paper 1 decimal (3 for times), the report 2
        digits = {c: 3 if c == "iter time (s)" else 1 if table.setting == "imagenet" else 2 for c in table.columns}
        cells += [_fmt(row.published.get(c), digits[c]) for c in table.columns]
        cells += [_fmt(metrics.get(f"{c.replace('-', '')}_top1")) for c in ours]
        if timing:
            cells.append(_fmt((metrics.get("pretrain") or {}).get("s_per_step"), 3))
        lines.append("| " + " | ".join(cells) + " |")
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tables", nargs="*", help="table keys: " + ", ".join(tables.TABLES))
    p.add_argument("--all", action="store_true", help="every table")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "output", "ablations"),
                   help="the --out of run_table.py")
    args = p.parse_args()
    keys = list(tables.TABLES) if args.all else args.tables
    unknown = [k for k in keys if k not in tables.TABLES]
    if not keys or unknown:
        problem = f"unknown table {unknown[0]}" if unknown else "no table named"
        p.error(f"{problem}; name one of {', '.join(tables.TABLES)} or give --all")
    print("\n\n".join(render(tables.TABLES[k], args.out) for k in keys))


if __name__ == "__main__":
    main()
