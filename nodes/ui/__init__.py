"""Node classes (thin UI layer). Importing this package registers every node."""
from . import apply, composition, loading, merge  # noqa: F401
