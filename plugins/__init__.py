"""Flywheel's built-in plugins, one module per plugin, registered through the ``flywheel``
entry-point group exactly like third-party plugins."""
