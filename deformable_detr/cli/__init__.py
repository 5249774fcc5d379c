"""The command-line layer: the tools (train, eval, infer, visualize, export, benchmark), each a ``Tool``
with a Hydra config in configs/, and what they share (app.py: help, the command-line check, run
set-up, the error path). The only part of the package that uses Hydra and OmegaConf; nothing else in
the package imports it. ``tools/<name>.py`` and the ``ddetr-<name>`` commands run them."""
