"""Ray Serve import path for fastdraft's speculative pair: `serve run apps.speculative:build_app ...`.

The application itself lives in the library (`fastdraft.serving.app`), so that `fastdraft serve` and an
installed fastdraft never depend on this directory. This module only gives Serve config files and the
`serve` CLI the import path they have always used, from a checkout's root:

    serve run apps/serve_demo.yaml                                          # the Serve config file
    serve run apps.speculative:build_app target=DIR draft=DIR gamma=3      # any ServeConfig field as key=value
    serve run fastdraft.serving.app:build_app target=DIR ...               # the same, without a checkout
"""

import sys

from fastdraft.serving.app import build_app

__all__ = ["build_app"]

if __name__ == "__main__":  # python -m apps.speculative RECIPE: the same as `fastdraft serve RECIPE`
    from fastdraft.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
