"""mixserve: an inference server that serves any mix of PEFT adapters per request."""

__version__ = "0.1.0"
