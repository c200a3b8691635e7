"""priorbench's Hydra launcher plugin: hydra/launcher=slurm (Hydra loads launchers only from hydra_plugins)."""
