"""Where generation runs: transformers (every method, in this process) or vLLM (pre-LLM methods, a server)."""
