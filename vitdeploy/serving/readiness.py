"""What `vitdeploy serve` does before it turns ready: warm up the batch sizes the batcher may form and
check the artifact's golden set on this machine (issue 19). It runs in the background once the server
listens (:meth:`vitdeploy.serving.dataplane.DataPlane.prepare`): /healthz answers at once, /readyz and
/v2/health/ready turn ready only when it has passed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitdeploy.engines.base import Runtime

# Every batch size up to this many is warmed, on every instance (Runtime.warm); beyond it, 1, the powers of two
# and the largest: a batch of another size then runs once cold. With TensorRT CUDA graphs, a warmed runtime's
# instances capture only warmed sizes (the first max_graphs of them; a size whose capture failed runs without a
# graph) and run every other size without one, so serving never captures or creates a context, however few sizes
# were warmed. (Warming all of 1..max_batch instead would hold a context and a graph per size per instance.)
WARM_EVERY_SIZE_UP_TO = 16


def warm_sizes(max_batch: int, runtime: Runtime | None = None) -> list[int]:
    """The batch sizes to warm: 1..max_batch when there are at most WARM_EVERY_SIZE_UP_TO, else 1, the
    powers of two and max_batch; within what the runtime takes (a static batch warms only its own)."""
    if max_batch <= WARM_EVERY_SIZE_UP_TO:
        sizes = set(range(1, max_batch + 1))
    else:
        sizes = {1, max_batch, *(2**i for i in range(max_batch.bit_length()) if 2**i <= max_batch)}
    if runtime is not None and runtime.spec.static:
        sizes = {runtime.spec.max_batch}
    return sorted(sizes)


def _warm_and_verify(artifact: Path | None, max_batch: int, verify: bool, allow_drift: bool, require: bool,
                     loaded: Any, rt: Runtime) -> dict[str, Any]:
    from vitdeploy.verify import first_load_check, verification_status, warm_up

    status: dict[str, Any] = {}
    if artifact is not None:  # DriftError, ArtifactChanged or UnverifiedError: the server stays not ready
        outcome = (first_load_check(artifact, rt, allow_drift=allow_drift, loaded=loaded, require=require)
                   if verify else None)
        status = verification_status(artifact, outcome, checked=verify)
    warm_up(rt, warm_sizes(max_batch, rt))
    return status


def warm_and_verify(artifact: str | Path | None, max_batch: int, verify: bool = True,
                    allow_drift: bool = False, require: bool = False) -> Callable[[Runtime], dict[str, Any]]:
    """The work readiness waits for: the golden check of ``artifact`` (once per target, the verdict cached
    beside it; skipped when ``verify`` is False), then the warm-up of :func:`warm_sizes`. Call it before
    the runtime opens ``artifact``: the file is stamped now, and the check refuses a file changed since
    (it would vouch for bytes that were never loaded). The work returns what /readyz adds: ``verified``
    and, in words, why or why not (:func:`vitdeploy.verify.verification_status`). ``require``
    (--require-verified): the runtime as loaded must carry a golden set, else the server is never ready
    (the file checked at start-up may not be the one a worker loads later)."""
    from vitdeploy.verify import LoadStamp

    path = Path(artifact) if artifact else None
    loaded = LoadStamp.take(path) if path is not None and verify else None
    return functools.partial(_warm_and_verify, path, max_batch, verify, allow_drift, require, loaded)
