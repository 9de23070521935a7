"""Save, load into a fresh process, continue: weights match an uninterrupted run bit for bit."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("resume_worker.py")


def run_worker(phase, out, optimizer, policy):
    subprocess.run([sys.executable, str(WORKER), phase, str(out), optimizer, policy], check=True)


@pytest.mark.parametrize("policy", ["static", "freezeout", "autofreeze", "smartfrz"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_in_fresh_process_is_bit_identical(tmp_path, optimizer, policy):
    run_worker("full", tmp_path, optimizer, policy)
    run_worker("resumed", tmp_path, optimizer, policy)
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert full["timeline"] == resumed["timeline"]
    assert full["num_frozen"] > 0, "the run should freeze something, or the test proves little"
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), f"{name} differs after resume"
