"""The data settings' dataclasses (pipelines.PretrainDataConfig, datasets.EvalDataConfig) default every field as
the entry points' parsers default the flag of the same name, and every entry point's parsed arguments carry
every field, so that passing them or a dataclass is the same."""
import dataclasses
import glob
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import datasets  # noqa: E402
import eval_knn  # noqa: E402
import main_linprobe  # noqa: E402
import pipelines  # noqa: E402
import run_class_finetuning  # noqa: E402
import run_pretraining  # noqa: E402

# the one flag an entry point defaults differently on purpose: eval_knn.py embeds 256 demo items per split
OWN_DEFAULTS = {("eval_knn", "demo_size"): 256}


def _defaults(config):
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def test_pretrain_data_config_defaults_are_run_pretraining_defaults():
    args = run_pretraining.get_args_parser().parse_args([])
    run_pretraining.check_args(args)   # --patch_size: the default model's, 16
    config = pipelines.PretrainDataConfig()
    expected = _defaults(config)
    # unset mask counts are the release's scaled to the grid, at the default grid the flags' defaults
    num_patches = (config.input_size // config.patch_size) ** 2
    assert config.mask_num is None and config.num_mask_patches is None
    expected["mask_num"], expected["num_mask_patches"] = pipelines.release_mask_counts(num_patches)
    assert {name: getattr(args, name) for name in expected} == expected


@pytest.mark.parametrize("entry_point", [run_class_finetuning, main_linprobe, eval_knn], ids=lambda m: m.__name__)
def test_eval_data_config_defaults_are_the_entry_points_defaults(entry_point):
    args = entry_point.get_args_parser().parse_args([])
    expected = _defaults(datasets.EvalDataConfig())
    for (name, field), value in OWN_DEFAULTS.items():
        if name == entry_point.__name__:
            expected[field] = value
    assert {name: getattr(args, name) for name in expected} == expected


def test_shared_fields_default_alike():
    pretrain, evaluation = _defaults(pipelines.PretrainDataConfig()), _defaults(datasets.EvalDataConfig())
    shared = set(pretrain) & set(evaluation)
    assert shared == {"data_set", "data_path", "demo_size", "input_size", "imagenet_default_mean_and_std"}
    assert {k: pretrain[k] for k in shared} == {k: evaluation[k] for k in shared}


def test_library_modules_read_no_flag_with_a_fallback_default():
    """Defaults live in the parsers and the dataclasses, not in ``getattr(args, "flag", default)`` reads."""
    pattern = re.compile(r"getattr\(args,\s*[\"'][^\"']+[\"']\s*,")
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        with open(path) as f:
            found += [f"{os.path.basename(path)}:{n}" for n, line in enumerate(f, 1) if pattern.search(line)]
    assert found == []
