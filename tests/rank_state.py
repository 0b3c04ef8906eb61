"""A test-only callback, loaded into real DDP runs with ``+callbacks.rank_state._target_=rank_state.DumpRankState``
(``tests/`` on PYTHONPATH): each rank writes its SAE parameters and counters after the given steps, so a test can
compare the ranks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from safetensors.torch import save_file


class DumpRankState(L.Callback):
    def __init__(self, out_dir: str, steps: list[int]) -> None:
        self.out_dir, self.steps = Path(out_dir), [int(s) for s in steps]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step not in self.steps:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        members = list(getattr(pl_module, "members", [pl_module]))  # an SAESweepModule: each of its SAEs
        tensors = {}
        for i, m in enumerate(members):
            prefix = f"members.{i}." if len(members) > 1 else ""
            tensors.update({f"{prefix}sae.{k}": v for k, v in m.sae.state_dict().items()})
            tensors.update({f"{prefix}tokens_since_fired": m.tokens_since_fired, f"{prefix}tokens_seen": m.tokens_seen,
                            f"{prefix}window_fires": m.window_fires})
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(self.out_dir / f"step{trainer.global_step}_rank{trainer.global_rank}.safetensors"))
