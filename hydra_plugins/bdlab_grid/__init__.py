"""bdlab's grid sweeper as a Hydra plugin: Hydra instantiates sweepers only from the ``hydra_plugins`` namespace,
so this shim names :class:`bdlab.sweeping.sweeper.TwoPhaseSweeper` there (``conf/config.yaml``:
``hydra.sweeper._target_: hydra_plugins.bdlab_grid.GridSweeper``). Hydra imports every plugin module at start-up:
this one imports no more than the sweeper module (Hydra and OmegaConf; bdlab's heavy parts load when a grid is
planned)."""

from bdlab.sweeping import sweeper as _sweeper


class GridSweeper(_sweeper.TwoPhaseSweeper):
    """The two-phase grid sweeper (:class:`bdlab.sweeping.sweeper.TwoPhaseSweeper`), registered with Hydra."""
