"""clusterlaunch: lean dask workers of our own, launched like addprocs."""

__version__ = "0.1.0"
