"""`pep-torchrec serve`: an artifact over HTTP (pep_torchrec/serving/app.py)."""

from __future__ import annotations

import argparse

import torch

from pep_torchrec.config import ConfigError
from pep_torchrec.export.format import ArtifactError
from pep_torchrec.serving import app as serving_app
from pep_torchrec.serving.app import Settings, create_app

DESCRIPTION = serving_app.__doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--artifact", help="artifact directory (`pep-torchrec export --out`); env PEP_SERVE_ARTIFACT"
    )
    parser.add_argument("--host", help="bind address (default 127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, help="TCP port (default 8080)")
    parser.add_argument("--max-instances", type=int, help="most instances per request (default 1024)")
    parser.add_argument("--max-body-bytes", type=int, help="largest request body (default 1 MiB)")
    parser.add_argument("--num-threads", type=int, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--artifact-root",
        help="POST /admin/reload may load artifacts under this directory only "
        "(default: the parent of --artifact); the route itself needs "
        "PEP_SERVE_ADMIN_TOKEN",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    # Flags > PEP_SERVE_<FIELD> variables > defaults; a bad one is a ConfigError naming both.
    settings = Settings.from_env(
        artifact=args.artifact,
        host=args.host,
        port=args.port,
        max_instances=args.max_instances,
        max_body_bytes=args.max_body_bytes,
        num_threads=args.num_threads,
        artifact_root=args.artifact_root,
    )
    app = create_app(settings)
    torch.set_num_threads(max(1, settings.num_threads))
    try:  # load before binding: a bad artifact is refused with the loader's message (and read once)
        app.state.holder.load()
    except ArtifactError as e:
        raise ConfigError(f"cannot serve: {e}") from e
    # loop / http "auto": uvloop and httptools (the `serve` extra) when installed, else asyncio and h11;
    # on the demo artifact they gave ~15% more requests per second at batch 1.
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=args.log_level, timeout_graceful_shutdown=10
    )
    return 0
