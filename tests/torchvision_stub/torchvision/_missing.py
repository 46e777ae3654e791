"""Names that timm imports from torchvision at import time but the tests never use: each one is a class that
refuses to be used, so a test that needed the real thing fails loudly instead of computing something else."""


def missing(module: str, name: str) -> type:
    def refuse(*args, **kwargs):
        raise NotImplementedError(f"torchvision stand-in: {module}.{name} is not provided")

    return type(name, (), {"__init__": refuse, "__call__": refuse})
