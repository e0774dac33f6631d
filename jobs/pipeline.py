"""Job: the whole chain (prepare -> pretrain -> generate -> distill -> evaluate) for one recipe.

    python jobs/pipeline.py jobs/recipes/demo.yaml [--from distill] [--set key.sub=value ...]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/pipeline.py jobs/recipes/demo.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, under `ray job submit`

from fastdraft.cli import stage_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_main("run", sys.argv[1:]))
