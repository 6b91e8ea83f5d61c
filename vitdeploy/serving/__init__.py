"""Serving: the dynamic batcher, the HTTP server and the Triton repository writer."""

from vitdeploy.serving.batcher import BatcherClosed, DynamicBatcher, QueueFull, RequestTimeout, WorkerDied

__all__ = ["BatcherClosed", "DynamicBatcher", "QueueFull", "RequestTimeout", "WorkerDied"]
