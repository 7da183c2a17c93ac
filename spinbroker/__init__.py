"""spinbroker: a message broker for orchestrating finite-state-machine work across agents."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
