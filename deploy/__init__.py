"""deploy/ as ``megabatch.deploy``: no code, only the files installed with megabatch that
its commands read (the Slurm job template that ``megabatch submit slurm`` renders, the
Kubeflow training runtime that ``megabatch submit k8s`` builds on)."""
