"""Command modules of the ``effvision`` CLI, one file per command."""
