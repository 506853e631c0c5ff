"""Training under accelerate: the shipped launch configs, the launch, and the entry point every process runs.

TRL's convention for scaling out: the training script stays the same and ``accelerate launch --config_file FILE``
decides how many processes run it and how (one GPU, DDP over several, FSDP, DeepSpeed). ``train_lora`` with an
accelerate config hands its training step to ``launch``, which runs ``accelerate launch --config_file FILE -m
training.distributed SPEC``: each process builds the same trainer from the spec and trains its share of every
batch; the main process saves the one adapter into the scratch folder, where ``train_lora`` picks it up.
The main process's progress comes back as JSON lines on the launch's stdout and is relayed to ``on_log``.

On a machine with no GPU the launched processes run on the CPU (gloo, fp32), so a config for several GPUs runs
there as that many CPU processes: how the tests check that the ranks train one shared adapter. (accelerate shards
only on GPUs: on a CPU the FSDP config runs as plain data parallel.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError, RedpenError

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).with_name("accelerate")  # one-gpu.yaml, ddp.yaml, fsdp.yaml
EVENT = "redpen-event "  # the prefix of a progress line on the launch's stdout (other output there is not ours)
SPEC = "launch.json"  # in the scratch folder: what every launched process trains
OUTPUT = "launch.log"  # in the scratch folder: the launched processes' stderr, shown when they fail


class TrainingError(RedpenError):
    """A launched training failed; the message carries the end of its output."""


def resolve_config(value: str | Path) -> Path:
    """An accelerate config file: a path, or the name of a shipped one (``one-gpu``, ``ddp``, ``fsdp``).

    >>> resolve_config("ddp").name
    'ddp.yaml'
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = SHIPPED / f"{value}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
    raise ConfigError(f"--accelerate-config {value}: no such file; give an accelerate config file or one of {names}")


def launch(
    accelerate_config: Path,
    spec: dict[str, Any],
    scratch: Path,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Run the training in ``spec`` under ``accelerate launch --config_file accelerate_config``; return when every
    process has finished, relaying the main process's progress to ``on_log``.

    Raises ``TrainingError`` with the end of the processes' output if any of them fails.
    """
    import torch

    (scratch / SPEC).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # accelerate runs several processes only through its GPU launchers; with this flag their trainers take the
        # CPU and gloo. A GPU config's bf16 is for GPUs: on a CPU redpen trains in fp32 (training.sft_config).
        env["ACCELERATE_USE_CPU"] = "1"
        command += ["--mixed_precision", "no"]
    command += ["-m", "training.distributed", str(scratch / SPEC)]
    log.info("launching the training under accelerate: %s", " ".join(command))
    with (scratch / OUTPUT).open("w", encoding="utf-8") as output:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=output, text=True, env=env)
        try:
            assert process.stdout is not None  # Popen with stdout=PIPE
            for line in process.stdout:
                if line.startswith(EVENT) and on_log is not None:
                    on_log(json.loads(line[len(EVENT) :]))
            code = process.wait()
        finally:
            if process.poll() is None:  # the caller's on_log raised, or Ctrl-C: no process outlives the launch
                process.terminate()
                process.wait()
    if code != 0:
        tail = (scratch / OUTPUT).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise TrainingError(
            f"the training launched with {accelerate_config} failed (exit {code}); its last output:\n" + "\n".join(tail)
        )


def _emit(event: dict[str, Any]) -> None:
    """Send a progress event to the launching process (a line on stdout, which it reads; not output for a person)."""
    sys.stdout.write(EVENT + json.dumps(event) + "\n")
    sys.stdout.flush()


def main(spec_file: str) -> None:
    """What every launched process runs: the training step of ``train_lora``, on its share of each batch."""
    from training.sft_config import LoraSFTConfig
    from training.sft_trainer import train_in_scratch

    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    checkpoint = Path(spec["checkpoint"]) if spec["checkpoint"] is not None else None
    train_in_scratch(
        Path(spec["dataset"]), LoraSFTConfig(**spec["config"]), Path(spec["scratch"]), checkpoint, on_log=_emit
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1])
