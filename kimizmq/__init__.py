"""kimizmq: one MLX model across several Macs, layer ranges per machine, ZeroMQ in between."""

__version__ = "0.1.0"
