import pytest

from tests.demo.browser import make_tiny_model_dir


@pytest.fixture(scope="session")
def demo_model_dir(bpe_dir, tmp_path_factory):
    return make_tiny_model_dir(bpe_dir, tmp_path_factory.mktemp("demo") / "model")
