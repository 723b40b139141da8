"""Config schemas (registered in Hydra's ConfigStore on import) and the pure config checks."""

from patholite.config.checks import check_config
from patholite.config.store import register_schemas

register_schemas()

__all__ = ["check_config", "register_schemas"]
