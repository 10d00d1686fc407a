"""The core runs without the optional extras (langchain, plot, hub), and a missing extra is named where it is needed.

One subprocess with those packages made unimportable by a ``sitecustomize`` on ``PYTHONPATH`` (nothing is uninstalled):
it imports every core module, runs ``layerroute steps``, writes a training report, and checks the errors that name
each extra.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("matplotlib", "datasets", "langchain_core", "langchain")
NEEDS_AN_EXTRA = {"serving", "ray_serving"}  # the serve / ray extras, installed by `make install`

SITECUSTOMIZE = f"""
import sys

for name in {BLOCKED!r}:
    sys.modules[name] = None  # `import name` (and of its submodules) raises ImportError; find_spec(name) is None
"""

PROGRAM = f"""
import contextlib, io, json, pkgutil, runpy, sys, warnings
from pathlib import Path

results = {{}}
for name in {BLOCKED!r}:
    try:
        __import__(name)
        results[name] = "importable"
    except ImportError:
        results[name] = "blocked"

import layerroute
core = sorted(m.name for m in pkgutil.iter_modules(layerroute.__path__) if m.name not in {sorted(NEEDS_AN_EXTRA)!r})
for name in core:
    __import__("layerroute." + name)
results["core_modules"] = core

from layerroute.cli import main

def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return [status, out.getvalue(), err.getvalue()]

results["steps"] = run_cli("steps", "tests/fixtures/openai.jsonl")
results["steps_hub"] = run_cli("steps", "openai/gsm8k")

from layerroute.evaluation import plot, write_training_report
output = Path(sys.argv[1])
(output / "metrics.jsonl").write_text(json.dumps({{"step": 1, "lm_loss": 2.0, "seconds": 1.0}}) + "\\n")
report = {{"by_step_type": {{"tool_call": {{"steps": 2, "layers_skipped_frac": 0.5, "flops_skipped_frac": 0.4,
                                          "block_skip_rate": [1.0, 0.0]}}}}}}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    write_training_report(output, report, output / "metrics.jsonl", {{"seed": 0}})
results["report_files"] = sorted(p.name for p in output.iterdir())
results["report_warnings"] = [str(w.message) for w in caught]
try:
    plot(output / "report.png", report, [])
except ImportError as error:
    results["plot_error"] = str(error)

try:
    import langchain_layerroute
except ImportError as error:
    results["langchain_error"] = str(error)

sys.argv = ["finetune.py", "--help"]
with contextlib.redirect_stdout(io.StringIO()) as help_text:
    try:
        runpy.run_path("training/finetune.py", run_name="__main__")
    except SystemExit as stop:
        results["finetune_help"] = [stop.code, "usage:" in help_text.getvalue()]

print("RESULTS " + json.dumps(results))
"""


def test_the_core_imports_and_runs_without_the_optional_extras_and_names_each_missing_one(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    output = tmp_path / "report"
    output.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)]), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(PROGRAM), str(output)], check=False, cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULTS ", 1)[1])

    assert {name: results[name] for name in BLOCKED} == dict.fromkeys(BLOCKED, "blocked")
    assert {"model", "traces", "evaluation", "cli", "steps", "training", "extras"} <= set(results["core_modules"])

    status, stdout, _ = results["steps"]
    assert status == 0 and json.loads(stdout)["traces"] > 0
    status, _, stderr = results["steps_hub"]
    assert status == 2
    assert "layerroute: error: reading 'openai/gsm8k' as a Hugging Face Hub dataset" in stderr
    assert "pip install 'layerroute[hub]'" in stderr

    assert results["report_files"] == ["metrics.jsonl", "report.json", "report.md"]  # everything but the figure
    assert len(results["report_warnings"]) == 1 and "pip install 'layerroute[plot]'" in results["report_warnings"][0]
    assert "matplotlib is not installed" in results["plot_error"]
    assert "pip install 'layerroute[plot]'" in results["plot_error"]
    assert "langchain_core is not installed" in results["langchain_error"]
    assert "pip install 'layerroute[langchain]'" in results["langchain_error"]
    assert results["finetune_help"] == [0, True]


def test_with_the_plot_extra_the_training_report_has_its_figure(tmp_path):
    from layerroute.evaluation import write_training_report

    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "lm_loss": 2.0 - step / 10, "seconds": 1.0,
                    "skip_rate_by_type": {"tool_call": 0.1 * step}}) + "\n" for step in range(1, 4)))
    report = {"by_step_type": {"tool_call": {"steps": 2, "layers_skipped_frac": 0.5, "flops_skipped_frac": 0.4,
                                             "block_skip_rate": [1.0, 0.0]},
                               "planning": {"steps": 2, "layers_skipped_frac": 0.0, "flops_skipped_frac": 0.0,
                                            "block_skip_rate": [0.0, 0.0]}}}
    write_training_report(tmp_path, report, tmp_path / "metrics.jsonl", {"seed": 0})
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![per-block skip rate and training curves](report.png)" in (tmp_path / "report.md").read_text()
