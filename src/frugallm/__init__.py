"""frugallm: an LLM inference engine and efficiency lab."""

from frugallm.engine.llm import LLM
from frugallm.engine.sequence import RequestOutput
from frugallm.errors import FrugalError
from frugallm.sampling import SamplingParams
from frugallm.version import __version__

__all__ = ["LLM", "FrugalError", "RequestOutput", "SamplingParams", "__version__"]
