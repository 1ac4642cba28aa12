"""The seed's front door to the settings; the code is in `gateway/config.py`."""

from gateway.config import SETUP_HELP, Config, ConfigError, parse_bind

__all__ = ["SETUP_HELP", "Config", "ConfigError", "parse_bind"]
