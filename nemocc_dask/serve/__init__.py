"""The serve layer: start an inference server next to the workers (one per worker, GPU or node),
watch it and stop it. ``backends``: the server programs (vLLM, SGLang, llama.cpp, a command), one
class each; ``process``: one server process (its spec, start, health, stop); ``node``: one server
shared by a node's workers; ``supervision``: the one loop that watches and restarts both kinds;
``workers``: the per-worker plugin. It may import the llm layer (a worker's pool learns its own
servers' URLs) and everything below; it knows nothing of runs or output folders.
"""

from nemocc_dask.serve.backends import BACKENDS, Backend
from nemocc_dask.serve.process import SERVE_LOGS, ServedProcess, ServeSpec
from nemocc_dask.serve.supervision import ServeError
from nemocc_dask.serve.workers import local_urls, served_status, serving

__all__ = ["BACKENDS", "Backend", "SERVE_LOGS", "ServeError", "ServeSpec", "ServedProcess",
           "local_urls", "served_status", "serving"]
