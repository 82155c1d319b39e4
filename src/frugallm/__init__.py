"""frugallm: an LLM inference engine and efficiency lab."""

__version__ = "0.1.0"

from frugallm.engine.llm import LLM  # noqa: E402
from frugallm.engine.sequence import RequestOutput  # noqa: E402
from frugallm.errors import FrugalError  # noqa: E402
from frugallm.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "FrugalError", "RequestOutput", "SamplingParams", "__version__"]
