"""Where a run executes: accelerator resolution (``resolve``), the Ascend NPU accelerator for Lightning
(``npu``) and device helpers in torch alone (``runtime``: torch_npu's loading, synchronisation).

Nothing is imported here: ``runtime`` must load without Lightning (models and the measuring children import
it), and a package's ``__init__`` runs before any of its modules.
"""
