"""The ablation tables of the paper (Tables 1-5, 8, 9) and of the CIFAR-10 report, one row = one set of flags.

Every row is ``run_pretraining.py <table base flags> <row flags>``: the base holds the training recipe shared
by the table (data, model size, schedule, optimiser), the row flags are the documented ablation flags
(README "Ablations") that make the row what it is; argparse takes the last value of a repeated flag, so a row
may override a base value (the pretraining epochs of Tables 1 and 9). ``None`` as flags means no pretraining
(a freshly initialised encoder is evaluated). A flag value ``checkpoint_of(table, row)`` stands for the
checkpoint that another row's pretraining ends with (Tables 3 and 9 predict the features of Table 1's MAE-800);
``run_table.py`` trains that row first when its checkpoint is missing.

``expect`` states what a row builds, independently of the flags, and ``tests/test_ablations.py`` checks every
row against it: which decoders exist (``pixel``/``feature``), the encoder block each one cross-attends to
(``pixel_context``/``feature_context``: a block of the 12-block encoder, None = no context injection), the
target encoder (None = no feature targets), the masking, the decoder shape, the fraction of the image fed to
the momentum encoder and the pixel-only warm-up.

``published`` holds the paper's and the report's numbers (None where the source gives the number only in a
figure that is not in its text).
"""
import re
from dataclasses import dataclass, field

_CHECKPOINT = re.compile(r"\{checkpoint:(\w+)/(\w+)\}")


def checkpoint_of(table, row):
    """A flag value that stands for the last checkpoint of row ``row`` of table ``table``'s pretraining."""
    return f"{{checkpoint:{table}/{row}}}"


def dependency(flag):
    """(table, row) whose checkpoint ``flag`` stands for, or None for an ordinary flag."""
    m = _CHECKPOINT.fullmatch(str(flag))
    return m.groups() if m else None


# the 800-epoch MAE ViT-B whose features are the fixed targets of Tables 3 and 9 (paper appendix B)
MAE_CHECKPOINT = checkpoint_of("paper_t1", "mae_800")


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    flags: tuple
    published: dict
    expect: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    setting: str          # "imagenet" (paper: ViT-B/16, fine-tuning) or "cifar10" (report: DeiT-Tiny size)
    base: tuple
    rows: tuple
    columns: tuple        # published metrics, in column order
    note: str = ""

    def row(self, key):
        return next(r for r in self.rows if r.key == key)


# ------------------------------------------------------------------------------------------------ settings

# The paper's ablation setting (Section 4.2): ViT-B/16 on ImageNet-1k, 300 epochs (the rows of Tables 1 and 9
# change that), total batch 4096 (run_table.py sets --update_freq), the release's recipe otherwise.
IMAGENET_BASE = ("--model", "bootmae_base", "--input_size", "224", "--batch_size", "256", "--lr", "1.5e-4",
                 "--min_lr", "1e-4", "--epochs", "300", "--warmup_epochs", "40", "--mask_num", "147",
                 "--num_mask_patches", "120", "--model_ema_decay", "0.999", "--num_workers", "10")
# The CIFAR-10 report's setting: DeiT-Tiny-sized encoder at 32 px in 4 px patches, batch 512, 200 epochs.
CIFAR10_BASE = ("--model", "bootmae_tiny", "--input_size", "32", "--patch_size", "4", "--drop_path", "0.0",
                "--data_set", "cifar10", "--batch_size", "512", "--epochs", "200", "--warmup_epochs", "10",
                "--lr", "1.5e-4", "--min_lr", "1e-6", "--mask_num", "48", "--num_mask_patches", "39",
                "--min_mask_patches_per_block", "4", "--max_mask_patches_per_block", "16", "--num_workers", "8",
                "--save_ckpt_freq", "50")

# BootMAE as released (ViT-B recipe): the defaults plus the weighted mask and the dynamic momentum.
BOOTMAE = ("--weight_mask", "--model_ema_dynamic")
# MAE (run_pretraining.py's preset): pixel target only (no feature predictor, no momentum encoder), MAE's random
# masking, MAE's decoder (8 blocks, width 512, 16 heads, no cross-attention), per-patch normalised pixels.
MAE = ("--mae",)
MAE_DECODER = ("--decoder_depth", "8", "--decoder_num_heads", "16")
# MAE with its prediction target replaced by features (paper appendix B, report): no pixel regressor, a
# feature predictor of MAE's decoder shape (width 512), no context injection, full feature weight throughout.
MAE_FEATURE = ("--pixel_weight", "0", "--context", "none", "--feature_ramp", "0", "--feature_decoder_dim", "512") \
    + MAE_DECODER



def _fixed(mask):
    """MAE predicting the features of the fixed MAE-800 encoder, with masking ``mask``."""
    return MAE_FEATURE + ("--target_encoder", "fixed", "--target_checkpoint", MAE_CHECKPOINT, "--mask_type", mask)


_BOOT = dict(pixel=True, feature=True, pixel_context=0, feature_context=11, target="ema", mask="release",
             decoder=(2, 512))
_MAE = dict(pixel=True, feature=False, pixel_context=None, feature_context=None, target=None, mask="random",
            decoder=(8, 512, 16), pixel_norm="patch")


def _boot(**kw):
    return {**_BOOT, **kw}


def _mae(**kw):
    return {**_MAE, **kw}


def _mae_feature(target, mask="random", **kw):
    return {**dict(pixel=False, feature=True, pixel_context=None, feature_context=None, target=target, mask=mask,
                   decoder=(8, 512, 16), feature_width=512), **kw}


# ------------------------------------------------------------------------------------------------ paper

PAPER_T1 = Table(
    "paper_t1", "Paper Table 1: bootstrapped feature prediction", "imagenet", IMAGENET_BASE, (
        Row("mae_1600", "MAE, 1600 epochs", MAE + ("--epochs", "1600"), {"fine-tune": 83.6}, _mae()),
        Row("mae_800", "MAE, 800 epochs", MAE + ("--epochs", "800"), {"fine-tune": 83.4}, _mae()),
        Row("mae_300", "MAE, 300 epochs", MAE, {"fine-tune": 83.2}, _mae()),
        Row("boot_noctx_300", "MAE w bootstrapped feature prediction (no context injection), 300 epochs",
            BOOTMAE + ("--context", "none"), {"fine-tune": 83.6},
            _boot(pixel_context=None, feature_context=None)),
    ), ("fine-tune",))

PAPER_T2 = Table(
    "paper_t2", "Paper Table 2: context injection", "imagenet", IMAGENET_BASE, (
        Row("ctx_none", "BootMAE, context for neither decoder", BOOTMAE + ("--context", "none"), {"fine-tune": 83.6},
            _boot(pixel_context=None, feature_context=None)),
        Row("ctx_pixel", "BootMAE, context for the regressor only", BOOTMAE + ("--context", "pixel"),
            {"fine-tune": 83.9}, _boot(feature_context=None)),
        Row("ctx_both", "BootMAE, context for regressor and predictor (default)", BOOTMAE, {"fine-tune": 84.0},
            _boot()),
    ), ("fine-tune",))

PAPER_T3 = Table(
    "paper_t3", "Paper Table 3: masking strategy for pixel and feature targets (MAE, 300 epochs)", "imagenet",
    IMAGENET_BASE, (
        Row("pixel_random", "pixel target, random masking", MAE, {"fine-tune": 83.2}, _mae()),
        Row("pixel_block", "pixel target, block-wise masking", MAE + ("--mask_type", "block"), {"fine-tune": 82.8},
            _mae(mask="block")),
        Row("pixel_release", "pixel target, release-style masking (not in the paper)", MAE + ("--mask_type", "release"),
            {"fine-tune": None}, _mae(mask="release")),
        Row("feature_random", "feature target (fixed MAE encoder), random masking",
            _fixed("random"),
            {"fine-tune": 83.1}, _mae_feature("fixed")),
        Row("feature_block", "feature target (fixed MAE encoder), block-wise masking",
            _fixed("block"),
            {"fine-tune": 83.6}, _mae_feature("fixed", mask="block")),
        Row("feature_release", "feature target (fixed MAE encoder), release-style masking (not in the paper)",
            _fixed("release"),
            {"fine-tune": None}, _mae_feature("fixed", mask="release")),
    ), ("fine-tune",),
    note="The feature target is the output of Table 1's 800-epoch MAE ViT-B (trained first when missing; "
         "--mae_checkpoint gives another).")

PAPER_T4 = Table(
    "paper_t4", "Paper Table 4: (a) regressor and predictor depth, (b) regressor width", "imagenet", IMAGENET_BASE, (
        Row("depth_1", "(a) depth 1", BOOTMAE + ("--decoder_depth", "1"), {"fine-tune": 83.4}, _boot(decoder=(1, 512))),
        Row("depth_2", "(a) depth 2 (default)", BOOTMAE, {"fine-tune": 84.0}, _boot()),
        Row("depth_4", "(a) depth 4", BOOTMAE + ("--decoder_depth", "4"), {"fine-tune": 83.9}, _boot(decoder=(4, 512))),
        Row("depth_8", "(a) depth 8", BOOTMAE + ("--decoder_depth", "8"), {"fine-tune": 84.0}, _boot(decoder=(8, 512))),
        Row("width_256", "(b) regressor width 256", BOOTMAE + ("--decoder_dim", "256"), {"fine-tune": 83.8},
            _boot(decoder=(2, 256))),
        Row("width_384", "(b) regressor width 384", BOOTMAE + ("--decoder_dim", "384"), {"fine-tune": 84.0},
            _boot(decoder=(2, 384))),
        Row("width_512", "(b) regressor width 512 (default)", BOOTMAE + ("--decoder_dim", "512"), {"fine-tune": 84.0},
            _boot()),
        Row("width_768", "(b) regressor width 768", BOOTMAE + ("--decoder_dim", "768"), {"fine-tune": 84.0},
            _boot(decoder=(2, 768))),
    ), ("fine-tune",))

PAPER_T5 = Table(
    "paper_t5", "Paper Table 5: fraction of the image fed to the momentum encoder", "imagenet", IMAGENET_BASE, (
        Row("mae", "MAE", MAE, {"fine-tune": 83.2, "iter time (s)": 0.473}, _mae()),
        Row("frac_25", "BootMAE, 25 % (sampled from the masked patches)", BOOTMAE + ("--target_fraction", "0.25"),
            {"fine-tune": 83.8, "iter time (s)": 0.407}, _boot(fraction=0.25)),
        Row("frac_50", "BootMAE, 50 % (sampled from the masked patches)", BOOTMAE + ("--target_fraction", "0.5"),
            {"fine-tune": 83.8, "iter time (s)": 0.479}, _boot(fraction=0.5)),
        Row("frac_75", "BootMAE, 75 % (all the masked patches)", BOOTMAE + ("--target_fraction", "0.75"),
            {"fine-tune": 83.9, "iter time (s)": 0.588}, _boot(fraction=0.75)),
        Row("frac_100", "BootMAE, 100 % (the full image, default)", BOOTMAE,
            {"fine-tune": 84.0, "iter time (s)": 0.660}, _boot(fraction=1.0)),
    ), ("fine-tune", "iter time (s)"),
    note="Paper: A100, batch 256 per GPU. Ours: the median s/step of the run (all processes' batches), and "
         "benchmarks/bench_pretrain.py --target_fraction F [--mae] for a clean figure.")

_LEVELS = (("low", 0), ("middle", 5), ("high", 11))
PAPER_T8 = Table(
    "paper_t8", "Paper Table 8: encoder block injected into each decoder (ViT-B: block 1, 6, 12)", "imagenet",
    IMAGENET_BASE, tuple(
        Row(f"pix_{pn}_fea_{fn}", f"regressor {pn}-level (block {p + 1}), predictor {fn}-level (block {f + 1})",
            BOOTMAE + ("--context_blocks", str(p), str(f)), {"fine-tune": v},
            _boot(pixel_context=p, feature_context=f))
        for (pn, p), row in zip(_LEVELS[::-1], ((83.2, 83.3, 83.4), (83.6, 83.6, 83.7), (83.8, 83.9, 84.0)))
        for (fn, f), v in zip(_LEVELS, row)),
    ("fine-tune",))

PAPER_T9 = Table(
    "paper_t9", "Paper Table 9: MAE with pixel or (fixed MAE) feature targets", "imagenet", IMAGENET_BASE, (
        Row("pixel_300", "MAE, pixel target, 300 epochs", MAE, {"fine-tune": 83.2}, _mae()),
        Row("pixel_800", "MAE, pixel target, 800 epochs", MAE + ("--epochs", "800"), {"fine-tune": 83.4}, _mae()),
        Row("pixel_1600", "MAE, pixel target, 1600 epochs", MAE + ("--epochs", "1600"), {"fine-tune": 83.6}, _mae()),
        Row("feature_300", "MAE, feature target, 300 epochs",
            _fixed("block"),
            {"fine-tune": 83.6}, _mae_feature("fixed", mask="block")),
        Row("feature_800", "MAE, feature target, 800 epochs",
            _fixed("block") + ("--epochs", "800"),
            {"fine-tune": 83.8}, _mae_feature("fixed", mask="block")),
    ), ("fine-tune",),
    note="Feature targets: Table 1's 800-epoch MAE ViT-B (--mae_checkpoint gives another), block-wise masking "
         "(appendix B).")

# ------------------------------------------------------------------------------------------------ report

_RC = ("fine-tune", "linear")
REPORT_MAE = Table(
    "report_mae", "CIFAR-10 report: MAE baseline", "cifar10", CIFAR10_BASE, (
        Row("none", "no pretraining", None, {"fine-tune": 81.1, "linear": 30.91}, dict(pretrain=False)),
        Row("mae", "MAE", MAE, {"fine-tune": 85.83, "linear": 52.35}, _mae()),
        Row("bootmae", "BootMAE (the release's, for comparison; not in the report)", ("--weight_mask",),
            {"fine-tune": None, "linear": None}, _boot(decoder=(2, 512))),
    ), _RC)


def _mae_k(k):
    return ("--target_encoder", "k_epoch", "--target_k", str(k), "--mask_type", "random") + MAE_FEATURE


REPORT_MAE_K = Table(
    "report_mae_k", "CIFAR-10 report: MAE-K (target = frozen copy of the online encoder, refreshed every K epochs)",
    "cifar10", CIFAR10_BASE, tuple(
        Row(f"k_{k}", f"MAE-{k}", _mae_k(k), {"fine-tune": ft, "linear": lin}, _mae_feature("k_epoch", k=k))
        for k, ft, lin in ((1, None, None), (2, None, None), (4, None, None), (10, 91.38, None), (20, None, 57.2))),
    _RC, note="The report gives its best numbers in the text (fine-tune 91.38 at K = 10, linear 57.2 at K = 20); "
              "the others are in figures only.")


def _ema_mae(tau, wse):
    return ("--target_encoder", "epoch_ema", "--target_tau", str(tau), "--pixel_warmup_epochs", str(wse),
            "--mask_type", "random") + MAE_FEATURE


def _ema_expect(tau, wse):
    # a pixel-only warm-up needs the pixel regressor (MAE's decoder) for its first epochs
    return _mae_feature("epoch_ema", tau=tau, pixel_warmup=wse, pixel=wse > 0)


REPORT_EMA_MAE = Table(
    "report_ema_mae", "CIFAR-10 report: EMA-MAE (target = (1 - tau) target + tau online after every epoch, after "
    "a pixel-only warm-up of WSE epochs)", "cifar10", CIFAR10_BASE, tuple(
        Row(f"tau_{tau}_wse_{wse}", f"EMA-MAE, tau {tau}, WSE {wse}", _ema_mae(tau, wse),
            {"fine-tune": None, "linear": None}, _ema_expect(tau, wse))
        for tau, wse in ((0.005, 0), (0.005, 5), (0.005, 20), (0.1, 5), (0.3, 5))),
    _RC, note="The report's best EMA-MAE: fine-tune 91.25, linear 60.46 (the row is in a figure only); tau 0.1 "
              "and 0.3 fine-tune better, 0.005 probes better; WSE 5 and 20 beat no warm-up.")

REPORT_MAE_NEW = Table(
    "report_mae_new", "CIFAR-10 report: MAE-new (L = L_fast + 0.2 L_slow, fast = EMA-MAE, slow = MAE-5)", "cifar10",
    CIFAR10_BASE, (
        Row("mae_5", "MAE-5", _mae_k(5), {"fine-tune": None, "linear": None}, _mae_feature("k_epoch", k=5)),
        Row("ema_mae", "MAE-5-0.005 (EMA-MAE, tau 0.005, WSE 5)", _ema_mae(0.005, 5),
            {"fine-tune": None, "linear": None}, _ema_expect(0.005, 5)),
        Row("mae_new", "MAE-new (lambda 0.2)",
            ("--target_encoder", "mae_new", "--target_k", "5", "--target_tau", "0.005", "--slow_weight", "0.2",
             "--pixel_warmup_epochs", "5", "--mask_type", "random") + MAE_FEATURE,
            {"fine-tune": None, "linear": None},
            _mae_feature("mae_new", k=5, tau=0.005, slow_weight=0.2, pixel_warmup=5, pixel=True)),
    ), _RC, note="The report shows these numbers in figures only: MAE-new beats both parts clearly in linear "
                 "evaluation, slightly in fine-tuning.")

TABLES = {t.key: t for t in (PAPER_T1, PAPER_T2, PAPER_T3, PAPER_T4, PAPER_T5, PAPER_T8, PAPER_T9,
                             REPORT_MAE, REPORT_MAE_K, REPORT_EMA_MAE, REPORT_MAE_NEW)}


def dependencies(row):
    """The (table, row) pairs whose checkpoints the row's flags use."""
    return [d for d in map(dependency, row.flags or ()) if d]


def command_flags(table, row, checkpoint=None):
    """The run_pretraining.py flags of a row (base + row). ``checkpoint(table_key, row_key)`` gives the path that
    a ``checkpoint_of`` value stands for (without it the placeholders stay)."""
    flags = list(table.base) + list(row.flags)
    if checkpoint is None:
        return flags
    return [checkpoint(*dependency(f)) if dependency(f) else f for f in flags]
