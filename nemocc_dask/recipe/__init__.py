"""The recipe layer: Nemotron-CC itself. The task presets and their prompts, prompt files, the
tokenizer that counts, and the pure stage functions (``stages``: one pandas or cuDF partition in,
the same type out). It may import the io layer (frames on pandas or cuDF) and nothing above:
no LLM clients, no Dask scheduling, no output folders.
"""
