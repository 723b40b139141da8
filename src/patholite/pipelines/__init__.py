"""What a ``compression`` option runs: preflight (every check, once), then its stages in order
(``pipelines.stages``), each handing its model to the next, every produced model saved, reloaded and
recorded the way its task judges it (``pipelines.tasks``)."""
