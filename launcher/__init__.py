"""qlora-launch: the laptop side. Light on purpose: nothing here imports torch."""

__version__ = "0.1.0"
