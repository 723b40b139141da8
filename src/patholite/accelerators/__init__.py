"""Where a run executes: accelerator resolution (the NPU accelerator comes in its own issue)."""

from patholite.accelerators.resolve import ResolvedAccelerator, describe_machine, resolve_accelerator

__all__ = ["ResolvedAccelerator", "describe_machine", "resolve_accelerator"]
