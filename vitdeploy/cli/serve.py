"""`vitdeploy serve`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from vitdeploy.cli.app import main
from vitdeploy.cli.common import require_verified_option, verify_options


def _serve_limit_options(f: Any) -> Any:
    """`serve`'s options for clients it does not know: memory, connections, timeouts, a key and TLS."""
    options = [
        click.option("--memory-budget", type=click.IntRange(min=1), default=None,
                     help="MiB of request work at once (bodies, parsed JSON, decoded images); requests wait for "
                     "room or get 503, one that can never fit gets 413 [default: room for one max-batch JSON "
                     "request, at least 256]."),
        click.option("--limit-concurrency", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Connections and requests at once; beyond it uvicorn answers 503."),
        click.option("--keep-alive-timeout", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Seconds an idle kept-alive connection stays open."),
        click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
                     show_default=True, help="Seconds a client has to send a request head, then it is closed."),
        click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
                     show_default=True, help="Seconds without a byte of the body before the request is dropped "
                     "(408); --request-timeout bounds the whole upload."),
        click.option("--api-key", envvar="VITDEPLOY_API_KEY", default=None,
                     help="Every request must send Authorization: Bearer KEY (also from $VITDEPLOY_API_KEY; a "
                     "command line is visible to other users: prefer --api-key-file)."),
        click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="File holding the API key (its first line)."),
        click.option("--public-probes", is_flag=True,
                     help="With a key: /healthz, /readyz, /metrics and /v2/health/* answer without it."),
        click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Serve HTTPS with this certificate (PEM; with --ssl-keyfile)."),
        click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _serve_limits(host: str, memory_budget: int | None, limit_concurrency: int, keep_alive_timeout: int,
                  header_timeout: float, body_timeout: float, api_key: str | None, api_key_file: Path | None,
                  public_probes: bool, ssl_certfile: str | None,
                  ssl_keyfile: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options above -> create_app's and run_server's keyword arguments; warns when the server is
    reachable from other machines without a key or TLS."""
    from vitdeploy.serving.limits import api_key_problem, exposure_warning

    if api_key_file is not None:
        api_key = (api_key_file.read_text().splitlines() or [""])[0].strip()
        if not api_key:
            raise click.BadParameter(f"{api_key_file} is empty: put the key on its first line",
                                     param_hint="--api-key-file")
    if api_key and (problem := api_key_problem(api_key)) is not None:
        raise click.BadParameter(problem, param_hint="--api-key-file" if api_key_file else "--api-key")
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise click.UsageError("--ssl-certfile and --ssl-keyfile go together")
    if (warning := exposure_warning(host, bool(api_key), bool(ssl_certfile))) is not None:
        click.echo(f"warning: {warning}", err=True)
    app = {"memory_budget": memory_budget * 2**20 if memory_budget else None, "body_timeout": body_timeout,
           "api_key": api_key or None, "public_probes": public_probes}
    server = {"limit_concurrency": limit_concurrency, "keep_alive": keep_alive_timeout,
              "header_timeout": header_timeout, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile}
    return app, server


def _serve_limits_env(app: dict[str, Any], server: dict[str, Any]) -> dict[str, str]:
    """The same settings for --workers processes (app_from_env and the h11 protocol read them)."""
    return {"VITDEPLOY_SERVE_MEMORY_BUDGET": str(app["memory_budget"] or ""),
            "VITDEPLOY_SERVE_BODY_TIMEOUT": str(app["body_timeout"]),
            "VITDEPLOY_SERVE_API_KEY": app["api_key"] or "",
            "VITDEPLOY_SERVE_PUBLIC_PROBES": "1" if app["public_probes"] else "",
            "VITDEPLOY_SERVE_HEADER_TIMEOUT": str(server["header_timeout"])}


def _serve_workers(env: dict[str, str], host: str, port: int, workers: int, drain_grace: float,
                   server_limits: dict[str, Any]) -> None:
    """``--workers N``: uvicorn's worker processes, each opening the artifact through app_from_env."""
    import uvicorn

    os.environ.update(env)
    if drain_grace > 0:
        click.echo("note: with --workers > 1 uvicorn's supervisor stops the workers on Ctrl-C without the "
                   "--drain-grace period; run one worker per container to drain behind a load balancer", err=True)
    uvicorn.run("vitdeploy.serving.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                http="vitdeploy.serving.http11:GuardedProtocol",
                limit_concurrency=server_limits["limit_concurrency"],
                timeout_keep_alive=server_limits["keep_alive"], access_log=server_limits["access_log"],
                ssl_certfile=server_limits["ssl_certfile"],
                ssl_keyfile=server_limits["ssl_keyfile"])


def _unverified(model: str, no_verify: bool, require_verified: bool) -> str | None:
    """Why ``model`` will not be verified (the banner says it, /readyz too), or None; --require-verified
    refuses such a model here, before the server starts."""
    from vitdeploy.verify import artifact_golden, unverified_reason

    if require_verified and no_verify:
        raise click.UsageError("--require-verified and --no-verify contradict each other: drop one")
    if no_verify:
        return "--no-verify"
    if artifact_golden(model) is not None:
        return None
    if require_verified:
        raise click.ClickException(f"{unverified_reason(model)}; --require-verified refuses it")
    return unverified_reason(model)


@main.command()
@click.option("--model", "-m", required=True, help="ONNX file or TensorRT engine.")
@click.option("--backend", default="auto", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback by default.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-delay-ms", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Longest a batch that is not full waits for more requests, and only while requests are still "
              "being read (see --fixed-delay).")
@click.option("--fixed-delay", is_flag=True, help="Every batch that is not full waits the whole --max-delay-ms, "
              "as Triton's dynamic batcher does, instead of only while requests are on their way.")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="TensorRT engines: execution contexts on the one engine, each with its own stream and buffers; "
              "the batcher keeps this many batches in flight, so the copies of one overlap the compute of another.")
@click.option("--name", default=None, help="Model name on the KServe v2 routes (/v2/models/NAME); default the "
              "file's stem.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds a request may take, queue and inference together (then 504).")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=None,
              help="/v1/classify refuses larger images (413), checked from the header before decoding "
              "[default: 256x the model's input area, within 4-40 MP].")
@click.option("--drain-grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="On Ctrl-C/SIGTERM, seconds that readiness reports draining (requests still served) "
              "before the server stops accepting.")
@click.option("--access-log", is_flag=True, help="Log a line per request (off by default, as in Triton: a line per "
              "request costs the event loop time under load; /metrics counts requests by endpoint and code).")
@_serve_limit_options
@verify_options
@require_verified_option
def serve(model: str, backend: str, host: str, port: int, max_batch: int, max_delay_ms: float, max_queue: int,
          workers: int, instances: int, name: str | None, request_timeout: float, max_image_pixels: int | None,
          drain_grace: float, fixed_delay: bool, access_log: bool, no_verify: bool, allow_drift: bool,
          require_verified: bool,
          **limits: Any) -> None:
    """Serve an ONNX or engine over HTTP with dynamic batching: /v1/classify and /v1/logits (a classifier) or
    /v1/embed (an embedding model: its artifact's task), /metrics, and the KServe v2 / Triton protocol
    (/v2/models/NAME/infer) that tritonclient speaks.

    /readyz and /v2/health/ready turn ready once the batch sizes the batcher forms are warm and the
    artifact passes its golden set on this machine (in the background, after the server starts); a
    failed check keeps the server up and not ready, with the reason in the log and in those answers."""
    try:
        import uvicorn  # noqa: F401 - only whether it is there
    except ImportError:
        raise click.ClickException("serving needs the serve extra: pip install 'vitdeploy[serve]'") from None
    app_limits, server_limits = _serve_limits(host, **limits)
    server_limits["access_log"] = access_log
    from vitdeploy.serving.server import check_port

    check_port(host, port)  # before the model opens and its warm-up starts: a busy port is one line, exit 1
    from vitdeploy.engines import artifact_kind

    if artifact_kind(model) == "checkpoint":
        raise click.ClickException(f"serve takes an ONNX file or an engine, not a checkpoint: "
                                   f"vitdeploy export --model {model} --output model.onnx")
    name = name or Path(model).stem
    if instances > 1 and artifact_kind(model) != "engine":
        raise click.BadParameter(f"{Path(model).name} is not a TensorRT engine: --instances sets the execution "
                                 "contexts on one engine; for more processes on an ONNX use --workers",
                                 param_hint="--instances")
    runtime_options = {"instances": instances} if instances > 1 else {}
    unverified = _unverified(model, no_verify, require_verified)
    from vitdeploy.serving.readiness import WARM_EVERY_SIZE_UP_TO, warm_and_verify

    if workers > 1:  # each worker warms up and checks (the verdict is cached beside the artifact)
        env = {"VITDEPLOY_SERVE_MODEL": model, "VITDEPLOY_SERVE_BACKEND": backend,
               "VITDEPLOY_SERVE_MAX_BATCH": str(max_batch), "VITDEPLOY_SERVE_MAX_DELAY_MS": str(max_delay_ms),
               "VITDEPLOY_SERVE_MAX_QUEUE": str(max_queue), "VITDEPLOY_SERVE_NAME": name,
               "VITDEPLOY_SERVE_REQUEST_TIMEOUT": str(request_timeout),
               "VITDEPLOY_SERVE_MAX_IMAGE_PIXELS": str(max_image_pixels or ""),
               "VITDEPLOY_SERVE_VERIFY": "" if no_verify else "1", "VITDEPLOY_SERVE_INSTANCES": str(instances),
               "VITDEPLOY_SERVE_ALLOW_DRIFT": "1" if allow_drift else "",
               "VITDEPLOY_SERVE_REQUIRE_VERIFIED": "1" if require_verified else "",
               "VITDEPLOY_SERVE_FIXED_DELAY": "1" if fixed_delay else "",
               **_serve_limits_env(app_limits, server_limits)}
        _serve_workers(env, host, port, workers, drain_grace, server_limits)
        return
    from vitdeploy.engines import open_runtime
    from vitdeploy.serving.server import create_app, run_server

    # ready only once warm and verified: the check runs in the background while the server already answers
    # /healthz; a failed check keeps /readyz at 503 with the reason (--allow-drift: a warning, then ready)
    prepare = warm_and_verify(model, max_batch, verify=not no_verify, allow_drift=allow_drift,
                              require=require_verified)
    with open_runtime(model, backend=backend, shared_cores=True, **runtime_options) as rt:
        scheme = "https" if server_limits["ssl_certfile"] else "http"
        sizes = "every batch size" if max_batch <= WARM_EVERY_SIZE_UP_TO else "1, powers of two and max batch"
        click.echo(f"serving {rt.describe()} as {name!r} on {scheme}://{host}:{port} (ready once {sizes} "
                   f"{'is warm' if no_verify or unverified else 'is warm and the golden set passes'})"
                   + (f"; NOT VERIFIED: {unverified}" if unverified else ""))
        app = create_app(rt, max_batch, max_delay_ms, max_queue, request_timeout=request_timeout,
                         max_image_pixels=max_image_pixels, model_name=name, prepare=prepare,
                         adaptive_delay=not fixed_delay, **app_limits)
        run_server(app, host, port, drain_grace=drain_grace, **server_limits)
