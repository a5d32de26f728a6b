import json
import random

import pytest

from ofa_scale.data.tokenizer import load_tokenizer, train_sentencepiece
from ofa_scale.objectives import ObjectivesConfig
from ofa_scale.objectives.builders import BuildContext
from ofa_scale.objectives.negatives import Negatives


@pytest.fixture(scope="session")
def tok(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


@pytest.fixture(scope="session")
def spm_tok(tmp_path_factory):
    words = ["red", "green", "blue", "circle", "square", "triangle", "man", "horse", "riding", "what", "is", "the",
             "image", "does", "describe", "region", "objects", "complete", "text", "of", "middle", "part", "yes", "no"]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(12)) + "?" for _ in range(400)]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("spm"), 300, soft_vocab_limit=True)


@pytest.fixture(scope="session")
def neg_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("negatives")
    (d / "all_captions.txt").write_text("a red car\n\ntwo dogs on grass\n")
    (d / "object.txt").write_text("cat\ndog\nzebra\n")
    (d / "type2ans.json").write_text(json.dumps(
        {"how many": ["0", "1", "2", "3", "4"], "what color": ["red", "blue", "green"], "other": ["tree", "sky", "road"]}))
    return d


@pytest.fixture(scope="session")
def negatives(neg_dir):
    return Negatives.load(neg_dir)


@pytest.fixture
def ctx(tok, negatives):
    return BuildContext(ObjectivesConfig(), tok, negatives)
