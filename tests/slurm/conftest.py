# The trainer tests' tiny corpus (64 rows -> shards -> SentencePiece), built once per session.
from tests.train.conftest import tiny_data  # noqa: F401
