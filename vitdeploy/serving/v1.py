"""`vitdeploy serve`'s own routes, over the data plane: classify or embed an image, logits for tensors, and the
probes. A classifier answers /v1/classify and /v1/logits, an embedding model /v1/embed (the artifact's task
says which); the routes of the other task answer 404 with the route to use.

    POST /v1/classify   image bytes (or multipart field "file"); ?top_k=5
    POST /v1/logits     JSON {"inputs": [[C][H][W]...]} or application/octet-stream float32 with X-Shape: n,C,H,W
    POST /v1/embed      image bytes (or multipart field "file") -> {"embedding": [...], "size", "norm", "normalized"};
                        Accept: application/octet-stream -> float32 bytes with X-Shape: 1,D
    GET  /healthz       the process and its inference worker are up
    GET  /readyz        the model is prepared (warm, verified) and the server is not draining
    GET  /metrics       Prometheus text format
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time
import io
import logging
import math
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse, Response

from vitdeploy.engines.base import softmax
from vitdeploy.serving import parsing
from vitdeploy.serving.asgi import InferenceRoutes, RawRequest
from vitdeploy.serving.dataplane import DataPlane
from vitdeploy.serving.errors import HTTPFailure, bad_input
from vitdeploy.serving.limits import Lease, image_cost
from vitdeploy.serving.middleware import Answer, Metrics, RequestScope
from vitdeploy.serving.parsing import Intake, ModelIO

log = logging.getLogger("vitdeploy.serve")


class V1Endpoints:
    """Each handler: parse (in a worker thread), call the data plane, encode."""

    def __init__(self, plane: DataPlane, intake: Intake, model: ModelIO, metrics: Metrics, pixel_limit: int) -> None:
        self.plane, self.intake, self.model, self.metrics, self.pixel_limit = plane, intake, model, metrics, pixel_limit

    def register(self, app: Any) -> None:
        router = app.router
        router.add_api_route("/healthz", self.healthz, methods=["GET"])
        router.add_api_route("/readyz", self.readyz, methods=["GET"])
        router.add_api_route("/metrics", self.metrics_text, methods=["GET"])

    def register_inference(self, routes: InferenceRoutes) -> None:
        routes.add("/v1/classify", self.classify, "classify")
        routes.add("/v1/logits", self.logits, "logits")
        routes.add("/v1/embed", self.embed, "embed")

    async def classify(self, request: RawRequest, scope: RequestScope) -> Answer:
        """Image bytes (or a multipart 'file' field) -> the top-k labels (?top_k=5) as JSON."""
        self._check_task("classification", "/v1/classify")
        if self.plane.runtime.metadata is None:
            raise HTTPFailure(400, "no_metadata", "this artifact has no preprocessing metadata: "
                              "use /v1/logits or re-export it with vitdeploy")
        k = parsing.top_k(request.query_params.get("top_k"), self.model.num_labels if self.model.num_labels > 0
                          else 1000)
        body = await self._image_bytes(request, scope.lease, scope.start)
        x = await self.intake.cpu(self._decode_image, body, scope.lease, scope.rid)
        del body
        logits = await scope.infer(x)
        return scope.answer(await self.intake.cpu(self._top_k_json, logits, k), "application/json")

    async def logits(self, request: RawRequest, scope: RequestScope) -> Answer:
        """JSON {"inputs": [...]} or float32 bytes with X-Shape: n,C,H,W -> the logits."""
        self._check_task("classification", "/v1/logits")
        headers = request.headers
        dims = self._binary_dims(headers)
        body = await self.intake.read_chunks(request, scope.lease, scope.start)
        x = await self.intake.cpu(parsing.decode_tensor, body, dims, self.model, scope.lease, self.intake)
        del body
        out = await scope.infer(x)
        if headers.get("accept") == "application/octet-stream":
            raw = await self.intake.cpu(lambda: np.ascontiguousarray(out, "<f4").tobytes())
            return scope.answer(raw, "application/octet-stream", {"X-Shape": ",".join(map(str, out.shape))})
        return scope.answer(await self.intake.cpu(parsing.json_bytes, {"logits": out.tolist()}), "application/json")

    async def embed(self, request: RawRequest, scope: RequestScope) -> Answer:
        """Image bytes (or a multipart 'file' field) -> the image's embedding as JSON, or as float32 bytes."""
        self._check_task("embedding", "/v1/embed")
        body = await self._image_bytes(request, scope.lease, scope.start)
        x = await self.intake.cpu(self._decode_image, body, scope.lease, scope.rid)
        del body
        out = await scope.infer(x)
        if request.headers.get("accept") == "application/octet-stream":
            raw = np.ascontiguousarray(out[None], "<f4").tobytes()
            return scope.answer(raw, "application/octet-stream", {"X-Shape": f"1,{out.shape[-1]}"})
        return scope.answer(await self.intake.cpu(self._embedding_json, out), "application/json")

    async def healthz(self) -> Any:
        if not self.plane.live():
            return JSONResponse({"status": "worker_died"}, status_code=503)
        return {"status": "ok"}

    async def readyz(self) -> Any:
        code, body = self.plane.readiness()
        return body if code == 200 else JSONResponse(body, status_code=code)

    async def metrics_text(self) -> Any:
        content, media_type = self.metrics.exposition()
        return Response(content, media_type=media_type)

    # -- helpers -------------------------------------------------------------------------------------------
    async def _image_bytes(self, request: RawRequest, lease: Lease, start: float) -> bytes | bytearray:
        """The image: the body, or a multipart form's 'file' field."""
        body = await self.intake.read_body(request, lease, start)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            self.intake.settle(lease, 2 * len(body), "reading this form")
            body = await self.intake.cpu(parsing.multipart_file, body, ctype)
        if not body:
            raise HTTPFailure(400, "bad_input", "empty body: send image bytes")
        return body

    def _binary_dims(self, headers: Any) -> tuple[int, ...] | None:
        """X-Shape of an octet-stream body, checked (with Content-Length) before the body is read."""
        if not headers.get("content-type", "").startswith("application/octet-stream"):
            return None
        dims = parsing.binary_dims(headers.get("x-shape"), self.model.shape, self.model.max_batch)
        want = math.prod(dims) * 4
        declared = parsing.content_length(headers)
        if declared is not None and declared != want and not headers.get("content-encoding"):
            raise bad_input(f"body has {declared} bytes; X-Shape {dims} float32 needs {want}")
        return dims

    def _decode_image(self, body: bytes | bytearray, lease: Lease, rid: str) -> np.ndarray:
        """Image bytes -> the model's input for one image; the header's size is checked (and its decoding
        charged to the memory budget) before anything is decoded."""
        from PIL import Image

        from vitdeploy.preprocess import ImageError, open_image

        body = bytes(body)
        try:
            with Image.open(io.BytesIO(body)) as probe:  # reads the header only
                width, height = probe.size
        except Image.DecompressionBombError:
            width, height = 1 << 31, 1
        except Exception:  # unreadable: open_image says so below
            width, height = 0, 0
        if width * height > self.pixel_limit:
            raise HTTPFailure(413, "too_large", f"image of {width * height} pixels is over this server's limit of "
                              f"{self.pixel_limit} (--max-image-pixels): send a smaller image")
        resized = self._resized_pixels(width, height)
        self.intake.settle(lease, len(body) + image_cost(body, width * height, resized), "decoding this image")
        try:
            image = open_image(body)
        except ImageError as e:
            log.info("request %s: unreadable image: %s", rid, e)
            raise HTTPFailure(400, "bad_image", "the body is not a readable image: send JPEG, PNG, WebP, BMP, "
                              "GIF or TIFF bytes, or a multipart 'file' field holding one") from None
        # the batch form this artifact takes (float32 NCHW, or uint8 NHWC), from its metadata
        try:
            return np.asarray(self.plane.runtime.preprocess([image]))[0]
        except ImageError as e:  # a resize too large for the library's own limit: our words, no internals
            raise HTTPFailure(400, "bad_image", str(e)) from None

    def _check_task(self, task: str, route: str) -> None:
        """A 404 naming the routes that fit, for a route of the other task (checked before the body is read)."""
        if (self.model.task == "embedding") == (task == "embedding"):
            return
        if self.model.is_embedding:
            fits = "POST images to /v1/embed, or tensors to /v2/models/NAME/infer"
        else:
            fits = "POST images to /v1/classify, or tensors to /v1/logits or /v2/models/NAME/infer"
        raise HTTPFailure(404, "wrong_task", f"{route} is for {task.replace('classification', 'classifier')} "
                          f"models, and this model's artifact says task {self.model.task}: {fits}")

    def _embedding_json(self, vector: np.ndarray) -> bytes:
        v = np.asarray(vector, np.float32)
        return parsing.json_bytes({"embedding": v.tolist(), "size": int(v.shape[-1]),
                                   "norm": float(np.linalg.norm(v.astype(np.float64))),
                                   "normalized": self.model.normalized})

    def _resized_pixels(self, width: int, height: int) -> int:
        """Pixels of the resize before the centre crop (a thin image's grows with its aspect ratio under
        crop_pct), known from the header: charged with the decoding, and a 400 when over the pixel limit."""
        from vitdeploy.preprocess import Preprocessing

        if width < 1 or height < 1:  # unreadable: open_image says so
            return 0
        prep = Preprocessing.from_dict(self.plane.runtime.metadata.preprocessing)  # type: ignore[union-attr]
        nw, nh = prep.resized_size(width, height)
        if nw * nh > self.pixel_limit:
            raise HTTPFailure(400, "bad_image", f"an image of {width}x{height} pixels would be resized to {nw}x{nh} "
                              f"before its centre crop (crop_pct {prep.crop_pct}), over this server's limit of "
                              f"{self.pixel_limit} pixels (--max-image-pixels): crop it nearer to square first")
        return nw * nh

    def _top_k_json(self, logits: np.ndarray, k: int) -> bytes:
        probs = softmax(logits[None])[0]
        idx = np.argsort(-probs)[:k]
        labels = self.model.labels
        return parsing.json_bytes({"top_k": [{"label": labels[i] if i < len(labels) else str(i), "index": int(i),
                                              "score": float(probs[i])} for i in idx]})
