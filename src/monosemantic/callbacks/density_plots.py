"""Density histograms as pictures: after each validation, the log10 feature-density histogram of the
held-out set and of the training window (many more tokens: the paper's bimodal view) as PNGs in
``<run>/plots/`` and, with a W&B logger, as images."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from monosemantic.plots import density_histogram_figure, save_density_histogram


class DensityPlots(L.Callback):
    """Draws ``pl_module.last_log10_density`` (``{split: log10 density [d_sae]}``, set by the module at the
    end of each validation epoch) on rank 0; skips the sanity check."""

    def __init__(self, dirname: str = "plots", wandb: bool = True) -> None:
        super().__init__()
        self.dirname, self.wandb = dirname, wandb

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if hasattr(pl_module, "members"):  # a sweep: each SAE's plots in its own folder and W&B run
            for module, root, loggers in zip(pl_module.members, pl_module.member_dirs, pl_module.member_loggers):
                self._draw(module, Path(root), loggers, trainer.global_step)
        else:
            self._draw(pl_module, Path(trainer.default_root_dir), trainer.loggers, trainer.global_step)

    def _draw(self, module: L.LightningModule, root: Path, loggers: list, step: int) -> None:
        for split, log10_density in getattr(module, "last_log10_density", {}).items():
            title = f"{split} feature density, step {step}"
            save_density_histogram(log10_density, root / self.dirname / f"{split}_density_step{step:07d}.png",
                                   title=title)
            for lg in loggers if self.wandb else []:
                if type(lg).__name__ == "WandbLogger":
                    import wandb

                    fig = density_histogram_figure(log10_density, f"{split} feature density")
                    lg.experiment.log({f"{split}/feature_density": wandb.Image(fig), "trainer/global_step": step})
