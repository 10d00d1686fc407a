"""User errors on the command line: ``prog: error: ...`` and exit status 2, no traceback; bugs keep theirs.

``finetune.py`` and ``evaluate.py`` are called through their ``main`` with tiny inputs; where a check must come before
any model loads, loading a model fails the test. One subprocess run checks what a user actually sees.
"""

from __future__ import annotations

import errno
import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_llama, tiny_qwen2

from layerroute import LayerRouteModel
from layerroute.cli import main as layerroute
from layerroute.errors import MissingInputError, UserError, command

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
LOG = str(FIXTURES / "openai.jsonl")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finetune():
    return load_script("finetune")


@pytest.fixture(scope="module")
def evaluate():
    return load_script("evaluate")


@pytest.fixture
def no_model_loads(monkeypatch, finetune, evaluate):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the user error was found")

    for script in (finetune, evaluate):
        monkeypatch.setattr(script, "load_base_model", refuse)


def error_of(capsys, prog: str) -> str:
    """The error line a command printed last (after any progress bars), checked for its form."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n"), err
    last = err.splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), err
    return last


def model_dir(directory: Path, model) -> str:
    """A local model directory: ``model`` and a word-level tokenizer, enough for ``load_base_model``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocabulary, unk_token="<unk>")),
                                        pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


# ---------------------------------------------------------------------------------------------- the wrapper
def test_user_errors_print_one_line_and_bugs_keep_their_traceback(capsys):
    @command("tool")
    def user_error(argv):
        raise UserError(f"bad input {argv}")

    assert user_error(["x", "--debug-not"]) == 2
    assert capsys.readouterr().err == "tool: error: bad input ['x', '--debug-not']\n"
    with pytest.raises(UserError, match=r"bad input \['x'\]"):  # --debug is taken out wherever it stands
        user_error(["--debug", "x"])

    @command("tool")
    def bug(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        bug([])

    @command("tool")
    def write(argv):
        raise OSError(int(argv[0]), os.strerror(int(argv[0])), "out/metrics.jsonl")

    assert write([str(errno.ENOSPC)]) == 2  # a full disk is the machine's state, not a bug
    assert capsys.readouterr().err == "tool: error: [Errno 28] No space left on device: 'out/metrics.jsonl'\n"
    with pytest.raises(IsADirectoryError):
        write([str(errno.EISDIR)])


# ---------------------------------------------------------------------------------------------- layerroute
def test_layerroute_steps_reports_bad_logs_without_a_traceback(tmp_path, capsys):
    assert layerroute(["steps", str(tmp_path / "nope.jsonl")]) == 2
    assert f"agent log {tmp_path / 'nope.jsonl'} does not exist" in error_of(capsys, "layerroute")
    binary = tmp_path / "log.jsonl"
    binary.write_bytes(b"\x86\x00\xff\n")
    assert layerroute(["steps", str(binary)]) == 2
    assert f"{binary}:1: not UTF-8 text (byte 0x86 at column 1)" in error_of(capsys, "layerroute")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(Path(LOG).read_bytes())[:40])
    assert layerroute(["steps", str(cut)]) == 2
    assert f"{cut}:1: the file is truncated or corrupt" in error_of(capsys, "layerroute")
    assert layerroute(["steps", "--on-bad-record", "skip", str(cut), LOG]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["traces"] == 2 and summary["skipped_reasons"] == {"truncated or corrupt file": 1}
    with pytest.raises(MissingInputError):
        layerroute(["steps", str(tmp_path / "nope.jsonl"), "--debug"])


def test_layerroute_report_reports_bad_records_and_outputs(tmp_path, capsys):
    assert layerroute(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "step-cost records" in error_of(capsys, "layerroute")
    for name, content in (("list.jsonl", b"[1, 2]\n"), ("binary.jsonl", b"\xff\xfe\x00\n"), ("odd.jsonl", b"{\n")):
        (tmp_path / name).write_bytes(content)
        assert layerroute(["report", str(tmp_path / name)]) == 2
        assert f"{tmp_path / name}:1: not a LayerRoute step-cost record" in error_of(capsys, "layerroute")
    record = json.loads((ROOT / "docs" / "cost-report-records.jsonl").read_text().splitlines()[0])
    (tmp_path / "wrong.jsonl").write_text(json.dumps(record) + "\n" + json.dumps({**record, "flops_total": "1e9"}))
    assert layerroute(["report", str(tmp_path / "wrong.jsonl")]) == 2
    assert "wrong.jsonl:2: not a LayerRoute step-cost record (`flops_total` must be int, got '1e9')" in error_of(
        capsys, "layerroute")
    records = str(ROOT / "docs" / "cost-report-records.jsonl")
    assert layerroute(["report", records, "--usd-per-gpu-hour", "-1"]) == 2
    assert "must be positive" in error_of(capsys, "layerroute")
    assert layerroute(["report", records, "--json", str(tmp_path / "no" / "such" / "dir.json")]) == 2
    assert f"--json {tmp_path / 'no' / 'such' / 'dir.json'}: " in error_of(capsys, "layerroute")


def test_layerroute_report_names_or_skips_broken_lines(tmp_path, capsys):
    good = (ROOT / "docs" / "cost-report-records.jsonl").read_text().splitlines()[:3]
    broken = tmp_path / "costs.jsonl"
    broken.write_text("\n".join([good[0], '{"record_type": "layerroute.step", "trace_id": ', good[1], "[1, 2]", "",
                                  json.dumps({**json.loads(good[2]), "num_layers": 0}), good[2]]) + "\n")
    assert layerroute(["report", str(broken)]) == 2
    error = error_of(capsys, "layerroute")
    assert f"{broken}:2: not a LayerRoute step-cost record (not JSON: " in error and "--on-bad-record skip" in error
    html, out_json = tmp_path / "report.html", tmp_path / "report.json"
    assert layerroute(["report", str(broken), "--on-bad-record", "skip", "--html", str(html),
                       "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert "3 steps in" in captured.out
    assert "3 unreadable records skipped (inconsistent counts: 1, not JSON: 1, not a JSON object: 1)" in captured.out
    assert [line.split(": ")[1] for line in captured.err.splitlines()] == [  # each skipped line named on stderr
        f"skipped {broken}:2", f"skipped {broken}:4", f"skipped {broken}:6"]
    summary = json.loads(out_json.read_text())
    assert summary["totals"]["steps"] == 3
    assert summary["skipped_records"] == {"not JSON": 1, "not a JSON object": 1, "inconsistent counts": 1}
    assert 'id="skipped"' in html.read_text()


@pytest.mark.parametrize("content", ["", "\n\n", "{oops\n"])
def test_layerroute_report_of_no_steps_says_so(tmp_path, capsys, content):
    records = tmp_path / "costs.jsonl"
    records.write_text(content)
    html, out_json = tmp_path / "report.html", tmp_path / "report.json"
    argv = ["report", str(records), "--on-bad-record", "skip", "--html", str(html), "--json", str(out_json)]
    assert layerroute(argv) == 0
    out = capsys.readouterr().out
    assert "No steps: there are no step-cost records to report on." in out
    assert ("1 unreadable record skipped (not JSON: 1)" in out) == content.startswith("{")
    assert 'id="no-steps"' in html.read_text()
    summary = json.loads(out_json.read_text())
    assert summary["totals"]["steps"] == 0 and summary["projection"]["saved_usd_per_day"] == 0
    if not content.startswith("{"):
        assert layerroute(argv[:2]) == 0  # nothing bad to raise about
        assert "No steps" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- finetune.py
def test_finetune_refuses_missing_data_and_occupied_outputs_before_loading_a_model(
        finetune, no_model_loads, tmp_path, capsys):
    assert finetune.main(["--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "run")]) == 2
    assert "nope.jsonl does not exist" in error_of(capsys, "finetune")
    assert finetune.main(["--data", LOG, "--validation-data", str(tmp_path / "gone.jsonl"),
                          "--output", str(tmp_path / "run")]) == 2
    assert "gone.jsonl does not exist" in error_of(capsys, "finetune")
    (tmp_path / "occupied" / "checkpoint").mkdir(parents=True)
    assert finetune.main(["--data", LOG, "--output", str(tmp_path / "occupied")]) == 2
    assert "already holds a run; pass --resume" in error_of(capsys, "finetune")
    (tmp_path / "a-file").write_text("")
    assert finetune.main(["--data", LOG, "--output", str(tmp_path / "a-file")]) == 2
    assert "is a file" in error_of(capsys, "finetune")
    assert finetune.main(["--data", LOG, "--output", str(tmp_path / "fresh"), "--resume"]) == 2
    assert f"--resume: {tmp_path / 'fresh' / 'checkpoint'} does not exist" in error_of(capsys, "finetune")


def test_finetune_names_a_missing_model_path(finetune, tmp_path, capsys):
    missing = tmp_path / "models" / "nope"
    assert finetune.main(["--model", str(missing), "--data", LOG, "--output", str(tmp_path / "run")]) == 2
    assert f"--model: could not load '{missing}'" in error_of(capsys, "finetune")
    assert finetune.main(["--model", str(tmp_path / "nope.gguf"), "--data", LOG,
                          "--output", str(tmp_path / "run")]) == 2
    assert "nope.gguf does not exist" in error_of(capsys, "finetune")


def test_what_a_user_sees_from_a_missing_model_path(tmp_path):
    """The case the issue found: the message was clear but came as a traceback."""
    run = subprocess.run([sys.executable, str(ROOT / "training" / "finetune.py"), "--model", str(tmp_path / "nope"),
                          "--data", LOG, "--output", str(tmp_path / "run")],
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("finetune: error: --model: could not load")
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------------------------------------- evaluate.py
def test_evaluate_refuses_missing_adapters_thresholds_records_and_data_before_loading_a_model(
        evaluate, no_model_loads, tmp_path, capsys):
    assert evaluate.main(["--adapter", str(tmp_path / "nope"), "--data", LOG]) == 2
    assert f"--adapter {tmp_path / 'nope'} is not a LayerRoute adapter directory" in error_of(capsys, "evaluate")
    adapter = tmp_path / "adapter"
    LayerRouteModel.from_base(tiny_llama()).save_pretrained(adapter)
    assert evaluate.main(["--adapter", str(adapter), "--lora-only", str(tmp_path / "nope"), "--data", LOG]) == 2
    assert f"--lora-only {tmp_path / 'nope'} is not a LayerRoute adapter" in error_of(capsys, "evaluate")
    assert evaluate.main(["--adapter", str(adapter), "--data", LOG, "--skip-threshold", "1.5"]) == 2
    assert "--skip-threshold: " in error_of(capsys, "evaluate")
    assert evaluate.main(["--adapter", str(adapter), "--data", LOG, "--extra-tokens", "-1"]) == 2
    assert "--extra-tokens must be at least 0" in error_of(capsys, "evaluate")
    assert evaluate.main(["--adapter", str(adapter), "--data", LOG, "--records", str(tmp_path / "no" / "r.jsonl")]) == 2
    assert f"the directory {tmp_path / 'no'} does not exist" in error_of(capsys, "evaluate")
    assert evaluate.main(["--adapter", str(adapter), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl does not exist" in error_of(capsys, "evaluate")
    config = adapter / "layerroute_config.json"
    config.write_text(config.read_text().replace('"base_model": {', '"base_model": {"revision": "main", ', 1))
    assert evaluate.main(["--adapter", str(adapter), "--data", LOG]) == 2
    assert "layerroute_config.json" in error_of(capsys, "evaluate")  # a hand-edited config, before any model loads


def test_evaluate_refuses_an_adapter_trained_on_another_base(evaluate, tmp_path, capsys):
    trained_on = model_dir(tmp_path / "base", tiny_llama(seed=0))
    adapter = tmp_path / "adapter"
    LayerRouteModel.from_base(tiny_llama(seed=0), base_model_name_or_path=trained_on).save_pretrained(adapter)
    other_weights = model_dir(tmp_path / "reseeded", tiny_llama(seed=1))
    assert evaluate.main(["--adapter", str(adapter), "--model", other_weights, "--data", LOG]) == 2
    assert "same shape but different weights" in error_of(capsys, "evaluate")
    other_shape = LayerRouteModel.from_base(tiny_qwen2())
    other_shape.save_pretrained(tmp_path / "qwen-adapter")
    assert evaluate.main(["--adapter", str(adapter), "--lora-only", str(tmp_path / "qwen-adapter"),
                          "--model", trained_on, "--data", LOG]) == 2
    message = error_of(capsys, "evaluate")
    assert f"--lora-only {tmp_path / 'qwen-adapter'}: " in message and "does not fit this base model" in message
