"""The KServe v2 / Triton HTTP inference protocol over the data plane, so ``tritonclient.http`` works unchanged:

    GET  /v2, /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}[/versions/1], .../ready, .../config
    POST /v2/models/{name}[/versions/1]/infer   JSON tensors or the binary tensor data extension
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse, Response

from vitdeploy.serving import parsing
from vitdeploy.serving.asgi import InferenceRoutes, RawRequest
from vitdeploy.serving.dataplane import DataPlane
from vitdeploy.serving.errors import HTTPFailure
from vitdeploy.serving.middleware import Answer, RequestScope
from vitdeploy.serving.parsing import Intake, ModelIO


class V2Endpoints:
    """Each handler: check the model name, parse (in a worker thread), call the data plane, encode."""

    def __init__(self, plane: DataPlane, intake: Intake, model: ModelIO, model_name: str, version: str) -> None:
        self.plane, self.intake, self.model, self.name, self.version = plane, intake, model, model_name, version

    def register(self, app: Any) -> None:
        router = app.router
        router.add_api_route("/v2", self.server_metadata, methods=["GET"])
        router.add_api_route("/v2/health/live", self.live, methods=["GET"])
        router.add_api_route("/v2/health/ready", self.ready, methods=["GET"])
        for suffix, handler in (("", self.model_metadata), ("/ready", self.model_ready), ("/config", self.config)):
            route = self._model_route(handler)
            router.add_api_route("/v2/models/{name}" + suffix, route, methods=["GET"])
            router.add_api_route("/v2/models/{name}/versions/{version}" + suffix, route, methods=["GET"])

    def register_inference(self, routes: InferenceRoutes) -> None:
        for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
            routes.add(path, self.infer, "v2_infer")

    async def infer(self, request: RawRequest, scope: RequestScope, name: str, version: str | None = None) -> Answer:
        """A KServe v2 inference request (JSON tensors or the binary tensor data extension) -> the artifact's
        output (logits or embeddings), under its name."""
        if (unknown := self._unknown_model(name, version)) is not None:
            raise HTTPFailure(404, "unknown_model", unknown)
        body = await self.intake.read_chunks(request, scope.lease, scope.start)
        # a thread hand-off costs more than a small binary request's parse (the profile's largest Python cost)
        parse = (parsing.parse_v2_request, body, request.headers, self.model, scope.lease, self.intake)
        req = parse[0](*parse[1:]) if parsing.inline_v2(body, request.headers) else await self.intake.cpu(*parse)
        del body, parse
        out = await scope.infer(req.x)
        encode = (parsing.v2_response, out, self.name, self.model.output_name, req)
        small = out.nbytes <= parsing.INLINE_BYTES // 16
        content, headers = encode[0](*encode[1:]) if small else await self.intake.cpu(*encode)
        return scope.answer(content, "application/octet-stream" if req.binary_output else "application/json", headers)

    async def server_metadata(self) -> Any:
        return {"name": "vitdeploy", "version": self.version, "extensions": ["binary_tensor_data"]}

    async def live(self) -> Any:
        return Response(status_code=200 if self.plane.live() else 503)

    async def ready(self) -> Any:
        """200 when ready; 503 with the reason (preparing, a failed check, draining) as JSON when not."""
        code, body = self.plane.readiness()
        return Response(status_code=200) if code == 200 else JSONResponse(body, status_code=code)

    def model_metadata(self) -> Any:
        model, backend = self.model, self.plane.runtime.backend
        return {"name": self.name, "versions": ["1"], "platform": f"vitdeploy_{backend}",
                "inputs": [{"name": model.input_name, "datatype": model.datatype, "shape": [-1, *model.shape]}],
                "outputs": [{"name": model.output_name, "datatype": "FP32", "shape": [-1, model.output_size]}]}

    def model_ready(self) -> Any:
        return Response(status_code=200 if self.plane.ready() else 503)

    def config(self) -> Any:
        model, backend = self.model, self.plane.runtime.backend
        return {"name": self.name, "platform": f"vitdeploy_{backend}", "max_batch_size": model.max_batch,
                "input": [{"name": model.input_name, "data_type": f"TYPE_{model.datatype}", "dims": list(model.shape)}],
                "output": [{"name": model.output_name, "data_type": "TYPE_FP32", "dims": [model.output_size]}],
                "dynamic_batching": {"max_queue_delay_microseconds": int(self.plane.max_delay_ms * 1000)}}

    # -- helpers -------------------------------------------------------------------------------------------
    def _unknown(self, name: str, version: str | None) -> Any:
        """A 404 for another model or version, else None."""
        unknown = self._unknown_model(name, version)
        return None if unknown is None else JSONResponse({"error": unknown}, status_code=404)

    def _unknown_model(self, name: str, version: str | None) -> str | None:
        """Why ``name`` and ``version`` are not this server's model, or None."""
        if name != self.name:
            return f"unknown model {name!r}: this server serves {self.name!r}"
        if version not in (None, "", "1"):
            return f"unknown version {version!r} of model {name!r}: the only version is '1'"
        return None

    def _model_route(self, handler: Callable[[], Any]) -> Callable[..., Any]:
        """GET /v2/models/{name}[/versions/{version}]<suffix>: 404 for another model, else ``handler()``."""
        async def route(name: str, version: str | None = None) -> Any:
            return self._unknown(name, version) or handler()

        route.__name__ = handler.__name__
        return route
