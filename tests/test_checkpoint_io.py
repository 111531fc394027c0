"""Checkpoint files: atomic writes and safe loading."""
import argparse
import collections
import errno
import os

import numpy as np
import pytest
import torch

import checkpoints
import utils


def test_release_style_checkpoint_with_numpy_scalars_loads(tmp_path):
    # the release's optimizer state carries numpy float64 lrs and its args are an argparse.Namespace
    path = tmp_path / "release.pth"
    ckpt = {"model": {"w": torch.ones(2)}, "epoch": 3,
            "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(2.4e-3), "params": [0]}]},
            "args": argparse.Namespace(lr=np.float64(1.5e-4), epochs=801)}
    torch.save(ckpt, path)
    loaded = checkpoints.load_checkpoint(str(path))
    assert loaded["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2.4e-3)
    assert loaded["args"].epochs == 801
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    # an object whose unpickling would call an arbitrary function
    torch.save({"model": {}, "payload": collections.Counter("abc"), "fn": os.getcwd}, path)
    with pytest.raises(utils.UsageError, match="cannot read checkpoint"):
        checkpoints.load_checkpoint(str(path))


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(utils.UsageError, match="does not exist"):
        checkpoints.load_checkpoint(str(tmp_path / "nope.pth"))


def test_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pth")
    checkpoints.save_on_master({"epoch": 1}, path)
    before = open(path, "rb").read()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(checkpoints.CheckpointWriteError, match=r"cannot write .*checkpoint-last.pth \(No space left on "
                                                          r"device\); [0-9.]+ MiB free on "):
        checkpoints.save_on_master({"epoch": 2}, path)
    assert open(path, "rb").read() == before  # the good checkpoint is untouched
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]  # and no partial file is left behind
