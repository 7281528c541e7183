"""Configuration: every option of every command declared once, resolved, and written out.

- :mod:`streamvi.config.option`: what one declaration holds (:class:`Option`).
- :mod:`streamvi.config.options`: the declarations (:data:`OPTIONS`), per command.
- :mod:`streamvi.config.resolve`: defaults, ``serve``'s TOML file and ``STREAMVI_*``
  variables, flags → a typed, checked configuration object; the model's and the engine's
  settings derived from it.
- :mod:`streamvi.config.render`: ``streamvi config --example`` and the tables of
  docs/configuration.md.

The command line (:mod:`streamvi.cli.options`) makes each command's flags from the same
declarations.
"""
from streamvi.config.option import Option, plain
from streamvi.config.options import COMMANDS, OPTION_BY_NAME, OPTIONS, SECTIONS, options_of
from streamvi.config.resolve import (SERVICE_OPTIONS, Config, ServiceConfig, config_class,
                                     load_config, resolve)

__all__ = ["COMMANDS", "OPTIONS", "OPTION_BY_NAME", "SECTIONS", "SERVICE_OPTIONS", "Config",
           "Option", "ServiceConfig", "config_class", "load_config", "options_of", "plain",
           "resolve"]
