"""convlab's Hydra plugins (Hydra discovers plugins in the ``hydra_plugins`` namespace package)."""
