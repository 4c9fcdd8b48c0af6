"""Python code the CTP stroke-lesion bundle imports: only what MONAI, Ignite and PyTorch lack."""

__version__ = "0.3.17"
