"""Run training/finetune.py with one fault injected at a deterministic point (used by test_crash_safe_training.py).

    python tests/finetune_faults.py POINT N finetune-arguments...

The fault strikes the N-th time the run reaches POINT:

- ``step``: SIGKILL as a training step starts (its batch collated);
- ``sigterm``: SIGTERM as a training step starts (the run saves and stops, as under a scheduler's preemption);
- ``sigint``: SIGINT as a training step starts (Ctrl-C: the run finishes the step, saves and stops);
- ``writing``: SIGKILL inside a checkpoint save, the staging directory holding the adapter but no training state;
- ``staged``: SIGKILL with the new checkpoint staged in full, before the old one is moved aside;
- ``swapping``: SIGKILL between the two renames: the old checkpoint moved aside, the new one not yet in place;
- ``cleanup``: SIGKILL with the new checkpoint in place, the old one not yet removed;
- ``disk-full`` / ``read-only``: the checkpoint's training state cannot be written (ENOSPC) / its staging directory
  cannot be created (EROFS); this works as root too, where a read-only directory would not stop a write.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
import sys
from pathlib import Path

FINETUNE = Path(__file__).resolve().parents[1] / "training" / "finetune.py"


def main() -> int:
    point, due, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    spec = importlib.util.spec_from_file_location("finetune", FINETUNE)
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    reached = 0

    def strike(condition: bool = True) -> bool:
        nonlocal reached
        reached += condition
        return condition and reached == due

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if point in ("step", "sigterm", "sigint"):
        collate = finetune.collate
        sent = {"step": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[point]

        def collate_then_fault(*args, **kwargs):
            if strike():
                os.kill(os.getpid(), sent)
            return collate(*args, **kwargs)

        finetune.collate = collate_then_fault
    elif point == "writing":
        save_pretrained = finetune.LayerRouteModel.save_pretrained

        def save_then_kill(self, directory):
            save_pretrained(self, directory)
            if strike(str(directory).endswith(".tmp")):
                kill()

        finetune.LayerRouteModel.save_pretrained = save_then_kill
    elif point in ("staged", "swapping"):
        replace = os.replace

        def replace_or_kill(source, destination):
            moving = str(destination).endswith("checkpoint.old") if point == "staged" else str(source).endswith(
                "checkpoint.tmp")
            if strike(moving):
                kill()
            replace(source, destination)

        os.replace = replace_or_kill
    elif point == "cleanup":
        import shutil

        rmtree = shutil.rmtree

        def kill_or_rmtree(path, *args, **kwargs):
            if strike(str(path).endswith("checkpoint.old") and Path(path).exists()):
                kill()
            rmtree(path, *args, **kwargs)

        shutil.rmtree = kill_or_rmtree
    elif point == "disk-full":
        write_bytes = Path.write_bytes

        def full_disk(self, data):
            if strike(self.name == "training_state.pt"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return write_bytes(self, data)

        Path.write_bytes = full_disk
    elif point == "read-only":
        mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):
            if strike(self.name == "checkpoint.tmp"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return mkdir(self, *args, **kwargs)

        Path.mkdir = read_only
    else:
        raise SystemExit(f"unknown fault point {point!r}")
    return finetune.main(argv)


if __name__ == "__main__":
    sys.exit(main())
