class EngineDeadError(Exception):
    """As vLLM's: Ray's vLLM stage restarts the actor on it."""
