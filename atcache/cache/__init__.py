"""The cache: its on-disk format (`format`), the store handle that reads and writes it (`store`), builders' ownership
records (`claims`), where it lives (`location`), and looking at it with dask (`inspect`). The only code that imports zarr."""
