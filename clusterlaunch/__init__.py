"""clusterlaunch: lean dask workers of our own, launched like addprocs."""
