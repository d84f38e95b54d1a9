"""Hugging Face checkpoint or GGUF file -> `mi` converted format (docs/format.md).

from mi.convert import convert, load_mi_config
convert("/models/llama", "/models/llama-tp2", tp=2)
config = load_mi_config("/models/llama-tp2")
"""

from mi.convert.driver import DTYPE_CHOICES, FORMAT_VERSION, convert, load_mi_config, rank_file
from mi.convert.sharding import TP_CHOICES, kv_heads_of_rank, padded_vocab_size
from mi.convert.spec import SUPPORTED_ARCHITECTURES, ConvertError

__all__ = [
    "ConvertError",
    "DTYPE_CHOICES",
    "FORMAT_VERSION",
    "SUPPORTED_ARCHITECTURES",
    "TP_CHOICES",
    "convert",
    "kv_heads_of_rank",
    "load_mi_config",
    "padded_vocab_size",
    "rank_file",
]
