"""`hydra/sweeper=grid`, the default: Hydra's basic sweeper, launching without composing every job first.

Hydra's `BasicSweeper.sweep` composes every job's config (`validate_batch_is_legal`) before it
launches the first, and the launcher composes each job again as it starts it: a 1,000-job grid
waits for 1,000 compositions before anything runs. `transferlab train` has already checked every
swept value before Hydra started (`transferlab.config.sweep_checks`), so this sweeper skips that
pass; the grid, `params`, `max_batch_size` and the launchers are the basic sweeper's.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class GridSweeper(BasicSweeper):
    """BasicSweeper without the pre-launch composition of every job."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Checked already, value by value, by the CLI (transferlab.config.sweep_checks)."""
