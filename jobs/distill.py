"""Job: fastdraft distill.

    python jobs/distill.py jobs/recipes/demo.yaml [--set key.sub=value ...]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/distill.py jobs/recipes/demo.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, under `ray job submit`

from fastdraft.cli import stage_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_main("distill", sys.argv[1:]))
