"""Where a run executes: accelerator resolution, and the Ascend NPU accelerator for Lightning (``npu``)."""

from patholite.accelerators.resolve import ResolvedAccelerator, describe_machine, resolve_accelerator

__all__ = ["ResolvedAccelerator", "describe_machine", "resolve_accelerator"]
