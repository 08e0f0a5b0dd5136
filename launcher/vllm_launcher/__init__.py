"""vllm-launcher: environment -> vLLM engine configurations, and a lane-switching OpenAI front server."""

__version__ = "0.1.0"
