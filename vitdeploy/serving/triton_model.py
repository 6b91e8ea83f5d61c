"""Triton Python-backend model that runs vitdeploy's own Runtime on any artifact.

``vitdeploy triton ARTIFACT --repo DIR --triton-backend python`` copies this file to ``DIR/NAME/1/model.py``
beside the artifact. Triton's Python backend imports it inside its stub process (where
``triton_python_backend_utils`` exists); the environment it runs in (``EXECUTION_ENV_PATH``) needs
vitdeploy and the artifact's backend (onnxruntime, openvino or tensorrt) with numpy < 2: the Python
backend hands over empty tensors with numpy 2.

The config's parameters name the artifact and the vitdeploy backend. Triton forms the batch (dynamic
batching); ``execute`` runs all requests of that batch as one ``Runtime.infer`` call and gives every
request its own rows. A request the runtime refuses gets its own error, and the others still get
their answers: the model never stops serving because of one bad input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

from vitdeploy.engines.base import InputError
from vitdeploy.serving.limits import non_finite_reason


def visible_device(kind: str, device_id: str | int, visible: str | None) -> str | None:
    """CUDA_VISIBLE_DEVICES for a GPU instance: Triton gives each instance (its own stub process) a
    device id; making that the process's only device puts instance N on GPU N for every runtime
    (TensorRT, ONNX Runtime's CUDA provider), which all use device 0. None for a CPU instance."""
    if kind != "GPU":
        return None
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    index = int(device_id)
    return ids[index] if index < len(ids) else str(index)


class TritonPythonModel:
    """initialize: open the runtime once per instance; execute: one infer per Triton batch."""

    def initialize(self, args: dict[str, Any]) -> None:
        from vitdeploy.verify import open_verified  # the golden set, once per machine: a drift fails the load

        device = visible_device(args.get("model_instance_kind", "CPU"), args.get("model_instance_device_id", 0),
                                os.environ.get("CUDA_VISIBLE_DEVICES"))
        if device is not None:  # before anything in this process initializes CUDA
            os.environ["CUDA_VISIBLE_DEVICES"] = device
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        artifact = Path(args["model_repository"]) / args["model_version"] / params["VITDEPLOY_ARTIFACT"]
        options = json.loads(params.get("VITDEPLOY_OPTIONS") or "{}")
        # the stub shares the machine's cores with tritonserver's frontend, as `vitdeploy serve`'s runtime
        # shares them with its event loop: both open the runtime the same way
        self.rt = open_verified(artifact, backend=params.get("VITDEPLOY_BACKEND") or "auto",
                                **{"shared_cores": True, **options})
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def _check(self, x: np.ndarray) -> str | None:
        """A reason to refuse one request's input, or None. Triton already checked shape and dtype; the
        rest is the rule `vitdeploy serve` applies (non-finite input is refused)."""
        return non_finite_reason(x, self.input_name)

    def execute(self, requests: list[Any]) -> list[Any]:
        inputs: list[np.ndarray | None] = []
        errors: list[tuple[str, int] | None] = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            reason = self._check(x)
            inputs.append(None if reason else x)
            errors.append((reason, pb_utils.TritonError.INVALID_ARG) if reason else None)
        good = [x for x in inputs if x is not None]
        rows: list[np.ndarray | None] = [None] * len(requests)
        if good:
            try:
                logits = self.rt.infer(np.concatenate(good) if len(good) > 1 else good[0])
                start = 0
                for i, x in enumerate(inputs):
                    if x is not None:
                        rows[i] = logits[start:start + len(x)]
                        start += len(x)
            except Exception:
                # one failing batch: run each request alone so each gets its own answer or error
                for i, x in enumerate(inputs):
                    if x is None:
                        continue
                    try:
                        rows[i] = self.rt.infer(x)
                    except Exception as e:
                        errors[i] = self._refusal(e)
        responses = []
        for out, error in zip(rows, errors, strict=True):
            if out is None:
                message, code = error or ("no answer", pb_utils.TritonError.INTERNAL)
                responses.append(pb_utils.InferenceResponse(output_tensors=[],
                                                            error=pb_utils.TritonError(message, code)))
            else:
                tensor = pb_utils.Tensor(self.output_name, np.ascontiguousarray(out, dtype=np.float32))
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def _refusal(self, e: Exception) -> tuple[str, int]:
        """The client's message for a request the runtime failed: our own words; the details go to the log."""
        pb_utils.Logger.log_error(f"vitdeploy model: a request failed: {type(e).__name__}: {e}")
        if isinstance(e, InputError):
            return (f"input {self.input_name} was refused by the model: send a batch of its input shape and "
                    f"datatype", pb_utils.TritonError.INVALID_ARG)
        return ("the model failed on this request; the Triton server log has the details",
                pb_utils.TritonError.INTERNAL)

    def finalize(self) -> None:
        self.rt.close()
