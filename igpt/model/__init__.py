"""The network (``gpt``), its config and sizes (``config``), its Hugging Face format (``hf``) and decoding
(``sampling``). Plain PyTorch: importing it pulls no Ray, pyarrow or MLflow."""

from igpt.model.config import MODEL_SIZES, PAPER_PARAMS_M, ModelConfig
from igpt.model.gpt import IGPT

__all__ = ["IGPT", "MODEL_SIZES", "PAPER_PARAMS_M", "ModelConfig"]
