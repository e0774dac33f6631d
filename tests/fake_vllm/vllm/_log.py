import json
import os


def log(event: str, **data) -> None:
    """Append one JSON line to $FAKE_VLLM_LOG (when set): tests check what fastdraft and Ray asked vLLM for."""
    path = os.environ.get("FAKE_VLLM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, **data}) + "\n")
