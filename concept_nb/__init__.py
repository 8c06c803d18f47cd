__version__ = "0.1.0"

# registers the model types an exported sentence-transformers folder names (concept_nb.embeddings)
from . import embeddings as _embeddings  # noqa: E402,F401
