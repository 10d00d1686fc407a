"""Crash-safe training: finetune.py killed at deterministic points (tests/finetune_faults.py), checkpoints included.

One run is killed again and again, each time resumed, at every point of a checkpoint save and between steps; after
each kill the disk holds a complete checkpoint (the old one or the new one), and the last resume reaches the adapter
of an uninterrupted run. A full disk and a read-only file system stop a run with a clear error and leave the last
complete checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerroute.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
DATA = [str(FIXTURES / name) for name in ("openai.jsonl", "glaive.jsonl", "gsm8k.jsonl", "hermes.json")]
TOTAL_STEPS = 6  # two router warm-up steps, four LoRA steps


def finetune(output: Path, model_dir: str, *extra: str, fault: tuple[str, int] | None = None):
    arguments = ["--model", model_dir, "--data", *DATA, "--validation-data", DATA[0], "--router-warmup", "2",
                 "--steps", "4", "--batch-size", "2", "--max-length", "512", "--output", str(output),
                 "--checkpoint-every", "1", "--report-steps", "4", *extra]
    command = [sys.executable, str(ROOT / "tests" / "finetune_faults.py"), fault[0], str(fault[1])] if fault else \
        [sys.executable, str(ROOT / "training" / "finetune.py")]
    return subprocess.run([*command, *arguments], env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)


def checkpoint_step(directory: Path) -> int:
    """The step of a complete checkpoint; fails on an incomplete one."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "run.json", "training_state.pt"]), sorted(directory.iterdir())
    load_file(directory / ADAPTER_WEIGHTS)
    json.loads((directory / ADAPTER_CONFIG).read_text())
    json.loads((directory / "run.json").read_text())
    return torch.load(directory / "training_state.pt", weights_only=True)["step"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_chat_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    run = finetune(output, tiny_chat_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(output / ADAPTER_WEIGHTS)


def assert_same_adapter(output: Path, expected: dict) -> None:
    actual = load_file(output / ADAPTER_WEIGHTS)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5)


def test_killed_anywhere_and_resumed_reaches_the_uninterrupted_adapter(tiny_chat_dir, uninterrupted, tmp_path):
    output = tmp_path / "run"
    checkpoint, staging, previous = (output / name for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    # (fault, the N-th time its point is reached, what the disk holds afterwards)
    plan = [
        (("writing", 2), "the save of step 2 half-written beside the checkpoint of step 1"),
        (("staged", 1), "step 2 staged in full, not swapped in"),
        (("swapping", 2), "step 2 moved aside, step 3 staged in full"),
        (("cleanup", 2), "step 4 in place, step 3 not yet removed"),  # the 1st: recovering the kill before
        (("step", 2), "killed as step 6 starts"),
        (("sigterm", 1), "stopped by SIGTERM after the last step, before the refit"),
    ]
    seen = []
    for index, (fault, _) in enumerate(plan):
        run = finetune(output, tiny_chat_dir, *(["--resume"] if index else []), fault=fault)
        expected_code = 130 if fault[0] == "sigterm" else -signal.SIGKILL
        assert run.returncode == expected_code, (fault, run.returncode, run.stderr[-3000:])
        if fault[0] == "writing":
            assert staging.is_dir() and not (staging / "training_state.pt").exists()  # the rename has not happened
        if fault[0] == "swapping":  # between the renames: the old checkpoint complete, the new one complete
            assert not checkpoint.exists()
            seen.append((checkpoint_step(previous), checkpoint_step(staging)))
        else:
            seen.append(checkpoint_step(checkpoint))
    assert seen == [1, 1, (2, 3), 4, 5, 6]
    resumed = finetune(output, tiny_chat_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(output, uninterrupted)
    assert not staging.exists() and not previous.exists()
    metrics = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, TOTAL_STEPS + 1))  # steps repeated after a kill are logged once


def test_a_full_disk_stops_the_run_clearly_and_keeps_the_last_checkpoint(tiny_chat_dir, uninterrupted, tmp_path):
    output = tmp_path / "run"
    run = finetune(output, tiny_chat_dir, fault=("disk-full", 3))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.splitlines()[-1].startswith(
        "finetune: error: cannot write the checkpoint of step 3 ([Errno 28] No space left on device")
    assert f"{output / 'checkpoint'} keeps the last complete one" in run.stderr
    assert checkpoint_step(output / "checkpoint") == 2 and not (output / "checkpoint.tmp").exists()
    resumed = finetune(output, tiny_chat_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(output, uninterrupted)


def test_a_read_only_output_stops_the_run_clearly(tiny_chat_dir, tmp_path):
    output = tmp_path / "run"
    run = finetune(output, tiny_chat_dir, fault=("read-only", 1))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    last = run.stderr.splitlines()[-1]
    assert last.startswith("finetune: error: cannot write the checkpoint of step 1 ([Errno 30] Read-only file system")
    assert last.endswith("no checkpoint was written before")
