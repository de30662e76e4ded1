"""The distributed backends' names, apart from their code: the recipe offers them as the choices of
`distributed.backend` but cannot import adapt/train/backends.py, whose table `BACKENDS` holds the
classes (the training code imports the recipe). tests/test_backends.py holds the two to the same names.
"""

BACKEND_NAMES = ("single", "ddp", "deepspeed", "fsdp")
