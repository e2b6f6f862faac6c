"""The OpenAI- and Together-compatible HTTP server (FastAPI). Only this package and `herd serve`
import FastAPI and pydantic: herd.model and herd.engine stay importable with torch alone."""

from herd.server.app import create_app
from herd.server.state import ServerOptions

__all__ = ["ServerOptions", "create_app"]
