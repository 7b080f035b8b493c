"""Integrations with simulation engines (optional dependencies, imported on demand).

* :mod:`quests_torch.integrations.torch_sim`: batched MD and relaxation with torch-sim
  (``pip install quests-torch[mlip]``).

The ASE integration lives in :mod:`quests_torch.calculators` (ASE is a core dependency).
"""
