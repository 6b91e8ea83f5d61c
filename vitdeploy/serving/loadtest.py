"""Load test for any KServe v2 server (`vitdeploy serve`, Triton, KServe), like perf_analyzer's
``--concurrency-range``: at each concurrency level that many closed-loop clients (one
tritonclient.http client per thread, binary tensors) send one-row requests; requests/s and latency
percentiles per level, the server-side batch sizes where the server reports them, and every answer
checked against its own request's rows.

How answers are checked. The run draws ``rows`` distinct inputs (seeded); request k sends row
``k % rows``, so the same row is sent by different clients and different rows are in flight together.
Before the load, one client sends every row once, one request at a time: with nothing else in flight no
answer can carry another request's rows, so these answers are each row's expected answer (or, with a
``reference`` artifact, the expected answers are its logits computed here, and the server's sequential
answers must match them). The expected answers must differ pairwise (else requests could not be told
apart: an error). Under load each answer must have the right shape, be finite and match its own row's
expected answer; one that matches another row's answer is counted as *crossed*, any other as *wrong*.

The server is not trusted (issue 29): every answer is read within a size limit (:data:`LIMITS`), every
request has one deadline for the whole exchange (not per read), no redirect is followed, the input built
from the model's metadata is capped, and each of these ends in one line of VitDeployError.

A client, not a server: this module never imports the serving app (tests/test_loadtest.py checks it).
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.errors import VitDeployError

NUMPY_TYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "UINT8": np.uint8, "INT8": np.int8}


@dataclass(frozen=True)
class Limits:
    """What this client takes from a server it does not trust (tests use small ones)."""

    metadata_bytes: int = 1 << 20  # /v2/models/NAME
    metrics_bytes: int = 16 << 20  # /metrics, /v2/models/NAME/stats
    answer_bytes: int = 64 << 20  # one inference answer
    row_bytes: int = 64 << 20  # one input row, from the model's shape and type
    input_bytes: int = 1 << 30  # every distinct row together (--rows x a row)
    head_bytes: int = 64 << 10  # a response's status line and headers


LIMITS = Limits()


def _th() -> Any:
    try:
        import tritonclient.http as th
    except ImportError:
        raise VitDeployError("the load test needs tritonclient: pip install 'vitdeploy[triton]'") from None
    _bound_response_heads()
    return th


@functools.cache
def _bound_response_heads() -> None:
    """geventhttpclient (under tritonclient and :func:`_get`) reads a response's headers without limit, and a
    server sending them as fast as it can never lets a gevent deadline fire (each read returns at once): its
    response class, as its client module makes them, is given a limit of LIMITS.head_bytes (a client-side
    process only: this module is never imported by the server)."""
    import geventhttpclient.client as client

    class BoundedHead(client.HTTPSocketPoolResponse):  # type: ignore[misc,name-defined]
        head = 0

        def feed(self, data: Any) -> None:
            if not self.headers_complete:
                self.head += len(data)
                if self.head > LIMITS.head_bytes:
                    raise LoadTestError(f"a response's headers are over the {LIMITS.head_bytes} bytes this "
                                        "client reads")
            super().feed(data)

    client.HTTPSocketPoolResponse = BoundedHead


def batch_histogram(metrics: str) -> tuple[float, float, dict[str, float]]:
    """Rows and batches from `vitdeploy serve`'s vitdeploy_batch_size histogram, with its cumulative buckets."""
    total = re.search(r"^vitdeploy_batch_size_sum ([\d.e+-]+)$", metrics, re.M)
    count = re.search(r"^vitdeploy_batch_size_count ([\d.e+-]+)$", metrics, re.M)
    if not total or not count:
        raise ValueError("no vitdeploy_batch_size histogram in these metrics")
    buckets = dict(re.findall(r'^vitdeploy_batch_size_bucket\{le="([^"]+)"\} ([\d.e+-]+)$', metrics, re.M))
    return float(total.group(1)), float(count.group(1)), {k: float(v) for k, v in buckets.items()}


@dataclass
class ModelInfo:
    """What the server's /v2/models/NAME says: one input and one output, the batch axis first."""

    name: str
    input_name: str
    datatype: str
    shape: list[int]  # one row, without the batch axis
    output_name: str


@dataclass
class ServerBatches:
    """Batches the server ran during one level: rows, batches, and a histogram of batch sizes.
    ``sizes``: Triton's exact sizes ("4": batches of 4), or `vitdeploy serve`'s buckets ("<=4": 3..4)."""

    source: str
    rows: float
    batches: float
    sizes: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


@dataclass
class LevelResult:
    concurrency: int
    sent: int
    answered: int
    errors: int
    crossed: int
    wrong: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    batches: ServerBatches | None = None
    processes: int = 1  # client processes the clients were split over
    examples: list[str] = field(default_factory=list)  # the first few bad answers and errors, in words

    @property
    def bad(self) -> int:
        return self.errors + self.crossed + self.wrong


@dataclass
class LoadReport:
    url: str
    model: ModelInfo
    rows: int
    reference: str | None
    tolerance: float
    machine: dict[str, Any]
    levels: list[LevelResult] = field(default_factory=list)
    unsent: int = 0  # requests not sent because a level reached its time limit

    @property
    def problems(self) -> list[str]:
        """One line per level whose answers were not all their own request's (empty: every answer checked)."""
        out = []
        for lv in self.levels:
            if lv.bad:
                out.append(f"concurrency {lv.concurrency}: {lv.crossed} answer(s) carried another request's rows, "
                           f"{lv.wrong} wrong, {lv.errors} error(s), of {lv.sent} requests"
                           f"{' (e.g. ' + '; '.join(lv.examples[:2]) + ')' if lv.examples else ''}")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for lv, out in zip(self.levels, d["levels"], strict=True):
            out["bad"] = lv.bad
            if lv.batches:
                out["batches"]["mean"] = lv.batches.mean
        d["ok"] = self.ok
        return d

    def write_json(self, path: str | Path) -> None:
        from vitdeploy.io import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2).encode())

    def write_plot(self, path: str | Path) -> None:
        plot({self.model.name: self}, path)

    def table(self, width: int | None = None, wide: bool = False) -> Any:
        from vitdeploy.tables import Column, fit_table

        columns = [Column("clients", 0), Column("requests/s", 0), Column("p50 ms", 0), Column("p90 ms", 2),
                   Column("p99 ms", 0), Column("answered", 1), Column("bad", 0), Column("mean batch", 1),
                   Column("batches", 3), Column("client procs", 3)]
        rows = []
        for lv in self.levels:
            b = lv.batches
            rows.append([str(lv.concurrency), f"{lv.requests_per_s:.1f}", f"{lv.p50_ms:.2f}", f"{lv.p90_ms:.2f}",
                         f"{lv.p99_ms:.2f}", f"{lv.answered}/{lv.sent}", str(lv.bad),
                         f"{b.mean:.2f}" if b else "-", f"{b.batches:.0f}" if b else "-", str(lv.processes)])
        source = next((lv.batches.source for lv in self.levels if lv.batches), None)
        caption = (f"{self.rows} distinct inputs, every answer checked against "
                   f"{'the reference ' + Path(self.reference).name if self.reference else 'its row'}"
                   f" (tolerance {self.tolerance:g}); batch sizes: {source or 'not reported by the server'}")
        return fit_table(f"{self.model.name} at {self.url} ({self.model.datatype} {self.model.shape})", columns,
                         rows, width, wide, caption)


def plot(reports: Mapping[str, LoadReport], path: str | Path) -> None:
    """Throughput against p50/p99 latency, one line per report, each point labelled with its concurrency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VitDeployError("--plot needs matplotlib: pip install 'vitdeploy[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, report in reports.items():
        x = [lv.requests_per_s for lv in report.levels]
        for pct, style in (("p50", "o-"), ("p99", "s--")):
            y = [getattr(lv, f"{pct}_ms") for lv in report.levels]
            ax.plot(x, y, style, label=f"{label} {pct}")
            for lv, xi, yi in zip(report.levels, x, y, strict=True):
                ax.annotate(str(lv.concurrency), (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel="requests / s", ylabel="latency (ms)", yscale="log",
           title="throughput vs latency (points: concurrent clients)")
    ax.legend(fontsize=7)
    machine = next(iter(reports.values())).machine if reports else {}
    fig.suptitle(f"vitdeploy bench --url, client on {machine.get('cpu', '?')}", fontsize=9)
    fig.tight_layout()
    from vitdeploy.io import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# -- the server: metadata and batch statistics ------------------------------------------------------------
def _host(url: str) -> tuple[str, bool]:
    """'http://h:p' | 'https://h:p' | 'h:p' -> ('h:p', ssl)."""
    url = url.strip().rstrip("/")
    ssl = url.startswith("https://")
    host = re.sub(r"^https?://", "", url)
    if not host or "/" in host:
        raise VitDeployError(f"--url {url!r} is not a server address: give http://HOST:PORT")
    return host, ssl


def auth_headers(api_key: str | None) -> dict[str, str] | None:
    """``Authorization: Bearer KEY`` for a keyed server (None without a key); a key HTTP cannot carry as
    it is (not printable ASCII) is refused in one line."""
    if not api_key:
        return None
    if not (api_key.isascii() and api_key.isprintable()) or " " in api_key:
        raise VitDeployError("the API key holds characters an HTTP header cannot carry (non-ASCII, spaces or "
                             "control characters): use the key the server was started with")
    return {"Authorization": f"Bearer {api_key}"}


class LoadTestError(VitDeployError):
    """What the server answered (or did not) that the load test cannot use."""


def _base(url: str) -> str:
    host, ssl = _host(url)
    return f"{'https' if ssl else 'http'}://{host}"


def _read_bounded(response: Any, limit: int, what: str) -> bytes:
    """A geventhttpclient response's body, refused once it passes ``limit`` bytes (by its Content-Length
    before reading, else as it arrives): a hostile server cannot make this client hold more."""
    length = response.content_length
    if length is not None and length > limit:
        raise LoadTestError(f"{what} is {length} bytes, over the {limit} this client reads")
    chunks, total = [], 0
    while chunk := response.read(1 << 16):
        total += len(chunk)
        if total > limit:
            raise LoadTestError(f"{what} is over the {limit} bytes this client reads")
        chunks.append(chunk)
    return b"".join(chunks)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def _get(url: str, limit: int, timeout: float, headers: Mapping[str, str] | None, what: str) -> tuple[int, bytes]:
    """GET ``url`` -> (status, body): the whole exchange within ``timeout`` seconds, the body within
    ``limit`` bytes, no redirect followed. OSError when nothing answers; LoadTestError for the rest."""
    import gevent
    from geventhttpclient import URL, HTTPClient

    _bound_response_heads()
    u = URL(url)
    try:
        with gevent.Timeout(timeout, TimeoutError(f"no whole answer within {timeout:g} s")):
            client = HTTPClient.from_url(u, connection_timeout=timeout, network_timeout=timeout, concurrency=1)
            try:
                response = client.get(u.request_uri, headers=dict(headers or {}))
                status, location = response.status_code, response.get("location")
                body = _read_bounded(response, limit, f"{what} ({url})")
            finally:
                client.close()
    except (LoadTestError, OSError):
        raise
    except Exception as e:  # parse errors, the deadline: all one line for a user
        raise LoadTestError(f"{what} at {url}: {_one_line(e)}") from None
    if 300 <= status < 400:
        raise LoadTestError(f"{what} at {url} redirects (HTTP {status}) to {location}: the load test follows no "
                            "redirect; give the server's own address")
    return status, body


def _client(url: str, timeout: float) -> Any:
    host, ssl = _host(url)
    return _bounded_client()(host, ssl=ssl, connection_timeout=timeout, network_timeout=timeout)


class _ReadAnswer:
    """An answer read whole (within :data:`LIMITS`), with the interface tritonclient reads it through."""

    def __init__(self, response: Any, body: bytes) -> None:
        self.response, self.body, self.at = response, body, 0
        self.status_code = response.status_code

    def get(self, key: str, default: Any = None) -> Any:
        if key.lower() == "content-encoding":  # the body is inflated already (:func:`_inflate_bounded`)
            return default
        return self.response.get(key, default)

    def read(self, length: int | None = None) -> bytes:
        end = len(self.body) if length is None else self.at + length
        chunk, self.at = self.body[self.at:end], min(end, len(self.body))
        return chunk


@functools.cache
def _bounded_client() -> Any:
    """tritonclient's HTTP client class, reading each answer whole within LIMITS.answer_bytes before
    tritonclient parses it (its own read takes whatever the server sends)."""

    class BoundedClient(_th().InferenceServerClient):  # type: ignore[misc]
        def _post(self, request_uri: str, request_body: Any, headers: Any, query_params: Any) -> Any:
            response = super()._post(request_uri, request_body, headers, query_params)
            body = _read_bounded(response, LIMITS.answer_bytes, "an inference answer")
            encoding = (response.get("Content-Encoding") or "identity").strip().lower()
            if encoding != "identity":  # inflated here within the limit: tritonclient inflates whatever it gets
                body = _inflate_bounded(body, encoding, LIMITS.answer_bytes, "an inference answer")
            return _ReadAnswer(response, body)

    return BoundedClient


def _inflate_bounded(body: bytes, encoding: str, limit: int, what: str) -> bytes:
    """A gzip or deflate body inflated to at most ``limit`` bytes: 64 MiB of gzip is a gzip bomb of 64 GiB."""
    import zlib

    if encoding not in ("gzip", "deflate"):
        raise LoadTestError(f"{what} has Content-Encoding {encoding[:20]!r}: this client reads gzip or deflate")
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib framing, told apart by the header
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise LoadTestError(f"{what} is not valid {encoding} data ({e})") from None
    if len(out) > limit:
        raise LoadTestError(f"{what} is over the {limit} bytes this client reads once decompressed ({encoding})")
    return out


def _metadata(url: str, model: str, timeout: float, headers: Mapping[str, str] | None) -> dict[str, Any]:
    """The server's /v2/models/NAME as JSON; one-line errors for no server, a key asked for, no model."""
    from urllib.parse import quote

    try:
        status, body = _get(f"{_base(url)}/v2/models/{quote(model, safe='')}", LIMITS.metadata_bytes, timeout,
                            headers, "the model's metadata")
    except OSError as e:
        raise VitDeployError(f"no KServe v2 server answers at {url} ({e}): start one, or check --url") from None
    if status in (401, 403):
        raise VitDeployError(f"the server at {url} refused the API key (HTTP {status})" if headers else
                             f"the server at {url} asks for an API key (HTTP {status}): give --api-key-file FILE "
                             "or set VITDEPLOY_API_KEY")
    if status != 200:
        raise VitDeployError(f"the server at {url} has no model {model!r} (HTTP {status}): check --model "
                             "(GET /v2/models/NAME)")
    try:
        meta = json.loads(body)
    except (ValueError, RecursionError):
        raise VitDeployError(f"the server at {url} answered /v2/models/{model} with something that is not JSON"
                             ) from None
    if not isinstance(meta, dict):
        raise VitDeployError(f"the server at {url} answered /v2/models/{model} with JSON that is not an object")
    return meta


def _tensor(d: Any, model: str) -> tuple[str, str, list[int]]:
    """One KServe v2 tensor description -> (name, datatype, shape), or a one-line error."""
    try:
        name, datatype, shape = d["name"], d.get("datatype", ""), d.get("shape", [])
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) or any(
                type(v) is not int for v in shape):
            raise TypeError
    except (KeyError, TypeError, AttributeError):
        raise VitDeployError(f"model {model!r}'s metadata is malformed: a tensor is not {{name, datatype, shape}} "
                             "with a shape of integers") from None
    return name, datatype, shape


def model_info(url: str, model: str, timeout: float = 30.0, headers: Mapping[str, str] | None = None) -> ModelInfo:
    """The model's input and output from the server's /v2/models/NAME; VitDeployError naming what is missing."""
    meta = _metadata(url, model, timeout, headers)
    inputs, outputs = meta.get("inputs") or [], meta.get("outputs") or []
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != 1 or len(outputs) < 1:
        raise VitDeployError(f"model {model!r} has {len(inputs)} inputs and {len(outputs)} outputs: the load test "
                             "drives models with one input and at least one output")
    name, datatype, shape = _tensor(inputs[0], model)
    if not shape or shape[0] not in (-1, 1) or any(d < 1 for d in shape[1:]):
        raise VitDeployError(f"model {model!r} takes shape {shape}: the load test sends one row per request, so "
                             "it needs a batch axis first (-1 or 1) and fixed other dimensions")
    if datatype not in NUMPY_TYPES:
        raise VitDeployError(f"model {model!r} takes {datatype[:40]!r}: the load test sends "
                             f"{', '.join(NUMPY_TYPES)}")
    row_bytes = math.prod(shape[1:]) * np.dtype(NUMPY_TYPES[datatype]).itemsize
    if row_bytes > LIMITS.row_bytes:
        raise VitDeployError(f"model {model!r} takes shape {shape} of {datatype}: {row_bytes} bytes a row, over the "
                             f"{LIMITS.row_bytes} this load test builds")
    return ModelInfo(model, name, datatype, shape[1:], _tensor(outputs[0], model)[0])


def _scrape(url: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> str | None:
    """A metrics or statistics page as text; None where nothing answers it (200 only)."""
    try:
        status, body = _get(url, LIMITS.metrics_bytes, timeout, headers, "the server's batch statistics")
    except OSError:
        return None
    return body.decode("utf-8", "replace") if status == 200 else None


@dataclass
class _Counts:
    source: str
    rows: float
    batches: float
    sizes: dict[str, float]  # cumulative for vitdeploy's buckets, plain counts for Triton's sizes
    cumulative: bool = False


def _batch_counts(url: str, model: str, metrics_url: str | None, headers: Mapping[str, str] | None = None,
                  timeout: float = 10.0) -> _Counts | None:
    """The server's batch counters now: `vitdeploy serve`'s /metrics histogram, else Triton's v2 statistics
    (/v2/models/NAME/stats, with each batch size's count), else Triton's nv_inference_* at ``metrics_url``."""
    from urllib.parse import quote

    base = _base(url)
    text = _scrape(metrics_url or base + "/metrics", headers, timeout)
    if text and "vitdeploy_batch_size_count" in text:
        try:
            rows, batches, buckets = batch_histogram(text)
            return _Counts("vitdeploy_batch_size (/metrics)", rows, batches, buckets, cumulative=True)
        except ValueError:  # a histogram in a form we cannot read: no batch statistics
            return None
    stats = _scrape(f"{base}/v2/models/{quote(model, safe='')}/stats", headers, timeout)
    if stats:
        try:
            s = json.loads(stats)["model_stats"][0]
            sizes = {str(b["batch_size"]): float(b["compute_infer"]["count"]) for b in s.get("batch_stats", [])}
            return _Counts("Triton statistics (/v2/models/NAME/stats)", float(s["inference_count"]),
                           float(s["execution_count"]), sizes)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
            pass
    if text:
        def value(metric: str) -> float | None:
            m = re.search(rf'^{metric}{{[^}}]*model="{re.escape(model)}"[^}}]*}} ([\d.e+-]+)$', text, re.M)
            return float(m.group(1)) if m else None

        rows, batches = value("nv_inference_count"), value("nv_inference_exec_count")
        if rows is not None and batches is not None:
            return _Counts("nv_inference_count / nv_inference_exec_count", rows, batches, {})
    return None


def _batches_between(a: _Counts | None, b: _Counts | None) -> ServerBatches | None:
    if a is None or b is None or a.source != b.source:
        return None
    sizes = {k: b.sizes.get(k, 0.0) - a.sizes.get(k, 0.0) for k in b.sizes}
    if b.cumulative:  # Prometheus buckets count everything <= le: per-bucket counts
        order = sorted(sizes, key=lambda k: float(k))
        sizes = {f"<={k}": sizes[k] - (sizes[order[i - 1]] if i else 0.0) for i, k in enumerate(order)}
    return ServerBatches(b.source, b.rows - a.rows, b.batches - a.batches, {k: v for k, v in sizes.items() if v})


# -- the requests and their answers -----------------------------------------------------------------------
def make_inputs(info: ModelInfo, rows: int, seed: int = 0) -> np.ndarray:
    """``rows`` distinct seeded inputs of the model's type: pixels 0..255 for integer inputs, N(0, 1) else."""
    rng = np.random.default_rng(seed)
    dtype = NUMPY_TYPES[info.datatype]
    if np.issubdtype(dtype, np.integer):
        info_range = np.iinfo(dtype)
        return rng.integers(max(info_range.min, 0), info_range.max + 1, (rows, *info.shape), dtype=dtype)
    return rng.standard_normal((rows, *info.shape)).astype(dtype)


class _Sender:
    """One thread's tritonclient.http client: sends row i, returns its answer (float64, batch axis kept).
    Each request has ``timeout`` seconds for the whole exchange; after a failed one the client reconnects
    (what is left of a refused answer must not be read as the next one)."""

    def __init__(self, url: str, info: ModelInfo, x: np.ndarray, timeout: float,
                 headers: Mapping[str, str] | None = None) -> None:
        self.th, self.info, self.x, self.url, self.timeout = _th(), info, x, url, timeout
        self.headers = dict(headers) if headers else None
        self.client = _client(url, timeout)
        self.output = [self.th.InferRequestedOutput(info.output_name, binary_data=True)]

    def send(self, i: int) -> np.ndarray:
        import gevent

        inp = self.th.InferInput(self.info.input_name, [1, *self.info.shape], self.info.datatype)
        inp.set_data_from_numpy(self.x[i:i + 1], binary_data=True)
        try:
            with gevent.Timeout(self.timeout, TimeoutError(f"no whole answer within {self.timeout:g} s")):
                result = self.client.infer(self.info.name, [inp], outputs=self.output, headers=self.headers)
                out = result.as_numpy(self.info.output_name)
        except BaseException:
            self.client.close()
            self.client = _client(self.url, self.timeout)
            raise
        if out is None:
            raise VitDeployError(f"the answer has no output {self.info.output_name!r}")
        return np.asarray(out)

    def close(self) -> None:
        self.client.close()


class Checker:
    """Tells whether an answer is its own row's: ok, crossed (another row's answer) or wrong (why)."""

    def __init__(self, expected: np.ndarray, tolerance: float) -> None:
        self.expected = np.asarray(expected, np.float64)
        self.tolerance = tolerance
        flat = self.expected.reshape(len(self.expected), -1)
        self.scale = np.maximum(1.0, np.abs(flat).max(1))  # tolerance relative to each row's largest logit
        self.flat = flat

    def distance(self, answer: np.ndarray) -> np.ndarray:
        """Each row's scaled max-abs difference from ``answer``."""
        return np.abs(self.flat - answer.reshape(1, -1)).max(1) / self.scale

    def check(self, row: int, answer: np.ndarray) -> tuple[str, str]:
        """-> ('ok' | 'crossed' | 'wrong', what was wrong)."""
        if answer.shape != (1, *self.expected.shape[1:]):
            return "wrong", f"row {row}: answer of shape {list(answer.shape)}, not {[1, *self.expected.shape[1:]]}"
        a = answer.astype(np.float64)
        if not np.isfinite(a).all():
            return "wrong", f"row {row}: answer not finite"
        d = self.distance(a)
        if d[row] <= self.tolerance:
            return "ok", ""
        other = int(np.argmin(d))
        if d[other] <= self.tolerance:
            return "crossed", f"the request for row {row} got row {other}'s answer"
        return "wrong", f"row {row}: answer differs from its expected one by {d[row]:.3g} (relative)"

    def require_distinct(self) -> None:
        """VitDeployError if two rows' expected answers are within tolerance: answers could not be told apart."""
        for i in range(len(self.flat)):
            d = np.abs(self.flat - self.flat[i]).max(1) / np.maximum(self.scale, self.scale[i])
            d[i] = np.inf
            j = int(np.argmin(d))
            if d[j] <= 2 * self.tolerance:
                raise VitDeployError(f"distinct inputs {i} and {j} get the same answer (within {d[j]:.3g}): the "
                                     "load test cannot tell requests apart on this model; give more --rows "
                                     "or a smaller --tolerance")


def _send_alone(sender: _Sender, i: int) -> np.ndarray:
    try:
        return sender.send(i)
    except VitDeployError as e:
        raise VitDeployError(f"the server's answer for row {i}, sent alone: {e}") from None
    except Exception as e:  # whatever the server sent: one line, not tritonclient's traceback
        raise VitDeployError(f"the server's answer for row {i}, sent alone, is not a KServe v2 answer "
                             f"({_one_line(e)})") from None


def expected_answers(url: str, info: ModelInfo, x: np.ndarray, reference: str | Path | None, tolerance: float,
                     timeout: float, headers: Mapping[str, str] | None = None) -> Checker:
    """Every row sent once, one request at a time (none in flight together, so none can be crossed): each
    row's expected answer, or, with a ``reference`` artifact, checked against its logits computed here."""
    sender = _Sender(url, info, x, timeout, headers)
    try:
        answers = [_send_alone(sender, i) for i in range(len(x))]
    finally:
        sender.close()
    for i, a in enumerate(answers):
        if a.ndim < 1 or a.shape[0] != 1 or not np.isfinite(a.astype(np.float64)).all():
            raise VitDeployError(f"the server's answer for row {i} alone has shape {list(a.shape)} "
                                 f"{'and is not finite' if a.size else ''}: not one finite row of outputs")
    served = np.concatenate(answers)
    if reference is None:
        checker = Checker(served, tolerance)
    else:
        from vitdeploy.engines import open_runtime

        with open_runtime(reference) as rt:
            checker = Checker(np.asarray(rt.infer(x)), tolerance)
        for i, a in enumerate(answers):
            status, why = checker.check(i, a)
            if status != "ok":
                raise VitDeployError(f"the server's answer for row {i}, sent alone, is not the reference's "
                                     f"({why}): is --reference the model the server serves?")
    checker.require_distinct()
    return checker


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


CLIENTS_PER_PROCESS = 8  # --processes auto: a client process per this many clients (one GIL each)
_START_TIMEOUT = 120.0  # seconds for every client process to start and reach the starting line


def client_processes(concurrency: int, processes: int | None = None) -> int:
    """How many processes run ``concurrency`` clients: ``processes`` (None: one per
    :data:`CLIENTS_PER_PROCESS` clients, at most one per usable CPU), never more than the clients."""
    from vitdeploy.sysinfo import usable_cpus

    if processes is None:
        processes = min(-(-concurrency // CLIENTS_PER_PROCESS), usable_cpus())
    return max(1, min(processes, concurrency))


@dataclass
class _Tally:
    """One process's part of a level: what its clients sent and how each answer checked out."""

    sent: int = 0
    errors: int = 0
    crossed: int = 0
    wrong: int = 0
    latencies: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0


class _LocalCounter:
    """The level's next request number for the clients of one process (a ``multiprocessing.Value``'s
    interface: ``value`` under ``get_lock()``); across processes it is a shared Value."""

    def __init__(self) -> None:
        self.value, self._lock = 0, threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock


def _drive(url: str, info: ModelInfo, x: np.ndarray, checker: Checker, concurrency: int, requests: int,
           time_limit: float, timeout: float, headers: Mapping[str, str] | None = None, counter: Any = None) -> _Tally:
    """``concurrency`` client threads draw request numbers k from ``counter`` (shared by every client of the
    level, in every process) until ``requests`` are drawn or ``time_limit`` has passed; request k sends row
    ``k % rows``. Interrupted (Ctrl-C), the clients stop after their request in flight."""
    counter = counter if counter is not None else _LocalCounter()
    lock, stop = threading.Lock(), threading.Event()
    tally = _Tally()
    deadline = time.perf_counter() + time_limit

    def take() -> int | None:
        with counter.get_lock():
            k = counter.value
            if k >= requests or stop.is_set() or time.perf_counter() > deadline:
                return None
            counter.value = k + 1
        return k

    def client(_: int) -> None:
        sender = _Sender(url, info, x, timeout, headers)
        try:
            while (k := take()) is not None:
                row = k % len(x)
                t = time.perf_counter()
                try:
                    answer, status, why = sender.send(row), "", ""
                except Exception as e:  # a failed request is counted, the client goes on
                    answer, status, why = None, "errors", f"row {row}: {type(e).__name__}: {e}"[:300]
                dt = time.perf_counter() - t
                if answer is not None:
                    status, why = checker.check(row, answer)
                with lock:
                    tally.sent += 1
                    if answer is not None:
                        tally.latencies.append(dt)
                    if status != "ok":
                        setattr(tally, status, getattr(tally, status) + 1)
                        if len(tally.examples) < 5:
                            tally.examples.append(why)
        finally:
            sender.close()

    tally.start = time.perf_counter()
    pool = ThreadPoolExecutor(concurrency)
    try:
        list(pool.map(client, range(concurrency)))
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True)
    tally.end = time.perf_counter()
    return tally


def _exit_with_parent() -> None:
    """In a client process: exit when the parent does, even killed (no load left running, nothing blocked
    writing its results to a parent that will never read them)."""
    import multiprocessing
    import os

    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()


def _client_process(results: Any, barrier: Any, counter: Any, index: int, args: tuple[Any, ...]) -> None:
    """A client process: imports its HTTP client, waits for the others, drives its clients, reports."""
    _exit_with_parent()
    try:
        _th()
        try:
            barrier.wait(_START_TIMEOUT)
        except threading.BrokenBarrierError:
            raise VitDeployError(f"the load-test client processes did not all start within {_START_TIMEOUT:g} s: "
                                 "give fewer --processes") from None
        results.put((index, _drive(*args, counter=counter), None))
    except VitDeployError as e:
        results.put((index, None, str(e)))
    except BaseException as e:  # reported to the parent, which raises it
        results.put((index, None, f"load-test client process {index} failed: {type(e).__name__}: {e}"[:300]))


def _collect(results: Any, procs: list[Any], deadline: float) -> dict[int, _Tally]:
    """Every client process's tally, read before any is joined (a process exits once its tally is read)."""
    import queue

    tallies: dict[int, _Tally] = {}
    while len(tallies) < len(procs):
        try:
            j, tally, error = results.get(timeout=0.5)
        except queue.Empty:
            dead = [p.exitcode for j, p in enumerate(procs) if j not in tallies and p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                what = f"exited with {dead[0]}" if dead else "did not report in time"
                raise VitDeployError(f"a load-test client process {what}: run again, or with --processes 1") from None
            continue
        if error is not None:
            raise VitDeployError(error)
        tallies[j] = tally
    return tallies


def _drive_processes(processes: int, url: str, info: ModelInfo, x: np.ndarray, checker: Checker,
                     concurrency: int, requests: int, time_limit: float, timeout: float,
                     headers: Mapping[str, str] | None = None) -> list[_Tally]:
    """The level's clients split over ``processes`` processes (each with its own GIL, as perf_analyzer's
    threads have none), started together and drawing from one shared request counter."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads and sockets
    results, barrier, counter = ctx.Queue(), ctx.Barrier(processes), ctx.Value("q", 0)
    procs = [ctx.Process(target=_client_process, daemon=True, args=(results, barrier, counter, j, (
        url, info, x, checker, concurrency // processes + (j < concurrency % processes), requests, time_limit,
        timeout, headers))) for j in range(processes)]
    started: list[Any] = []
    try:
        for p in procs:
            try:
                p.start()
            except OSError as e:
                raise VitDeployError(f"could not start {processes} load-test client processes ({e}): give fewer "
                                     "--processes") from None
            started.append(p)
        tallies = _collect(results, started, time.monotonic() + _START_TIMEOUT + time_limit + 2 * timeout)
    except BaseException:
        for p in started:
            p.kill()
        for p in started:
            p.join(5)
        raise
    for p in started:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
    return [tallies[j] for j in range(processes)]


def drive_level(url: str, info: ModelInfo, x: np.ndarray, checker: Checker, concurrency: int, requests: int,
                time_limit: float, timeout: float = 60.0, processes: int = 1,
                headers: Mapping[str, str] | None = None) -> LevelResult:
    """``concurrency`` closed-loop clients share ``requests`` requests until all are sent or ``time_limit``
    seconds have passed, every answer checked. The clients are threads of ``processes`` processes (one GIL
    each: one Python process's clients saturate its GIL near 2,000 requests/s)."""
    processes = max(1, min(processes, concurrency, requests))
    args = (url, info, x, checker, concurrency, requests, time_limit, timeout, headers)
    tallies = [_drive(*args)] if processes == 1 else _drive_processes(processes, *args)
    latencies = [t for tally in tallies for t in tally.latencies]
    wall = max(t.end for t in tallies) - min(t.start for t in tallies)
    return LevelResult(concurrency, sum(t.sent for t in tallies), len(latencies), sum(t.errors for t in tallies),
                       sum(t.crossed for t in tallies), sum(t.wrong for t in tallies), wall,
                       len(latencies) / wall if wall else 0.0, _percentile(latencies, 50),
                       _percentile(latencies, 90), _percentile(latencies, 99),
                       float(np.mean(latencies)) * 1e3 if latencies else float("nan"),
                       examples=[e for t in tallies for e in t.examples][:5], processes=processes)


def run(url: str, model: str, concurrency: Sequence[int], requests: int = 200, uint8: bool = False,
        time_limit: float = 60.0, rows: int = 32, reference: str | Path | None = None, tolerance: float = 1e-3,
        metrics_url: str | None = None, timeout: float = 60.0, seed: int = 0,
        processes: int | None = None, api_key: str | None = None) -> LoadReport:
    """Drive the KServe v2 server at ``url`` at each concurrency level with ``requests`` one-row requests
    (``time_limit`` seconds at most per level); see the module's docstring for how answers are checked.
    ``uint8``: the model must take UINT8 input (an export with --uint8-input). The clients of a level are
    threads of :func:`client_processes` processes (``processes``; None: one per 8 clients, at most one
    per CPU). More than one process are spawned, which re-imports the caller's main module: a script
    calling this needs ``if __name__ == "__main__":``, or ``processes=1``. Each request has ``timeout``
    seconds (at most ``time_limit``) for its whole exchange; ``api_key`` goes as ``Authorization: Bearer``."""
    from vitdeploy.sysinfo import cpu_flags, cpu_model, usable_cpus

    if not concurrency or min(concurrency) < 1:
        raise VitDeployError("--concurrency needs positive client counts, e.g. 1,4,16,64")
    if requests < 1 or rows < 2 or time_limit <= 0 or (processes is not None and processes < 1):
        raise VitDeployError("--requests must be >= 1, --rows >= 2, --time-limit > 0 and --processes >= 1")
    headers = auth_headers(api_key)
    timeout = min(timeout, time_limit)  # no one request outlasts a level
    info = model_info(url, model, timeout, headers)
    if uint8 and info.datatype != "UINT8":
        raise VitDeployError(f"--uint8: model {model!r} at {url} takes {info.datatype}, not UINT8: serve an export "
                             "made with --uint8-input, or drop --uint8")
    row_bytes = math.prod(info.shape) * np.dtype(NUMPY_TYPES[info.datatype]).itemsize
    if rows * row_bytes > LIMITS.input_bytes:
        raise VitDeployError(f"--rows {rows} of {row_bytes} bytes each is over the {LIMITS.input_bytes} bytes of input "
                             "this load test builds: give fewer --rows")
    x = make_inputs(info, rows, seed)
    checker = expected_answers(url, info, x, reference, tolerance, timeout, headers)
    report = LoadReport(url, info, rows, str(reference) if reference else None, tolerance,
                        {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": usable_cpus()})
    for c in concurrency:
        before = _batch_counts(url, model, metrics_url, headers, timeout)
        level = drive_level(url, info, x, checker, c, requests, time_limit, timeout, client_processes(c, processes),
                            headers)
        level.batches = _batches_between(before, _batch_counts(url, model, metrics_url, headers, timeout))
        report.unsent += requests - level.sent
        report.levels.append(level)
    return report
