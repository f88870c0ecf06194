"""benchmarks/tower_probe.py: the linear probe finds what is linearly there, and only that."""

import importlib.util
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location(
    "tower_probe", Path(__file__).resolve().parents[1] / "benchmarks" / "tower_probe.py")
tower_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tower_probe)


def test_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 16, generator=g)
    y = (x[:, 3] > 0).long() + 2 * (x[:, 7] > 0).long()  # 4 classes, linear in two features
    assert tower_probe.probe_accuracy(x, y) > 0.9
    shuffled = y[torch.randperm(len(y), generator=g)]
    assert tower_probe.probe_accuracy(x, shuffled) < 0.4  # chance is 0.25
