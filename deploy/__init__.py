"""deploy/ as ``megabatch.deploy``: no code, only the files installed with megabatch that
its commands read (the Slurm job template that ``megabatch submit slurm`` renders)."""
