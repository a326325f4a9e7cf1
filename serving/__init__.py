"""serving: ``deltakv-serve``, an OpenAI-compatible HTTP server over sparse_engine (the ``[serve]`` extra).

* `serving.engine_loop.EngineLoop`: one thread owning the `LLM`, continuous batching over all requests;
* `serving.app.build_app(llm, ServeSettings(...))`: the FastAPI app (completions, chat, SSE, kv_stats,
  auth / size / concurrency limits, OpenAI-shaped errors);
* `serving.server.BackgroundServer` / `serve`: uvicorn on a thread or in the foreground;
* `serving.cli.main`: the ``deltakv-serve`` command (Hydra, ``conf/serve.yaml``).

The engine never imports this package (it sits above ``benchmark`` in the import layering).
"""

from .app import ServeSettings, app_state, build_app
from .engine_loop import EngineLoop
from .server import BackgroundServer, serve

__all__ = ["BackgroundServer", "EngineLoop", "ServeSettings", "app_state", "build_app", "serve"]
