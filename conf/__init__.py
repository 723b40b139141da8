"""patholite's Hydra configs, shipped as the package ``patholite.conf`` (see pyproject.toml)."""
