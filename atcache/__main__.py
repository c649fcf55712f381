from atcache.cli import main

if __name__ == "__main__":  # guarded: spawned worker processes (dask, DataLoader) re-import __main__
    main()
