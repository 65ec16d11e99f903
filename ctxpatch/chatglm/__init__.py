"""ChatGLM2 / ChatGLM3 without their remote code: the checkpoint as transformers' `GlmForCausalLM` (`convert`),
the tokenizer as a fast tokenizer (`tokenizer`), the trained length read off config.json (`config`), and the
`ctxpatch convert-chatglm` verb."""

from ..dtypes import resolve_dtype  # noqa: F401  (the one dtype reader: load_chatglm(dtype=...))
from .config import train_len
from .convert import add_parser, convert_chatglm, load_chatglm, rope_ratio_rule
from .errors import ChatGLMConversionError

__all__ = ["ChatGLMConversionError", "add_parser", "convert_chatglm", "load_chatglm", "rope_ratio_rule", "train_len"]
