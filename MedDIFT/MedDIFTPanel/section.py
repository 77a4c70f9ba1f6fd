"""What every panel section has: the panel it belongs to, and do-nothing hooks to override."""

from __future__ import annotations


class Section:
    """One feature area of the panel. ``panel`` is the module's widget (``ui``, ``logic``,
    ``parameterNode``, ``showStatus``, ``appendLog``)."""

    def __init__(self, panel) -> None:
        self.panel = panel
        self.ui = panel.ui

    def update(self, parameterNode, running: bool) -> None:
        """Refresh the section's widgets from the parameter node (None: no scene) and the run state."""

    def reset(self) -> None:
        """Forget every node of the scene that is being closed."""

    def cleanup(self) -> None:
        """Stop timers, processes and observers (the module is being unloaded)."""
