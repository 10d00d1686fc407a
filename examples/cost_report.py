"""Render the trace cost report of recorded ChatLayerRoute steps, and optionally a PNG of it from headless Chromium.

    python examples/agent.py --costs agent_costs.jsonl
    python examples/cost_report.py agent_costs.jsonl --html report.html --screenshot report.png

The README's picture is made the same way from the records of four runs of examples/agent.py on this project's CPU
machine (the default question; "What is the population density of Norway?"; and, with --max-model-steps 4, "Think
step by step: a train travels 120 km in 2 hours, then 60 km in 1 hour. What is its average speed?" and "Tom has 3
boxes with 12 apples each and gives away 10 apples. How many are left? Explain your reasoning."):

    python examples/cost_report.py docs/cost-report-records.jsonl --screenshot docs/cost-report.png

The screenshot needs the `dev` extra (Playwright) and a system Chromium (`apt-get install chromium`); Playwright
drives that executable, so no browser is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from layerroute.costs import CostReport, PriceModel, read_records


def screenshot(page: Path, png: Path, width: int, chromium: str) -> None:
    from playwright.sync_api import sync_playwright  # dev extra: only this option needs it

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        tab = browser.new_page(viewport={"width": width, "height": 600})
        tab.goto(page.resolve().as_uri(), wait_until="load")
        tab.screenshot(path=str(png), full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, help="step-cost JSONL written by the LayerRoute cost callback")
    parser.add_argument("--html", type=Path, default=None, help="write the HTML report here")
    parser.add_argument("--screenshot", type=Path, default=None, help="write a PNG of the whole page here")
    parser.add_argument("--width", type=int, default=1000, help="browser window width for the screenshot (px)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="Chromium executable (default: the one on PATH)")
    parser.add_argument("--steps-per-day", type=int, default=1_000_000, help="for the savings projection")
    parser.add_argument("--usd-per-gpu-hour", type=float, default=2.0)
    parser.add_argument("--achieved-tflops", type=float, default=100.0, help="achieved TFLOP/s of that GPU")
    args = parser.parse_args()
    if args.screenshot and not args.chromium:
        parser.error("--screenshot needs Chromium: apt-get install chromium, or pass --chromium PATH")

    price = PriceModel(usd_per_gpu_hour=args.usd_per_gpu_hour, achieved_tflops=args.achieved_tflops)
    report = CostReport.from_records(read_records(args.records), price, args.steps_per_day)
    print(report.to_markdown())
    with tempfile.TemporaryDirectory() as scratch:
        page = args.html or Path(scratch) / "report.html"
        page.write_text(report.to_html())
        if args.html:
            print(f"HTML report: {args.html}")
        if args.screenshot:
            screenshot(page, args.screenshot, args.width, args.chromium)
            print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
