"""The run layer: what turns the recipe into output. The lazy Dask API (``pipeline``,
``nemotron_cc``), the partition adapter that generates through a worker's pool and journals the
answers (``generate``), the lossless runs into an output folder (``runner``, ``partition_job``,
``output_folder`` with its lock, ``report``, ``verify``) and the Dask clusters they run on
(``cluster``). It may import every layer below it (io, recipe, llm, serve).
"""
