class RayPrometheusStatLogger:
    """Ray's vLLM stage passes this class as a stat logger factory (log_engine_metrics); the fake logs nothing."""

    def __init__(self, *args, **kwargs):
        pass
