"""The ``vitdeploy`` command line: thin click commands over the library, one module per command.

``app`` holds the group and its error handling, ``common`` the option groups several commands share.
Nothing heavy is imported at module level, so ``vitdeploy --help`` is instant.
"""

from vitdeploy.cli import (  # noqa: F401  (each module registers its command on the group)
    bench,
    build,
    compare,
    deploy,
    eval,
    export,
    info,
    inspect,
    predict,
    serve,
    triton,
    tune,
    verify,
)
from vitdeploy.cli.app import main

__all__ = ["main"]
