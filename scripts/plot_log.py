"""Draws the curves of one or several runs' log.txt into one PNG.

    python scripts/plot_log.py output/demo [output/other ...] --out curves.png

A run is its output folder or its log.txt: one JSON record per epoch, as run_pretraining.py,
run_class_finetuning.py and main_linprobe.py write them. Each quantity that some run logged gets a panel
(x: epoch; one colour per run, one line style per term): the loss terms, the learning rate, the momentum
encoder's EMA momentum, the loss weights, kNN accuracy (``--knn_freq``) and test accuracy (fine-tuning,
linear probing). Records without an epoch (eval_knn.py's) are left out; a record repeated for an epoch (a
resumed run) replaces the earlier one. A missing or empty log is a one-line error with exit status 2.
"""
import argparse
import json
import os
import sys

# (panel title, log keys drawn in it, y on a log scale)
PANELS = (
    ("loss", ("train_loss", "train_pixel_loss", "train_feature_loss"), True),
    ("learning rate", ("train_lr",), False),
    ("EMA momentum", ("train_ema_momentum",), False),
    ("loss weights", ("train_feature_weight", "train_pixel_weight"), False),
    ("kNN accuracy (%)", ("knn_top1", "knn_top5"), False),
    ("test accuracy (%)", ("test_acc1", "test_ema_acc1"), False),
)
STYLES = ("-", "--", ":")


class LogError(Exception):
    """A run whose log cannot be drawn: printed as one line, exit status 2."""


def read_log(path):
    """(name, {epoch: record}) of a run folder or log.txt."""
    log = os.path.join(path, "log.txt") if os.path.isdir(path) else path
    if not os.path.isfile(log):
        raise LogError(f"{log} does not exist; give the output folder of a training run (or its log.txt)")
    records = {}
    with open(log) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LogError(f"{log} line {number} is not JSON ({e.msg}); give a log.txt written by the "
                               f"training scripts") from None
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                records[record["epoch"]] = record
    if not records:
        raise LogError(f"{log} has no per-epoch records; train at least one epoch, or give another run")
    return os.path.basename(os.path.dirname(os.path.abspath(log))), records


def plot(runs, out):
    """One PNG at ``out`` with a panel per quantity present in some run; returns the panel titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    panels = [(title, keys, log_y) for title, keys, log_y in PANELS
              if any(k in r for _, records in runs for r in records.values() for k in keys)]
    cols = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys, log_y) in zip(axes.flat, panels):
        for i, (name, records) in enumerate(runs):
            for key, style in zip(keys, STYLES):
                points = [(e, r[key]) for e, r in sorted(records.items())
                          if isinstance(r.get(key), (int, float))]
                if points:
                    x, y = zip(*points)
                    ax.plot(x, y, style, marker="o", markersize=3, color=colours[i % len(colours)],
                            label=f"{name}: {key}" if len(runs) > 1 else key)
        if log_y and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)   # the EMA momentum as 0.9991, not 1e-4 + 0.999
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(out + ".tmp.png", out)
    return [title for title, _, _ in panels]


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw the curves of training runs' log.txt into a PNG.")
    p.add_argument("runs", nargs="+", help="output folders (or log.txt files) of training runs")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default: curves.png)")
    args = p.parse_args(argv)
    try:
        runs = [read_log(path) for path in args.runs]
    except LogError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    titles = plot(runs, args.out)
    print(f"wrote {args.out}: {len(runs)} run(s), panels: {', '.join(titles)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
