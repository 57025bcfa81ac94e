"""Test helpers for users' own tests and trials: the mock OpenAI-compatible server (also
``nemocc-dask serve-mock``)."""

from nemocc_dask.testing.mock import MockLLMServer, fake_answer

__all__ = ["MockLLMServer", "fake_answer"]
