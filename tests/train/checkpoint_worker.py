"""One rank of the two-process checkpoint integrity test (tests/train/test_checkpoint_integrity_dist.py).

Every rank writes its own files into the step directory, as DeepSpeed and the per-rank RNG files do; the manifest
is hashed by both ranks; then one rank's file of the newest step is damaged and both ranks must choose the same
older step."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from ofa_scale.parallel import collectives
from ofa_scale.training.checkpoint import choose_resume_point, save_checkpoint


class PerRankEngine:
    def save_checkpoint(self, save_dir, tag, save_latest=True):
        rank = dist.get_rank()
        path = Path(save_dir) / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([rank + 1]) * (1000 * (rank + 1)) + tag.encode())


def main(ckpt: Path, out: Path) -> None:
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    for step in (1, 2):
        save_checkpoint(PerRankEngine(), ckpt, step, rank, {"rng": None}, {"world_size": 2}, keep=0)
    if rank == 0:
        victim = ckpt / "step_000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        victim.write_bytes(victim.read_bytes()[:-1] + b"X")
    collectives.barrier()
    point = choose_resume_point(ckpt)
    (out / f"result{rank}.json").write_text(json.dumps({"tag": point.tag}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
