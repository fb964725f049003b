"""megabatch.trainer: the run config, the towers, the methods (tasks), the DeepSpeed
engine, the GradCache step, checkpoints and resume, evaluation, peers and signals, and
the ``megabatch`` command line. trainer/README.md says where each thing lives and how to
add a method or a metrics sink."""

__version__ = "0.1.0"
