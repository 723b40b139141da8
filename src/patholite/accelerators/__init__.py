"""Where a run executes: accelerator resolution (``resolve``), the Ascend NPU accelerator for Lightning
(``npu``) and torch_npu's loading (``npu_runtime``).

Nothing is imported here: ``npu_runtime`` must load without Lightning (the measuring children import it), and
a package ``__init__`` runs before any of its modules.
"""
