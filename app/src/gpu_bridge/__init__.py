"""gpu-bridge: the control plane between a production backend and GPU hosts running Ollama."""

__version__ = "0.1.0"
