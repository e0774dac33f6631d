from vllm.inputs.llm import TextPrompt, TokensPrompt  # noqa: F401  (vLLM < 0.19 exported them here)
