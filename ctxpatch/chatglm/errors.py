"""The error ChatGLM's converter and tokenizer raise on purpose."""

from ..errors import UserInputError


class ChatGLMConversionError(UserInputError, ValueError):
    """A ChatGLM checkpoint that cannot be mapped onto transformers' Glm exactly."""
