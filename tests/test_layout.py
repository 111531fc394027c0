"""The code's shape, as README's Layout describes it: files and functions of a readable size, entry points that
import library modules only, and OpenMMLab kept out of the core. Reads the tracked sources as text (ast)."""
import ast
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# entry points: command lines a user runs; library modules and other entry points never import them
ENTRY_POINTS = {"run_pretraining", "run_class_finetuning", "main_linprobe", "eval_knn", "export_timm",
                "bench_pretrain", "bench_loader", "cifar10_learning_check", "cifar10_ablation", "run_table",
                "gather", "plot_log", "downstream"}
OPENMMLAB = {"mmcv", "mmengine", "mmseg", "mmdet"}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def python_files():
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("not a git checkout: the layout checks read the tracked files")
    return out.stdout.split()


def parse(path):
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    return text, ast.parse(text, path)


def imported_modules(tree):
    """Top-level names of every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def module_name(path):
    return os.path.splitext(os.path.basename(path))[0]


def test_every_entry_point_exists():
    # a renamed entry point would silently leave the import check below without its subject
    found = {module_name(p) for p in python_files()}
    assert ENTRY_POINTS <= found, ENTRY_POINTS - found


def test_files_and_functions_are_short():
    long_files, long_functions = [], []
    for path in python_files():
        text, tree = parse(path)
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append((path, text.count("\n")))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.endswith("_parser"):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append((f"{path}:{node.lineno}", node.name, length))
    assert not long_files, f"files over {MAX_FILE_LINES} lines: {long_files}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines (argument parsers excepted): {long_functions}"


def test_pretraining_step_is_one_short_function():
    _, tree = parse("engine_for_pretraining.py")
    step = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_one_epoch")
    assert step.end_lineno - step.lineno + 1 <= MAX_FUNCTION_LINES
    called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", None)
              for n in ast.walk(step) if isinstance(n, ast.Call)}
    # the step's stages, in the open: schedule, targets, forward, the one loss, backward and optimizer step
    assert {"set_schedules", "features", "backward", "optimizer_step", "after_step"} <= called, called
    assert "bootmae_loss" in ast.unparse(step)


def test_no_module_imports_an_entry_point():
    offenders = []
    for path in python_files():
        if path.startswith("tests/"):
            continue  # the tests drive the entry points
        _, tree = parse(path)
        hits = (imported_modules(tree) & ENTRY_POINTS) - {module_name(path)}
        if hits:
            offenders.append((path, sorted(hits)))
    assert not offenders, offenders


def test_openmmlab_stays_out_of_the_core():
    allowed = ("openmmlab_glue.py", "semantic_segmentation/", "detection/", "scripts/downstream.py")
    offenders = []
    for path in python_files():
        if path.startswith("tests/") or path.startswith(allowed):
            continue
        _, tree = parse(path)
        if imported_modules(tree) & OPENMMLAB:
            offenders.append(path)
    assert not offenders, offenders


def test_helpers_do_not_import_the_models():
    _, tree = parse("utils.py")
    assert not imported_modules(tree) & {"modeling_bootmae", "modeling_vit", "vit_layers", "backbone_vit"}
