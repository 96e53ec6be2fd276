"""macp-router: route MACP sessions to the runtime pod that holds them."""

__version__ = "0.1.0"
