"""Node classes (thin UI layer). Importing this package registers every node."""
from . import apply, composition, hypernet, loading, merge, training  # noqa: F401
