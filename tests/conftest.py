import os

# OpenMP threads that spin-wait for busy cores make small CPU ops orders of magnitude slower on a shared
# 2-core machine; passive waiting costs nothing when the cores are free. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
