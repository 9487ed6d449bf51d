"""HTTP front end: OpenAI + Anthropic routes, chat template, GLM-4.7 parsers, CLI, metrics."""

from server.cli import engine_kwargs, main, parse_args
from server.config import ServerConfig

__all__ = ["ServerConfig", "engine_kwargs", "main", "parse_args"]
