"""Running it: settings, the ``twist`` options, the service tree, health, metrics and draining."""
