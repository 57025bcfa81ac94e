"""The inference server programs a run can start (``--serve PRESET:MODEL``), one class each behind
one interface: the command that serves a model (with ``{host}``, ``{port}``, ``{threads}`` left
for the worker to fill), the path that says it is healthy, and the option that sets its context.
``Command`` is the user's own template (``--serve 'my-server --port {port}'``).

Every backend turns its ``/metrics`` on (the concurrency controller reads the server's queue
there) and is stopped the same way (SIGTERM to its process group, SIGKILL after
``nemocc.serve.stop-grace-seconds``: ``nemocc_dask.serve.process.kill_group``).
"""

from __future__ import annotations

import shlex


class Backend:
    """An inference server program. ``name``: the preset's name (``vllm:MODEL``); ``health``: the
    path that answers 2xx once the model is loaded; ``template``: its command, ``{model}`` for
    the quoted model; ``context_option``: how its command sets the context length."""

    name = ""
    health = "/health"
    template = ""
    context_option = ""

    def command(self, model: str, extra: list[str]) -> str:
        """The command serving ``model``, ``extra`` arguments last (each quoted)."""
        words = " ".join(shlex.quote(w) for w in extra)
        return f"{self.template.replace('{model}', shlex.quote(model))} {words}".rstrip()

    def context_hint(self, needed: int) -> str:
        """How to serve a context of ``needed`` tokens, for an error message."""
        return f"add {self.context_option} {needed} (or more) to --serve"


class VLLM(Backend):
    """``vllm serve``, with vLLM's defaults (every GPU it sees, the model's context, 256
    sequences at a time; ``/metrics`` is always on)."""

    name = "vllm"
    template = "vllm serve {model} --host {host} --port {port}"
    context_option = "--max-model-len"


class SGLang(Backend):
    """SGLang's server, its metrics switched on."""

    name = "sglang"
    template = ("python -m sglang.launch_server --model-path {model} --host {host} --port {port} "
                "--enable-metrics")
    context_option = "--context-length"


class LlamaCpp(Backend):
    """llama.cpp's ``llama-server`` on a GGUF file. Its default threads busy-poll every core
    (1.8 vs 65 tokens/s on 2 shared cores): no polling, and as many threads as the worker's CPU
    share (``{threads}``)."""

    name = "llamacpp"
    template = ("llama-server -m {model} --host {host} --port {port} --metrics --poll 0 "
                "--threads {threads} --threads-batch {threads}")
    context_option = "-c"


class Command(Backend):
    """The user's own command template (``{port}`` required); healthy when ``/v1/models``
    answers unless ``--serve-health`` says otherwise."""

    name = "command"
    health = "/v1/models"

    def context_hint(self, needed: int) -> str:
        options = "; ".join(f"{b.name}: {b.context_option} {needed}" for b in BACKENDS.values())
        return f"serve a context of {needed} tokens or more in --serve ({options})"


BACKENDS: dict[str, Backend] = {b.name: b for b in (VLLM(), SGLang(), LlamaCpp())}


def backend(name: str) -> Backend:
    """The backend called ``name`` (``command`` for a user's template)."""
    return BACKENDS.get(name) or Command()
