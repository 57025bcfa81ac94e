"""The serve layer: start an inference server next to the workers (one per worker, GPU or node),
watch it and stop it (``workers``: the per-worker plugin; ``node``: one server shared by a
node's workers; ``process``: one server process, its command presets and health checks). It may
import the llm layer (a worker's pool learns its own servers' URLs) and everything below; it
knows nothing of runs or output folders.
"""

from nemocc_dask.serve.process import PRESETS, SERVE_LOGS, ServedProcess, ServeError, ServeSpec
from nemocc_dask.serve.workers import local_urls, served_status, serving

__all__ = ["PRESETS", "SERVE_LOGS", "ServeError", "ServeSpec", "ServedProcess", "local_urls",
           "served_status", "serving"]
