"""Entry point of one DDP rank: ``torchrun ... -m lcm.train_rank REQUEST.json``.

``lcm train --nproc N`` (through :func:`lcm.training.launch_ranks`) writes the request and
starts N of these; each joins the process group (NCCL on CUDA, gloo on CPU), trains its share
and leaves the group.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as tdist

from lcm.errors import LcmError
from lcm.runtime import dist_from_env, select_device
from lcm.training import read_request, run_training


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: torchrun --nproc-per-node=N -m lcm.train_rank REQUEST.json", file=sys.stderr)
        return 2
    try:
        req = read_request(Path(args[0]))
        dist = dist_from_env()
        device = select_device(req.params.train.device)
    except LcmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        run_training(req, dist)
    finally:
        tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
